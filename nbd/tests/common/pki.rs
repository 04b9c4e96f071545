//! Test certificates, made with rcgen in the test itself: a CA, a server
//! certificate for 127.0.0.1 and localhost, and node client certificates,
//! written as PEM files where the tools look for them (libnbd's
//! `tls-certificates=DIR` and qemu's `tls-creds-x509,dir=DIR` both want
//! `ca-cert.pem`, `client-cert.pem` and `client-key.pem`).

use std::path::{Path, PathBuf};

use nbd::tls::{ClientTls, ServerTls};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// One certificate authority and the files it issued, in a temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

/// What qemu's x509 credential checks want of a leaf: digital signature and
/// key encipherment, and the purpose it is used for.
fn leaf_params(names: &[&str], purpose: ExtendedKeyUsagePurpose, common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![purpose];
    params.is_ca = IsCa::ExplicitNoCa;
    params
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let ca_pem = params.self_signed(&key).unwrap().pem();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca-cert.pem"), &ca_pem).unwrap();
        Self { dir, issuer: Issuer::new(params, key), ca_pem }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca-cert.pem")
    }

    /// Issues a certificate and writes it and its key under `sub`.
    fn issue(&self, sub: &str, params: CertificateParams, cert_file: &str, key_file: &str) -> PathBuf {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let dir = self.dir.path().join(sub);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(cert_file), cert.pem()).unwrap();
        std::fs::write(dir.join(key_file), key.serialize_pem()).unwrap();
        std::fs::write(dir.join("ca-cert.pem"), &self.ca_pem).unwrap();
        dir
    }

    /// The server's TLS: a certificate for 127.0.0.1 and localhost, client
    /// certificates checked against this CA.
    pub fn server(&self) -> ServerTls {
        let params = leaf_params(&["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth, "nbd-csi server");
        let dir = self.issue("server", params, "server-cert.pem", "server-key.pem");
        ServerTls::from_pem_files(&dir.join("server-cert.pem"), &dir.join("server-key.pem"), &self.ca_path())
            .expect("server TLS from PEM files")
    }

    /// A directory with `ca-cert.pem`, `client-cert.pem` and
    /// `client-key.pem` for node `node` (its one DNS name).
    pub fn client_dir(&self, node: &str) -> PathBuf {
        let params = leaf_params(&[node], ExtendedKeyUsagePurpose::ClientAuth, node);
        self.issue(&format!("client-{node}"), params, "client-cert.pem", "client-key.pem")
    }

    /// The repo's client TLS for node `node`, trusting `server_ca` for the
    /// server (this CA unless a test says otherwise).
    pub fn client(&self, node: &str, server_ca: &Path) -> ClientTls {
        let dir = self.client_dir(node);
        ClientTls::from_pem_files(server_ca, &dir.join("client-cert.pem"), &dir.join("client-key.pem"), "127.0.0.1")
            .expect("client TLS from PEM files")
    }
}
