//! Who a client is: the node name in its verified certificate.
//!
//! The cluster CA issues each node a client certificate whose one DNS
//! subject alternative name is the node's name (Kubernetes node names are
//! DNS subdomains). rustls has verified the chain to the CA before this
//! runs; this only reads the name. A certificate with no DNS name, several,
//! or a wildcard identifies no node: the access check then refuses it
//! rather than guess which name was meant.

use rustls_pki_types::CertificateDer;

/// Why a verified certificate names no node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the client presented no certificate")]
    NoCertificate,
    #[error("the client certificate does not parse: {0}")]
    Malformed(String),
    #[error("the client certificate has no DNS name")]
    NoName,
    #[error("the client certificate has {0} DNS names; a node certificate has exactly one")]
    SeveralNames(usize),
    #[error("the client certificate's name {0:?} is a wildcard")]
    Wildcard(String),
}

/// The node name of the end-entity certificate (the first of the chain the
/// client sent).
pub fn node_name(chain: Option<&[CertificateDer<'_>]>) -> Result<String, IdentityError> {
    let cert = chain.and_then(|c| c.first()).ok_or(IdentityError::NoCertificate)?;
    let parsed = webpki::EndEntityCert::try_from(cert).map_err(|e| IdentityError::Malformed(e.to_string()))?;
    let names: Vec<&str> = parsed.valid_dns_names().collect();
    match names.as_slice() {
        [] => Err(IdentityError::NoName),
        [name] if name.starts_with('*') => Err(IdentityError::Wildcard((*name).to_owned())),
        [name] => Ok((*name).to_owned()),
        several => Err(IdentityError::SeveralNames(several.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(names: &[&str]) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("names");
        params.distinguished_name.push(rcgen::DnType::CommonName, "cn-is-not-used");
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn the_one_dns_name_is_the_node() {
        let c = cert(&["worker-1.example"]);
        assert_eq!(node_name(Some(&[c])), Ok("worker-1.example".to_owned()));
    }

    #[test]
    fn no_name_several_names_or_a_wildcard_name_no_node() {
        assert_eq!(node_name(None), Err(IdentityError::NoCertificate));
        assert_eq!(node_name(Some(&[])), Err(IdentityError::NoCertificate));
        assert_eq!(node_name(Some(&[cert(&[])])), Err(IdentityError::NoName));
        assert_eq!(node_name(Some(&[cert(&["a", "b"])])), Err(IdentityError::SeveralNames(2)));
        assert_eq!(
            node_name(Some(&[cert(&["*.nodes.example"])])),
            Err(IdentityError::Wildcard("*.nodes.example".into()))
        );
        // An IP address SAN is not a node name.
        assert_eq!(node_name(Some(&[cert(&["192.0.2.1"])])), Err(IdentityError::NoName));
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        assert!(matches!(node_name(Some(&[garbage])), Err(IdentityError::Malformed(_))));
    }
}
