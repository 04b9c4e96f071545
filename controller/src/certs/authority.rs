//! The cluster CA and what it issues (rcgen), and the check that a
//! certificate is still what its holder needs (rustls' own verifiers, the
//! ones the NBD sessions run, and `nbd::tls::node_name`).
//!
//! The CA signs with a key kept only in its Secret: this process reads it
//! into memory and writes it nowhere else; the holders' Secrets carry the
//! CA certificate alone. rcgen cannot read a certificate back without its
//! X.509 parser (a dependency tree of its own), so the CA is rebuilt from
//! its key and the same fixed parameters it was made with (`ca_params`):
//! the name and the key identifier derive from those, and every issued
//! certificate is verified against the stored CA certificate before it is
//! handed out, so a mismatch could never go unnoticed.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nbd::tls::{ClientTls, ServerTls};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData,
};
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::error::{Error, Result};

/// The CA's subject (and so every certificate's issuer).
const CA_COMMON_NAME: &str = "nbd-csi cluster CA";
/// Certificates start this far in the past, so a holder whose clock is a
/// little behind the controller's accepts them at once.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// Whom a certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A node plugin's client certificate: one DNS name, the node's
    /// (`nbd::tls::node_name` reads it back), for client authentication only.
    Node(String),
    /// A server's certificate (a storage agent, the embedded controller):
    /// the IP address nodes dial, and its node name when it has one, for
    /// server authentication only, so it never passes as a node's
    /// client certificate.
    Server { addresses: Vec<IpAddr>, node: Option<String> },
}

impl Subject {
    fn names(&self) -> Vec<String> {
        match self {
            Self::Node(node) => vec![node.clone()],
            Self::Server { addresses, node } => {
                addresses.iter().map(IpAddr::to_string).chain(node.iter().cloned()).collect()
            }
        }
    }
}

/// A certificate and its key, freshly issued.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// When it was made (its notBefore is `BACKDATE` earlier).
    pub issued_at: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").field("issued_at", &self.issued_at).field("not_after", &self.not_after).finish()
    }
}

impl Issued {
    /// When it is renewed: two thirds into its lifetime, so a third of it
    /// is left for the renewal to reach the holder.
    pub fn renew_after(&self) -> SystemTime {
        renew_after(self.issued_at, self.not_after)
    }
}

/// Two thirds of the way from `issued_at` to `not_after` (the backdating
/// does not count: it would make a short lifetime due at once).
pub fn renew_after(issued_at: SystemTime, not_after: SystemTime) -> SystemTime {
    let lifetime = not_after.duration_since(issued_at).unwrap_or_default();
    issued_at + lifetime * 2 / 3
}

/// The CA: its certificate (PEM, as holders get it) and the signer.
pub struct Authority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").field("common_name", &CA_COMMON_NAME).finish_non_exhaustive()
    }
}

/// The CA's parameters; the same every time, see the module doc.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn rcgen_error(what: &str) -> impl Fn(rcgen::Error) -> Error + '_ {
    move |e| Error::internal(format!("{what}: {e}"))
}

