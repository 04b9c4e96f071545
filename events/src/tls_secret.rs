//! A binary's TLS certificate, kept as files from its Secret.
//!
//! The controller (or cert-manager) keeps one `kubernetes.io/tls` Secret
//! per holder: a node plugin's client certificate, a storage agent's
//! server certificate, the embedded controller's server certificate, each
//! with the cluster CA as `ca.crt`. A DaemonSet cannot mount a Secret whose
//! name differs per pod, so each binary reads its own Secret and writes it
//! into its `--tls-dir`, then follows it: a renewed certificate is written
//! again, and the next TLS connection reads the new files.
//!
//! - Names ([`SecretNames`]): one function for the issuer and the holders,
//!   so both sides agree; a holder names only itself ([`Holder`]), so a
//!   node plugin derives its Secret from its node name and cannot ask for
//!   another node's.
//! - Files: the three files change together. Like the kubelet's Secret
//!   volumes, each version goes into a new hidden directory (written,
//!   fsynced), a `..data` symlink is switched to it by one rename, and
//!   `ca.crt`, `tls.crt`, `tls.key` are symlinks through `..data`: a reader
//!   sees the old set or the new one, never a new certificate with the old
//!   key. The key is 0600 in a 0700 directory.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The CA certificate the peers' certificates chain to (PEM).
pub const CA_FILE: &str = "ca.crt";
/// The holder's certificate chain (PEM).
pub const CERT_FILE: &str = "tls.crt";
/// The holder's private key (PEM).
pub const KEY_FILE: &str = "tls.key";
/// Instead of [`CERT_FILE`] and [`KEY_FILE`]: a pod certificate's credential
/// bundle, as the kubelet's `podCertificate` projection writes it (the
/// PKCS#8 key, then the chain), read at once so key and chain always match.
pub const CREDENTIAL_BUNDLE_FILE: &str = "credentials.pem";
/// The symlink naming the directory of the current version.
const DATA_LINK: &str = "..data";
/// Prefix of each version's directory.
const VERSION_PREFIX: &str = "..tls-";
/// The longest object name (a DNS subdomain).
const MAX_NAME: usize = 253;

/// Why a Secret's name cannot be made, or its content used.
#[derive(Debug, thiserror::Error)]
pub enum TlsSecretError {
    #[error("{0:?} is not a usable Secret name prefix (lowercase letters, digits and '-', at most 200)")]
    Prefix(String),
    #[error("{0:?} is not a node name")]
    Node(String),
    #[error("the Secret name for node {node:?} would be {len} characters, past the {MAX_NAME} allowed")]
    TooLong { node: String, len: usize },
    #[error("Secret {0} has no data key {1:?}")]
    MissingKey(String, &'static str),
    #[error("writing the TLS files into {dir}: {source}")]
    Write { dir: String, source: std::io::Error },
}

/// Whose certificate a Secret holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder<'a> {
    /// A node plugin's client certificate: its one DNS name is the node.
    Node(&'a str),
    /// A storage agent's server certificate (the agent's address and node name).
    Storage(&'a str),
    /// The embedded controller's server certificate (its advertised address).
    Controller,
}

/// The names of the Secrets of one install: `<prefix>-ca`,
/// `<prefix>-node-<node>`, `<prefix>-storage-<node>`, `<prefix>-controller`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretNames {
    prefix: String,
}

impl SecretNames {
    pub fn new(prefix: &str) -> Result<Self, TlsSecretError> {
        let ok = !prefix.is_empty()
            && prefix.len() <= 200
            && prefix.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && prefix.as_bytes()[0].is_ascii_alphanumeric()
            && prefix.as_bytes()[prefix.len() - 1].is_ascii_alphanumeric();
        if !ok {
            return Err(TlsSecretError::Prefix(prefix.to_owned()));
        }
        Ok(Self { prefix: prefix.to_owned() })
    }

    /// The CA's Secret (its certificate and key; only the issuer reads it).
    pub fn ca(&self) -> String {
        format!("{}-ca", self.prefix)
    }

