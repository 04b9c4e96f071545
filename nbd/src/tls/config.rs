//! The rustls configurations NBD over TLS uses, built one way only.
//!
//! Both sides: TLS 1.3 only, rustls' ring provider, certificates from PEM
//! files. The server requires a client certificate that chains to the
//! cluster CA (it identifies the node, see `identity`), and never sends a
//! post-handshake message of its own: no session tickets (none are issued,
//! `send_tls13_tickets` is 0, no session cache), and no KeyUpdate (keys are
//! renewed by reconnecting, see `records`). A kernel TLS socket on the
//! other end could process neither.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::records::DEFAULT_RECORD_LIMIT;
use super::reload::PemFiles;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("reading {what} from {path}: {source}")]
    Pem { what: &'static str, path: String, source: rustls_pki_types::pem::Error },
    #[error("{0} holds no certificate")]
    NoCertificate(String),
    #[error("CA certificate refused: {0}")]
    BadCa(rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{0:?} is not a valid server name (DNS name or IP address)")]
    ServerName(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of a PEM file, in order.
pub fn certificates_from_pem_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem_error = |source| TlsConfigError::Pem { what: "certificates", path: path.display().to_string(), source };
    let certs = CertificateDer::pem_file_iter(path).map_err(pem_error)?.collect::<Result<Vec<_>, _>>();
    let certs = certs.map_err(pem_error)?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate(path.display().to_string()));
    }
    Ok(certs)
}

/// A credential bundle's certificate chain and private key, from one read
/// of the file: the kubelet's `podCertificate` projection writes the
/// PKCS#8 key, then the chain, and swaps the whole file on renewal.
pub fn credentials_from_bundle(
    path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsConfigError> {
    let shown = || path.display().to_string();
    let pem = std::fs::read(path).map_err(|e| TlsConfigError::Pem {
        what: "credential bundle",
        path: shown(),
        source: rustls_pki_types::pem::Error::Io(e),
    })?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsConfigError::Pem { what: "certificates", path: shown(), source })?;
    if chain.is_empty() {
        return Err(TlsConfigError::NoCertificate(shown()));
    }
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|source| TlsConfigError::Pem {
        what: "private key",
        path: shown(),
        source,
    })?;
    Ok((chain, key))
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn private_key_from_pem_file(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsConfigError::Pem {
        what: "private key",
        path: path.display().to_string(),
        source,
    })
}

fn roots(cas: Vec<CertificateDer<'static>>) -> Result<Arc<RootCertStore>, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca).map_err(TlsConfigError::BadCa)?;
    }
    Ok(Arc::new(roots))
}

/// The server's rustls configuration: TLS 1.3 only, a client certificate
/// chained to `client_ca` required, no session tickets, no session cache,
/// no early data.
pub(crate) fn build_server_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: Vec<CertificateDer<'static>>,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let provider = provider();
    // Client certificates are required: `allow_unauthenticated` is never called.
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(client_ca)?, Arc::clone(&provider)).build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert_chain, key)?;
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.max_early_data_size = 0;
    // A connection's session goes to the kernel where it has kTLS
    // (`server::kernel_tls`).
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// Where a [`ServerTls`] takes its configuration from.
#[derive(Debug)]
enum Source {
    /// Built once, from certificates in memory.
    Fixed(Arc<ServerConfig>),
    /// PEM files, built again when they change.
    Files(Box<PemFiles>),
}

/// The server side of one export's TLS: its certificate, the CA its
/// clients' certificates must chain to, and the records a connection may
/// carry before it is closed for fresh keys. Clones share the source: every
/// export made with one [`ServerTls::from_pem_files`] sees its files'
/// renewals.
#[derive(Debug, Clone)]
pub struct ServerTls {
    source: Arc<Source>,
    record_limit: u64,
}

impl ServerTls {
    pub fn new(
        cert_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        client_ca: Vec<CertificateDer<'static>>,
    ) -> Result<Self, TlsConfigError> {
        let config = build_server_config(cert_chain, key, client_ca)?;
        Ok(Self { source: Arc::new(Source::Fixed(config)), record_limit: DEFAULT_RECORD_LIMIT })
    }

    /// From PEM files: the server's certificate chain, its key, the CA.
    /// They must load now; later they are read again whenever one of them
    /// changes (see `reload`), so a renewed certificate applies to the next
    /// connection.
    pub fn from_pem_files(cert_chain: &Path, key: &Path, client_ca: &Path) -> Result<Self, TlsConfigError> {
        let files = Box::new(PemFiles::load(cert_chain, key, client_ca)?);
        Ok(Self { source: Arc::new(Source::Files(files)), record_limit: DEFAULT_RECORD_LIMIT })
    }

