//! A server's TLS configuration kept in step with the PEM files it was
//! built from: renewed certificates apply to the next connection, without
//! a restart. The chain and the key are two files (a Secret's) or one, a
//! credential bundle (a pod certificate's), given as both.
//!
//! A mounted Secret is updated in place (an atomic swap of a symlinked
//! directory), and a certificate sync may rewrite the files at any moment.
//! Each connection that starts TLS asks for the configuration: the three
//! files are stat(2)ed, and only when one of them changed (device, inode,
//! size or modification time) is the configuration built again. A change
//! that does not load (a key written before its certificate, a file
//! missing for a moment) keeps the last good configuration, logged once
//! per change; the next change is tried again.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::ServerConfig;

use super::config::{
    TlsConfigError, build_server_config, certificates_from_pem_file, credentials_from_bundle, private_key_from_pem_file,
};

/// What identifies one version of a file: a rewrite or a swapped symlink
/// changes at least one of these.
type Stamp = Option<(u64, u64, u64, i64, i64)>;

fn build(cert_chain: &Path, key: &Path, client_ca: &Path) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let (chain, key) = if cert_chain == key {
        // A credential bundle (a pod certificate: key, then chain): read
        // once, so a swap between two reads cannot pair a key with
        // another certificate.
        credentials_from_bundle(cert_chain)?
    } else {
        (certificates_from_pem_file(cert_chain)?, private_key_from_pem_file(key)?)
    };
    build_server_config(chain, key, certificates_from_pem_file(client_ca)?)
}

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.dev(), meta.ino(), meta.len(), meta.mtime(), meta.mtime_nsec()))
}

/// The server's certificate chain, its key and the CA its clients'
/// certificates must chain to, as files.
#[derive(Debug)]
pub struct PemFiles {
    cert_chain: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
    /// The stamps last looked at, and the configuration last built.
    current: Mutex<([Stamp; 3], Arc<ServerConfig>)>,
}

impl PemFiles {
    /// Builds the configuration from the files as they are now; an error
    /// names the file that is missing or does not parse.
    pub fn load(cert_chain: &Path, key: &Path, client_ca: &Path) -> Result<Self, TlsConfigError> {
        let (cert_chain, key, client_ca) = (cert_chain.to_path_buf(), key.to_path_buf(), client_ca.to_path_buf());
        let stamps = [stamp(&cert_chain), stamp(&key), stamp(&client_ca)];
        let config = build(&cert_chain, &key, &client_ca)?;
        Ok(Self { cert_chain, key, client_ca, current: Mutex::new((stamps, config)) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ([Stamp; 3], Arc<ServerConfig>)> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stamps(&self) -> [Stamp; 3] {
        [stamp(&self.cert_chain), stamp(&self.key), stamp(&self.client_ca)]
    }

    /// The configuration for a new connection: built again first when a
    /// file changed since the last look. Blocking (stat, and reading the
    /// files after a change): call it off the async threads.
    pub fn current(&self) -> Arc<ServerConfig> {
        let stamps = self.stamps();
        {
            let current = self.lock();
            if current.0 == stamps {
                return Arc::clone(&current.1);
            }
        }
        let built = build(&self.cert_chain, &self.key, &self.client_ca);
        let mut current = self.lock();
        current.0 = stamps;
        match built {
            Ok(config) => {
                tracing::info!(certificate = %self.cert_chain.display(), "TLS certificates changed: new connections use them");
                current.1 = config;
            }
            Err(e) => tracing::warn!(
                error = %e,
                "TLS certificates changed but do not load; new connections keep the previous ones"
            ),
        }
        Arc::clone(&current.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a CA and a server certificate for `name` signed by it.
    fn write(dir: &Path, name: &str) {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.join("ca.crt"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
    }

    #[test]
    fn a_changed_file_rebuilds_the_configuration_and_a_broken_change_keeps_the_last_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(PemFiles::load(&d.join("tls.crt"), &d.join("tls.key"), &d.join("ca.crt")).is_err(), "no files yet");
        write(d, "first.example");
        let files = PemFiles::load(&d.join("tls.crt"), &d.join("tls.key"), &d.join("ca.crt")).unwrap();
        let first = files.current();
        assert!(Arc::ptr_eq(&first, &files.current()), "unchanged files: the same configuration");

        // Renewed (new files renamed into place, as a Secret update does).
        let renewed = tempfile::tempdir_in(d).unwrap();
        write(renewed.path(), "second.example");
        for file in ["ca.crt", "tls.crt", "tls.key"] {
            std::fs::rename(renewed.path().join(file), d.join(file)).unwrap();
        }
        let second = files.current();
        assert!(!Arc::ptr_eq(&first, &second), "renewed files: a new configuration");

        // A key that does not parse: the last good configuration stays.
        std::fs::write(d.join("tls.key"), "not a key\n").unwrap();
        assert!(Arc::ptr_eq(&second, &files.current()));
        assert!(Arc::ptr_eq(&second, &files.current()), "and is not retried until the next change");
    }
}