impl Authority {
    /// A new CA valid for `lifetime` from `now`; returns it and its key (PEM).
    pub fn generate(now: SystemTime, lifetime: Duration) -> Result<(Self, String)> {
        let key = KeyPair::generate().map_err(rcgen_error("generating the CA key"))?;
        let mut params = ca_params();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + lifetime).into();
        let cert = params.self_signed(&key).map_err(rcgen_error("signing the CA certificate"))?;
        let key_pem = key.serialize_pem();
        Ok((Self::from_parts(cert.pem(), &key_pem)?, key_pem))
    }

    /// The CA from its certificate and key (PEM), as its Secret keeps them.
    pub fn from_parts(cert_pem: String, key_pem: &str) -> Result<Self> {
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| Error::precondition(format!("the CA certificate does not read as PEM: {e}")))?;
        let key = KeyPair::from_pem(key_pem).map_err(rcgen_error("the CA key does not read as PEM"))?;
        let authority = Self { cert_pem, cert_der, issuer: Issuer::new(ca_params(), key) };
        // The stored certificate must be this key's: a certificate issued
        // now has to chain to it.
        let probe = authority.issue(&Subject::Node("ca-check".into()), SystemTime::now(), Duration::from_secs(600))?;
        authority
            .check(&probe.cert_pem, &probe.key_pem, &Subject::Node("ca-check".into()), SystemTime::now())
            .map_err(|e| Error::precondition(format!("the CA certificate and key do not belong together: {e}")))?;
        Ok(authority)
    }

    /// The CA certificate, PEM (the holders' `ca.crt`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A new key and a certificate for `subject`, valid for `lifetime`
    /// from `now` (backdated a little).
    pub fn issue(&self, subject: &Subject, now: SystemTime, lifetime: Duration) -> Result<Issued> {
        let key = KeyPair::generate().map_err(rcgen_error("generating a key"))?;
        let not_after = now + lifetime;
        let cert_pem = self.certify(subject, &key, now - BACKDATE, not_after)?;
        Ok(Issued { cert_pem, key_pem: key.serialize_pem(), issued_at: now, not_after })
    }

    /// A certificate (PEM) for `subject` with `public_key`, whose private
    /// half its holder made and keeps (a pod certificate: the kubelet's),
    /// valid from `not_before` to `not_after` (whole seconds in X.509).
    pub fn certify(
        &self,
        subject: &Subject,
        public_key: &impl PublicKeyData,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<String> {
        let mut params = CertificateParams::new(subject.names()).map_err(rcgen_error("certificate names"))?;
        let mut name = DistinguishedName::new();
        let common_name = subject.names().into_iter().next().unwrap_or_default();
        name.push(DnType::CommonName, common_name);
        params.distinguished_name = name;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match subject {
            Subject::Node(_) => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Subject::Server { .. } => vec![ExtendedKeyUsagePurpose::ServerAuth],
        };
        let cert = params.signed_by(public_key, &self.issuer).map_err(rcgen_error("signing a certificate"))?;
        Ok(cert.pem())
    }

    /// Whether `cert_pem` with `key_pem` is, at `at`, a certificate of this
    /// CA that serves `subject`: the holder's rustls configuration builds
    /// from it (the key matches), and rustls' verifier accepts it for
    /// every name it must carry, with the right usage.
    pub fn check(&self, cert_pem: &str, key_pem: &str, subject: &Subject, at: SystemTime) -> Result<(), String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("the certificate does not read as PEM: {e}"))?;
        let leaf = chain.first().ok_or("no certificate")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("the key: {e}"))?;
        let ca = vec![self.cert_der.clone()];
        let time = UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert_der.clone()).map_err(|e| format!("the CA: {e}"))?;
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        match subject {
            Subject::Node(node) => {
                ClientTls::new(ca, chain.clone(), key, "ca-check.invalid").map_err(|e| e.to_string())?;
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| e.to_string())?;
                verifier.verify_client_cert(leaf, &chain[1..], time).map_err(|e| e.to_string())?;
                let named = nbd::tls::node_name(Some(&chain)).map_err(|e| e.to_string())?;
                if &named != node {
                    return Err(format!("it names node {named:?}, not {node:?}"));
                }
            }
            Subject::Server { addresses, node } => {
                ServerTls::new(chain.clone(), key, ca).map_err(|e| e.to_string())?;
                let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| e.to_string())?;
                let mut names: Vec<ServerName<'static>> =
                    addresses.iter().map(|a| ServerName::IpAddress((*a).into())).collect();
                if let Some(node) = node {
                    names.push(ServerName::try_from(node.clone()).map_err(|e| format!("node name {node:?}: {e}"))?);
                }
                for name in names {
                    verifier.verify_server_cert(leaf, &chain[1..], &name, &[], time).map_err(|e| e.to_string())?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn ca() -> Authority {
        Authority::generate(SystemTime::now(), 3650 * DAY).unwrap().0
    }

    #[test]
    fn a_node_certificate_verifies_with_rustls_and_names_its_node() {
        let ca = ca();
        let node = Subject::Node("worker-1.example".into());
        let issued = ca.issue(&node, SystemTime::now(), DAY).unwrap();
        ca.check(&issued.cert_pem, &issued.key_pem, &node, SystemTime::now()).unwrap();
        let chain: Vec<_> = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes()).map(Result::unwrap).collect();
        assert_eq!(nbd::tls::node_name(Some(&chain)).unwrap(), "worker-1.example");
        // Not another node's, and not a server's.
        let e = ca.check(&issued.cert_pem, &issued.key_pem, &Subject::Node("worker-2".into()), SystemTime::now());
        assert!(e.unwrap_err().contains("not \"worker-2\""));
        let as_server = Subject::Server { addresses: vec![], node: Some("worker-1.example".into()) };
        assert!(ca.check(&issued.cert_pem, &issued.key_pem, &as_server, SystemTime::now()).is_err());
    }

    #[test]
    fn an_agent_certificate_verifies_for_its_address_and_name_and_is_no_client_certificate() {
        let ca = ca();
        let address: IpAddr = "192.0.2.7".parse().unwrap();
        let agent = Subject::Server { addresses: vec![address], node: Some("storage-1".into()) };
        let issued = ca.issue(&agent, SystemTime::now(), DAY).unwrap();
        ca.check(&issued.cert_pem, &issued.key_pem, &agent, SystemTime::now()).unwrap();
        let other = Subject::Server { addresses: vec!["192.0.2.8".parse().unwrap()], node: None };
        let e = ca.check(&issued.cert_pem, &issued.key_pem, &other, SystemTime::now()).unwrap_err();
        assert!(e.contains("not valid for name \"192.0.2.8\""), "{e}");
        // Its node name must not let it pass as that node's client certificate.
        let e = ca.check(&issued.cert_pem, &issued.key_pem, &Subject::Node("storage-1".into()), SystemTime::now());
        assert!(e.is_err());
    }

    #[test]
    fn another_cas_certificate_an_expired_one_and_a_wrong_key_are_refused() {
        let (ca, other) = (ca(), ca());
        let node = Subject::Node("n1".into());
        let now = SystemTime::now();
        let issued = other.issue(&node, now, DAY).unwrap();
        let e = ca.check(&issued.cert_pem, &issued.key_pem, &node, now).unwrap_err();
        // Both CAs have one name: the other's signature is what fails.
        assert!(e.contains("BadSignature"), "{e}");
        let issued = ca.issue(&node, now, DAY).unwrap();
        let e = ca.check(&issued.cert_pem, &issued.key_pem, &node, now + 2 * DAY).unwrap_err();
        assert!(e.contains("expired"), "{e}");
        let stranger = ca.issue(&node, now, DAY).unwrap();
        assert!(ca.check(&issued.cert_pem, &stranger.key_pem, &node, now).is_err());
    }

    #[test]
    fn the_ca_reads_back_from_its_parts_and_refuses_a_foreign_key() {
        let (ca, key_pem) = Authority::generate(SystemTime::now(), DAY).unwrap();
        let again = Authority::from_parts(ca.cert_pem().to_owned(), &key_pem).unwrap();
        let node = Subject::Node("n1".into());
        let issued = again.issue(&node, SystemTime::now(), DAY).unwrap();
        ca.check(&issued.cert_pem, &issued.key_pem, &node, SystemTime::now()).unwrap();
        let (_, foreign_key) = Authority::generate(SystemTime::now(), DAY).unwrap();
        let e = Authority::from_parts(ca.cert_pem().to_owned(), &foreign_key).unwrap_err();
        assert!(e.to_string().contains("do not belong together"), "{e}");
    }

    #[test]
    fn renewal_is_two_thirds_into_the_lifetime() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(renew_after(start, start + 90 * DAY), start + 60 * DAY);
        assert_eq!(renew_after(start, start + Duration::from_secs(30)), start + Duration::from_secs(20));
        let now = SystemTime::now();
        let issued = ca().issue(&Subject::Node("n".into()), now, Duration::from_secs(3600)).unwrap();
        // Renewed 40 min after issuance; the five minutes' backdating
        // does not count (a 30 s lifetime would be due at once).
        assert_eq!(issued.renew_after(), now + Duration::from_secs(40 * 60));
        let short = ca().issue(&Subject::Node("n".into()), now, Duration::from_secs(30)).unwrap();
        assert_eq!(short.renew_after(), now + Duration::from_secs(20));
    }
}