    /// Records per direction after which a connection is closed (see
    /// `records`; the default is [`DEFAULT_RECORD_LIMIT`]). Tests set a
    /// tiny one.
    pub fn with_record_limit(mut self, records: u64) -> Self {
        self.record_limit = records.max(1);
        self
    }

    pub fn record_limit(&self) -> u64 {
        self.record_limit
    }

    /// The configuration for a new connection. From files, this stat(2)s
    /// them (and reads them after a change): call it off the async threads.
    pub fn config(&self) -> Arc<ServerConfig> {
        match &*self.source {
            Source::Fixed(config) => Arc::clone(config),
            Source::Files(files) => files.current(),
        }
    }
}

/// The client side: the CA the server's certificate must chain to, this
/// node's certificate, and the name the server's certificate must carry.
#[derive(Debug, Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl ClientTls {
    /// `server_name`: a DNS name or an IP address the server's certificate
    /// names.
    pub fn new(
        server_ca: Vec<CertificateDer<'static>>,
        cert_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        server_name: &str,
    ) -> Result<Self, TlsConfigError> {
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| TlsConfigError::ServerName(server_name.to_owned()))?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots(server_ca)?)
            .with_client_auth_cert(cert_chain, key)?;
        // Nothing to resume: every connection is a full handshake, and a
        // session handed to the kernel keeps no ticket anyway.
        config.resumption = rustls::client::Resumption::disabled();
        // The node plugin hands the session to the kernel (`crate::ktls`).
        config.enable_secret_extraction = true;
        Ok(Self { config: Arc::new(config), server_name })
    }

    /// From PEM files: the CA, this client's certificate chain and key.
    pub fn from_pem_files(ca: &Path, cert_chain: &Path, key: &Path, server_name: &str) -> Result<Self, TlsConfigError> {
        Self::new(
            certificates_from_pem_file(ca)?,
            certificates_from_pem_file(cert_chain)?,
            private_key_from_pem_file(key)?,
            server_name,
        )
    }

    pub fn config(&self) -> &Arc<ClientConfig> {
        &self.config
    }

    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (rcgen::Issuer<'static, rcgen::KeyPair>, CertificateDer<'static>) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap().der().clone();
        (rcgen::Issuer::new(params, key), cert)
    }

    fn leaf(
        issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
        name: &str,
    ) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap().signed_by(&key, issuer).unwrap();
        let der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        (cert.der().clone(), der)
    }

    #[test]
    fn the_server_issues_no_tickets_and_keeps_no_sessions() {
        let (issuer, ca_cert) = ca();
        let (cert, key) = leaf(&issuer, "server.example");
        let tls = ServerTls::new(vec![cert], key, vec![ca_cert]).unwrap();
        let config = tls.config();
        assert_eq!(config.send_tls13_tickets, 0);
        assert!(!config.ticketer.enabled(), "no ticketer");
        assert!(!config.session_storage.can_cache(), "no session cache");
        assert_eq!(config.max_early_data_size, 0);
        assert!(config.enable_secret_extraction, "kTLS on the server needs the secrets");
        assert_eq!(tls.record_limit(), DEFAULT_RECORD_LIMIT);
        assert_eq!(tls.with_record_limit(0).record_limit(), 1);
    }

    #[test]
    fn the_client_resumes_nothing_and_refuses_a_bad_server_name() {
        let (issuer, ca_cert) = ca();
        let (cert, key) = leaf(&issuer, "node-1");
        let tls = ClientTls::new(vec![ca_cert.clone()], vec![cert.clone()], key.clone_key(), "127.0.0.1").unwrap();
        assert_eq!(tls.server_name().to_str(), "127.0.0.1");
        assert!(!tls.config().enable_early_data);
        assert!(tls.config().enable_secret_extraction, "kTLS needs the secrets");
        let bad = ClientTls::new(vec![ca_cert], vec![cert], key, "not a name").unwrap_err();
        assert!(matches!(bad, TlsConfigError::ServerName(_)), "{bad}");
    }

    #[test]
    fn pem_files_that_hold_nothing_usable_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no PEM here\n").unwrap();
        let err = certificates_from_pem_file(&empty).unwrap_err();
        assert!(err.to_string().contains("holds no certificate"), "{err}");
        let err = private_key_from_pem_file(&empty).unwrap_err();
        assert!(err.to_string().contains("private key") && err.to_string().contains("empty.pem"), "{err}");
        let missing = dir.path().join("missing.pem");
        let err = certificates_from_pem_file(&missing).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
    }
}
