//! Test certificates, made with rcgen in the test: a cluster CA, the
//! storage role's server certificate for 127.0.0.1 (where the tests'
//! volumes are served and dialled), and node client certificates whose one
//! DNS name is the node. Written as the files `--tls-dir` reads
//! (`ca.crt`, `tls.crt`, `tls.key`), the node's the same way.

use std::path::Path;

use agent::{CA_FILE, CERT_FILE, KEY_FILE};
use nbd::tls::ClientTls;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

pub struct Pki {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let ca_pem = params.self_signed(&key).unwrap().pem();
        Self { issuer: Issuer::new(params, key), ca_pem }
    }

    /// A certificate for `names`, with the CA, into `dir`'s three files.
    fn issue(&self, dir: &Path, names: &[&str], purpose: ExtendedKeyUsagePurpose) {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![purpose];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(CA_FILE), &self.ca_pem).unwrap();
        std::fs::write(dir.join(CERT_FILE), cert.pem()).unwrap();
        std::fs::write(dir.join(KEY_FILE), key.serialize_pem()).unwrap();
    }

    /// The storage role's `--tls-dir`: a server certificate for 127.0.0.1.
    pub fn write_server(&self, dir: &Path) {
        self.issue(dir, &["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    }

    /// Node `node`'s client side, its files under `dir`, for a server at
    /// 127.0.0.1 whose certificate chains to `server_ca` (PEM).
    pub fn client(&self, dir: &Path, node: &str, server_ca: &str) -> ClientTls {
        let dir = dir.join(format!("client-{node}"));
        self.issue(&dir, &[node], ExtendedKeyUsagePurpose::ClientAuth);
        std::fs::write(dir.join(CA_FILE), server_ca).unwrap();
        ClientTls::from_pem_files(&dir.join(CA_FILE), &dir.join(CERT_FILE), &dir.join(KEY_FILE), "127.0.0.1").unwrap()
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }
}
