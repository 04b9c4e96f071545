//! The node's side of NBD over TLS: its certificates, from the directory
//! `--tls-dir` names, laid out as a `kubernetes.io/tls` Secret mounts them
//! ([`CERT_FILE`], [`KEY_FILE`]) next to the cluster CA ([`CA_FILE`]), or
//! as a pod certificate's credential bundle ([`CREDENTIAL_BUNDLE_FILE`],
//! which wins when present) next to the CA.
//!
//! The files are read again for every attach and reconnect: a mounted
//! Secret is updated in place when its certificate is renewed, and the next
//! connection then uses the new one without a plugin restart. A connection
//! to an `nbds://` export runs the whole NBD handshake in userspace
//! (NBD_OPT_STARTTLS, the rustls handshake with this node's certificate,
//! NBD_OPT_GO) and then hands the session to the kernel (`nbd::ktls`),
//! whose socket the NBD driver gets: see `sockets`.

use std::path::PathBuf;

use nbd::tls::ClientTls;
use nbd::tls::config::{
    TlsConfigError, certificates_from_pem_file, credentials_from_bundle, private_key_from_pem_file,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Context, ErrorKind, Result};

/// The file names: the ones the node's Secret is written out as
/// (`csi_events::tls_secret`): `ca.crt`, the CA the servers' certificates
/// chain to; `tls.crt`, this node's certificate chain, its node name as the
/// one DNS name; `tls.key`, its key (PKCS#8, PKCS#1 or SEC1). All PEM.
pub use csi_events::tls_secret::{CA_FILE, CERT_FILE, CREDENTIAL_BUNDLE_FILE, KEY_FILE};

/// The directory holding [`CA_FILE`], [`CERT_FILE`] and [`KEY_FILE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsDir(PathBuf);

impl TlsDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self(dir.into())
    }

    /// Reads every file once: a start-up check that says which file is
    /// missing or unreadable before any volume needs it.
    pub fn check(&self) -> Result<()> {
        let invalid = || format!("--tls-dir {}", self.0.display());
        certificates_from_pem_file(&self.0.join(CA_FILE)).ctx(ErrorKind::InvalidArgument, invalid)?;
        self.credentials().ctx(ErrorKind::InvalidArgument, invalid)?;
        Ok(())
    }

    /// This node's certificate chain and key: from the credential bundle
    /// when there is one (one read), else from the Secret's two files.
    fn credentials(
        &self,
    ) -> std::result::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsConfigError> {
        let bundle = self.0.join(CREDENTIAL_BUNDLE_FILE);
        if bundle.exists() {
            return credentials_from_bundle(&bundle);
        }
        Ok((certificates_from_pem_file(&self.0.join(CERT_FILE))?, private_key_from_pem_file(&self.0.join(KEY_FILE))?))
    }

    /// The client configuration for a server that must present a
    /// certificate for `server_name` (the nbdUri's host: a DNS name or an
    /// IP address), from the files as they are now.
    pub fn client(&self, server_name: &str) -> Result<ClientTls> {
        let context = || format!("TLS certificates from {}", self.0.display());
        let ca = certificates_from_pem_file(&self.0.join(CA_FILE)).ctx(ErrorKind::InvalidArgument, context)?;
        let (chain, key) = self.credentials().ctx(ErrorKind::InvalidArgument, context)?;
        ClientTls::new(ca, chain, key, server_name).ctx(ErrorKind::InvalidArgument, context)
    }
}
