//! Cluster export names: HMAC-SHA256 of the volume id under a key both
//! roles mount from one Kubernetes Secret, so that the controller can put
//! the name in a publish context and the agent serve under it without
//! either writing it into an object, where anyone who may read NbdVolumes
//! would learn what lets a client attach the volume. Embedded mode keeps
//! random names in the agent's records instead.

use std::io::Read;
use std::path::Path;

use ring::hmac;

/// What a key is derived under, so that the same key could later serve
/// another purpose without giving out export names.
const CONTEXT: &[u8] = b"nbd-csi export name v1\0";

/// The secret export names derive from. Its bytes never leave it: `Debug`
/// prints none of them.
pub struct ExportKey(hmac::Key);

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the export-name key has {0} bytes; it needs at least {min}", min = ExportKey::MIN_LEN)]
    TooShort(usize),
    #[error("the export-name key has more than {max} bytes", max = ExportKey::MAX_LEN)]
    TooLong,
    #[error("reading the export-name key {path}: {source}")]
    Read { path: String, source: std::io::Error },
}

impl std::fmt::Debug for ExportKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExportKey(..)")
    }
}

impl ExportKey {
    /// At least the hash's output: 256 bits.
    pub const MIN_LEN: usize = 32;
    /// A key file is read whole; anything bigger is not one.
    pub const MAX_LEN: usize = 4096;

    pub fn new(secret: &[u8]) -> Result<Self, KeyError> {
        match secret.len() {
            n if n < Self::MIN_LEN => Err(KeyError::TooShort(n)),
            n if n > Self::MAX_LEN => Err(KeyError::TooLong),
            _ => Ok(Self(hmac::Key::new(hmac::HMAC_SHA256, secret))),
        }
    }

    /// The key in a file (a Secret's key mounted as a file), read whole;
    /// at most [`Self::MAX_LEN`] bytes are ever read.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let read_err = |source| KeyError::Read { path: path.display().to_string(), source };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut secret = Vec::with_capacity(Self::MIN_LEN);
        file.take(Self::MAX_LEN as u64 + 1).read_to_end(&mut secret).map_err(read_err)?;
        Self::new(&secret)
    }

    /// Volume `id`'s export name: 64 hex digits, the same for one key and
    /// id wherever it is computed, unguessable without the key.
    pub fn export_name(&self, volume_id: &str) -> String {
        let mut context = hmac::Context::with_key(&self.0);
        context.update(CONTEXT);
        context.update(volume_id.as_bytes());
        context.sign().as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }
}