    /// The Secret of `holder`.
    pub fn of(&self, holder: Holder<'_>) -> Result<String, TlsSecretError> {
        let (kind, node) = match holder {
            Holder::Controller => return Ok(format!("{}-controller", self.prefix)),
            Holder::Node(node) => ("node", node),
            Holder::Storage(node) => ("storage", node),
        };
        if !is_node_name(node) {
            return Err(TlsSecretError::Node(node.to_owned()));
        }
        let name = format!("{}-{kind}-{node}", self.prefix);
        if name.len() > MAX_NAME {
            return Err(TlsSecretError::TooLong { node: node.to_owned(), len: name.len() });
        }
        Ok(name)
    }
}

/// A Node name: a DNS subdomain (lowercase letters, digits, '-' and '.').
fn is_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The three files of one version, as PEM bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TlsFiles").field("ca_bytes", &self.ca.len()).field("cert_bytes", &self.cert.len()).finish()
    }
}

impl TlsFiles {
    /// The files of a `kubernetes.io/tls` Secret with `ca.crt`.
    pub fn from_secret(secret: &Secret) -> Result<Self, TlsSecretError> {
        let name = secret.metadata.name.clone().unwrap_or_default();
        let get = |key: &'static str| {
            secret
                .data
                .as_ref()
                .and_then(|d| d.get(key))
                .filter(|v| !v.0.is_empty())
                .map(|v| v.0.clone())
                .ok_or_else(|| TlsSecretError::MissingKey(name.clone(), key))
        };
        Ok(Self { ca: get(CA_FILE)?, cert: get(CERT_FILE)?, key: get(KEY_FILE)? })
    }

    /// The files as they are in `dir` now, if all three are there.
    pub fn read(dir: &Path) -> Option<Self> {
        let read = |name| std::fs::read(dir.join(name)).ok();
        Some(Self { ca: read(CA_FILE)?, cert: read(CERT_FILE)?, key: read(KEY_FILE)? })
    }

    /// Makes these the files of `dir` in one step (see the module doc);
    /// older versions are removed. Blocking.
    pub fn write(&self, dir: &Path) -> Result<(), TlsSecretError> {
        let err = |source| TlsSecretError::Write { dir: dir.display().to_string(), source };
        self.write_version(dir).map_err(err)
    }

    fn write_version(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
        let version = format!("{VERSION_PREFIX}{nanos}");
        let version_dir = dir.join(&version);
        std::fs::DirBuilder::new().mode(0o700).create(&version_dir)?;
        for (name, bytes, mode) in
            [(CA_FILE, &self.ca, 0o644), (CERT_FILE, &self.cert, 0o644), (KEY_FILE, &self.key, 0o600)]
        {
            let mut file =
                std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(version_dir.join(name))?;
            file.write_all(bytes)?;
            file.sync_all()?;
        }
        sync_dir(&version_dir)?;
        replace_symlink(dir, DATA_LINK, Path::new(&version))?;
        for name in [CA_FILE, CERT_FILE, KEY_FILE] {
            let target = Path::new(DATA_LINK).join(name);
            if std::fs::read_link(dir.join(name)).ok().as_deref() != Some(target.as_path()) {
                replace_symlink(dir, name, &target)?;
            }
        }
        sync_dir(dir)?;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with(VERSION_PREFIX) && name != version.as_str() {
                std::fs::remove_dir_all(entry.path())?;
            }
        }
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// `dir/name` becomes a symlink to `target` by one rename, whatever was there.
fn replace_symlink(dir: &Path, name: &str, target: &Path) -> std::io::Result<()> {
    let temporary = dir.join(format!("..{name}.new"));
    match std::fs::remove_file(&temporary) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::os::unix::fs::symlink(target, &temporary)?;
    std::fs::rename(&temporary, dir.join(name))
}

/// The follower of one Secret: how many times its files were written.
#[derive(Debug)]
pub struct TlsSecretSync {
    written: watch::Receiver<u64>,
    task: JoinHandle<()>,
    dir: PathBuf,
}

