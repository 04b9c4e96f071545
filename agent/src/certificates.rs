//! The storage role's server certificates, for the volumes whose export
//! speaks TLS: [`CA_FILE`], [`CERT_FILE`] and [`KEY_FILE`] in the
//! directory `--tls-dir` names (a `kubernetes.io/tls` Secret plus the CA,
//! as the node plugin reads its own), or [`CREDENTIAL_BUNDLE_FILE`] in place
//! of the last two (a pod certificate). The server certificate must name the
//! address nodes dial (the `nbdUri`'s host) among its subject alternative
//! names; client certificates must chain to the CA.
//!
//! The files may not be there yet when the agent starts (a certificate
//! sync fills the directory): they are looked for again whenever a volume
//! needs them, and once loaded they are read again whenever they change
//! (`nbd::tls::reload`), so a renewed certificate applies to the next
//! connection of every volume without a restart. A volume that needs TLS
//! while none can be loaded is refused with FAILED_PRECONDITION naming
//! what is missing, and one already stored is not served until they load:
//! never a plaintext export in its place.

use std::path::PathBuf;
use std::sync::Mutex;

use nbd::tls::{ServerTls, TlsMode};

use crate::error::{Error, Result};
use crate::store::ExportTls;

/// The CA clients' certificates chain to (PEM).
pub const CA_FILE: &str = "ca.crt";
/// The server's certificate chain (PEM).
pub const CERT_FILE: &str = "tls.crt";
/// The server's private key (PEM: PKCS#8, PKCS#1 or SEC1).
pub const KEY_FILE: &str = "tls.key";
/// Instead of [`CERT_FILE`] and [`KEY_FILE`]: a pod certificate's credential
/// bundle (the key, then the chain), as the kubelet projects it.
pub const CREDENTIAL_BUNDLE_FILE: &str = "credentials.pem";

#[derive(Debug)]
pub struct Certificates {
    /// `None`: started without `--tls-dir`.
    dir: Option<PathBuf>,
    /// Once the files loaded: shared by every export, and kept in step with
    /// the files from then on.
    loaded: Mutex<Option<ServerTls>>,
}

impl Certificates {
    /// Certificates from `dir`, loaded when first needed (see
    /// [`Certificates::server_tls`]).
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir, loaded: Mutex::new(None) }
    }

    /// The server side of TLS; loads the files if they have not loaded
    /// yet. FAILED_PRECONDITION naming what is missing. Blocking (it reads
    /// files): call it off the async threads.
    pub fn server_tls(&self) -> Result<ServerTls> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tls) = &*loaded {
            return Ok(tls.clone());
        }
        let Some(dir) = &self.dir else {
            return Err(Error::precondition(format!(
                "the storage role has no TLS certificates: it was started without --tls-dir (a directory holding \
                 {CA_FILE}, {CERT_FILE} and {KEY_FILE})"
            )));
        };
        // A pod certificate's bundle holds both the chain and the key.
        let bundle = dir.join(CREDENTIAL_BUNDLE_FILE);
        let (chain, key) =
            if bundle.exists() { (bundle.clone(), bundle) } else { (dir.join(CERT_FILE), dir.join(KEY_FILE)) };
        let tls = ServerTls::from_pem_files(&chain, &key, &dir.join(CA_FILE)).map_err(|e| {
            Error::precondition(format!("the storage role's TLS certificates in --tls-dir {}: {e}", dir.display()))
        })?;
        tracing::info!(dir = %dir.display(), "TLS certificates loaded");
        *loaded = Some(tls.clone());
        Ok(tls)
    }

    /// Whether volumes that need TLS can be served now. Blocking, as
    /// [`Certificates::server_tls`].
    pub fn usable(&self) -> bool {
        self.server_tls().is_ok()
    }

    /// What a volume's export does with TLS, with the certificates it
    /// needs. Blocking, as [`Certificates::server_tls`].
    pub fn export_mode(&self, tls: ExportTls) -> Result<TlsMode> {
        Ok(match tls {
            ExportTls::Off => TlsMode::Off,
            ExportTls::Allowed => TlsMode::Allowed(self.server_tls()?),
            ExportTls::Required => TlsMode::Required(self.server_tls()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    #[test]
    fn without_a_directory_or_files_a_volume_that_needs_tls_is_a_clear_precondition() {
        let none = Certificates::new(None);
        assert!(matches!(none.export_mode(ExportTls::Off), Ok(TlsMode::Off)), "plaintext needs nothing");
        let err = none.export_mode(ExportTls::Required).unwrap_err();
        assert_eq!(err.kind(), Kind::FailedPrecondition);
        assert!(err.to_string().contains("without --tls-dir"), "{err}");
        assert!(!none.usable());

        let dir = tempfile::tempdir().unwrap();
        let empty = Certificates::new(Some(dir.path().to_path_buf()));
        let err = empty.export_mode(ExportTls::Allowed).unwrap_err();
        assert_eq!(err.kind(), Kind::FailedPrecondition);
        assert!(err.to_string().contains(CERT_FILE) && err.to_string().contains("--tls-dir"), "{err}");
    }

    /// A pod certificate's bundle (key, then chain) serves in place of
    /// tls.crt and tls.key.
    #[test]
    fn a_credential_bundle_is_the_server_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.path().join(CA_FILE), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["192.0.2.1".to_owned()]).unwrap().signed_by(&key, &issuer);
        let bundle = format!("{}{}", key.serialize_pem(), cert.unwrap().pem());
        let certificates = Certificates::new(Some(dir.path().to_path_buf()));
        assert!(!certificates.usable(), "nothing yet");
        std::fs::write(dir.path().join(CREDENTIAL_BUNDLE_FILE), bundle).unwrap();
        assert!(matches!(certificates.export_mode(ExportTls::Required), Ok(TlsMode::Required(_))));
    }
}