impl Drop for TlsSecretSync {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsSecretSync {
    /// Follows Secret `name` of `namespace` (a watch of that one name, which
    /// retries with backoff) and writes its files into `dir` whenever they
    /// differ from what is there.
    pub fn spawn(client: kube::Client, namespace: &str, name: String, dir: PathBuf) -> Self {
        let (count, written) = watch::channel(0u64);
        let api: Api<Secret> = Api::namespaced(client, namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let secret = format!("{namespace}/{name}");
        let target = dir.clone();
        let task = tokio::spawn(async move {
            let events = watcher(api, config).default_backoff().applied_objects();
            tokio::pin!(events);
            while let Some(event) = tokio_stream::StreamExt::next(&mut events).await {
                let applied = match event {
                    Ok(object) => object,
                    Err(e) => {
                        tracing::warn!(secret, error = %e, "watching the TLS Secret failed; it is retried");
                        continue;
                    }
                };
                match write_if_changed(applied, target.clone()).await {
                    Ok(false) => {}
                    Ok(true) => {
                        count.send_modify(|n| *n += 1);
                        tracing::info!(secret, dir = %target.display(), "TLS files written from the Secret");
                    }
                    Err(e) => tracing::warn!(secret, error = %e, "the TLS Secret could not be written out"),
                }
            }
        });
        Self { written, task, dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes so far (0: the Secret has not been seen yet).
    pub fn writes(&self) -> u64 {
        *self.written.borrow()
    }

    /// Waits until the files have been written more than `after` times.
    pub async fn written_after(&self, after: u64) -> u64 {
        let mut written = self.written.clone();
        match written.wait_for(|n| *n > after).await {
            Ok(n) => *n,
            // The task ended: nothing will be written again.
            Err(_) => std::future::pending().await,
        }
    }
}

async fn write_if_changed(secret: Secret, dir: PathBuf) -> Result<bool, TlsSecretError> {
    let files = TlsFiles::from_secret(&secret)?;
    let task = tokio::task::spawn_blocking(move || {
        if TlsFiles::read(&dir).as_ref() == Some(&files) {
            return Ok(false);
        }
        files.write(&dir).map(|()| true)
    });
    task.await.unwrap_or_else(|e| {
        Err(TlsSecretError::Write { dir: String::new(), source: std::io::Error::other(e.to_string()) })
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;

    use super::*;

    fn files(n: u8) -> TlsFiles {
        TlsFiles { ca: vec![b'c', n], cert: vec![b'x', n], key: vec![b'k', n] }
    }

    #[test]
    fn names_follow_the_holder_and_refuse_what_is_not_a_node() {
        let names = SecretNames::new("nbd-csi").unwrap();
        assert_eq!(names.ca(), "nbd-csi-ca");
        assert_eq!(names.of(Holder::Node("worker-1")).unwrap(), "nbd-csi-node-worker-1");
        assert_eq!(names.of(Holder::Storage("s.example")).unwrap(), "nbd-csi-storage-s.example");
        assert_eq!(names.of(Holder::Controller).unwrap(), "nbd-csi-controller");
        assert!(matches!(names.of(Holder::Node("Bad_Node")), Err(TlsSecretError::Node(_))));
        assert!(matches!(names.of(Holder::Node("")), Err(TlsSecretError::Node(_))));
        let long = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(60)].join(".");
        assert!(matches!(names.of(Holder::Storage(&long)), Err(TlsSecretError::TooLong { .. })));
        for bad in ["", "-x", "x-", "UP", "a.b", &"p".repeat(201)] {
            assert!(SecretNames::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_secret_without_one_of_the_three_keys_is_refused() {
        let mut data = BTreeMap::from([
            (CA_FILE.to_owned(), ByteString(b"ca".to_vec())),
            (CERT_FILE.to_owned(), ByteString(b"cert".to_vec())),
        ]);
        let mut secret = Secret { data: Some(data.clone()), ..Default::default() };
        secret.metadata.name = Some("s".into());
        let e = TlsFiles::from_secret(&secret).unwrap_err();
        assert_eq!(e.to_string(), "Secret s has no data key \"tls.key\"");
        data.insert(KEY_FILE.to_owned(), ByteString(b"key".to_vec()));
        secret.data = Some(data);
        let read = TlsFiles::from_secret(&secret).unwrap();
        assert_eq!((read.ca, read.cert, read.key), (b"ca".to_vec(), b"cert".to_vec(), b"key".to_vec()));
    }

    #[test]
    fn a_new_version_replaces_all_three_files_and_the_old_one_goes() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("tls");
        assert_eq!(TlsFiles::read(&dir), None);
        files(1).write(&dir).unwrap();
        assert_eq!(TlsFiles::read(&dir), Some(files(1)));
        // What a reader opened before the switch stays the old version.
        let old_key = std::fs::File::open(dir.join(KEY_FILE)).unwrap();
        files(2).write(&dir).unwrap();
        assert_eq!(TlsFiles::read(&dir), Some(files(2)));
        assert_eq!(std::io::read_to_string(old_key).unwrap().as_bytes(), b"k\x01");
        let versions: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(VERSION_PREFIX))
            .collect();
        assert_eq!(versions.len(), 1, "{versions:?}");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(std::fs::read_link(dir.join(CERT_FILE)).unwrap(), Path::new("..data/tls.crt"));
    }

    #[test]
    fn plain_files_left_by_something_else_become_the_links() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join(CERT_FILE), b"stale").unwrap();
        files(3).write(root.path()).unwrap();
        assert_eq!(TlsFiles::read(root.path()), Some(files(3)));
    }

    fn secret(version: &str, n: u8) -> serde_json::Value {
        let f = files(n);
        let data = [(CA_FILE, f.ca), (CERT_FILE, f.cert), (KEY_FILE, f.key)];
        let mut secret = Secret {
            data: Some(data.into_iter().map(|(k, v)| (k.to_owned(), ByteString(v))).collect()),
            type_: Some("kubernetes.io/tls".into()),
            ..Default::default()
        };
        secret.metadata.name = Some("p-node-w1".into());
        secret.metadata.namespace = Some("ns".into());
        secret.metadata.resource_version = Some(version.into());
        serde_json::to_value(secret).unwrap()
    }

    #[tokio::test]
    async fn the_sync_writes_the_secret_and_then_each_change_of_it() {
        use http::StatusCode;

        use crate::mock_api::{self, reply};
        let (client, mut handle) = mock_api::client();
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("tls");
        let sync = TlsSecretSync::spawn(client, "ns", "p-node-w1".into(), dir.clone());
        // The watcher lists that one name, then watches from the list's version.
        let (request, send) = handle.next_request().await.unwrap();
        assert_eq!(request.uri().path(), "/api/v1/namespaces/ns/secrets");
        let query = request.uri().query().unwrap_or_default().to_owned();
        assert!(query.contains("fieldSelector=metadata.name%3Dp-node-w1"), "{query}");
        let list = serde_json::json!({
            "apiVersion": "v1", "kind": "SecretList", "metadata": {"resourceVersion": "10"},
            "items": [secret("10", 1)]
        });
        reply(send, StatusCode::OK, &list);
        assert_eq!(sync.written_after(0).await, 1);
        assert_eq!(TlsFiles::read(&dir), Some(files(1)));
        let (request, send) = handle.next_request().await.unwrap();
        assert!(request.uri().query().unwrap_or_default().contains("watch=true"));
        // A renewal: the watch reports the Secret modified.
        let event = serde_json::json!({"type": "MODIFIED", "object": secret("11", 2)});
        let mut body = serde_json::to_vec(&event).unwrap();
        body.push(b'\n');
        let mut response = http::Response::new(kube::client::Body::from(body));
        *response.status_mut() = StatusCode::OK;
        send.send_response(response);
        assert_eq!(sync.written_after(1).await, 2);
        assert_eq!(TlsFiles::read(&dir), Some(files(2)));
    }
}
