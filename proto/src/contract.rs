//! What the controller tells the node plugin, typed once for both binaries:
//! the publish_context ([`PublishContext`]), the volume_context
//! ([`VolumeContext`]), the `nbd://` URI inside the first ([`NbdUri`]) and
//! the StorageClass parameters the controller accepts
//! ([`StorageClassParameters`]).
//!
//! Whether a volume requires TLS is the URI's scheme: `nbds://` (TLS:
//! NBD_OPT_STARTTLS, then the TLS handshake with the node's certificate,
//! then the export) or `nbd://` (plaintext, the default), as libnbd and
//! qemu spell it. The scheme rather than a separate publish_context key:
//! the URI is what the node records in its state file and reconnects from
//! when healing, so the requirement travels with it and can never disagree
//! with it; the string works as is with `nbdinfo` for debugging; and a node
//! plugin older than TLS refuses an `nbds://` URI (unknown scheme) instead
//! of attaching in plaintext.
//!
//! The key names and value spellings are a wire format: PersistentVolumes
//! and VolumeAttachments already in a cluster carry them, so they never
//! change. Keys a reader does not know are ignored (contexts written by
//! older controllers carry `multiConn`, which nothing reads: the node
//! decides how many connections to open from the server's CAN_MULTI_CONN
//! flag at the handshake, never from the context).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;

use nbd::consts::limits::MAX_STRING_LEN;
use nbd::consts::magic::DEFAULT_PORT;

/// publish_context keys (ControllerPublishVolume → NodeStageVolume).
pub mod publish_key {
    /// The export to attach: an [`NbdUri`](super::NbdUri).
    pub const NBD_URI: &str = "nbdUri";
    /// `"true"` when the publication is read-only; absent means `"false"`.
    pub const READ_ONLY: &str = "readOnly";
}

/// volume_context keys (CreateVolume, ControllerGetVolume, ListVolumes).
pub mod volume_key {
    /// The name the volume was created with, for operators.
    pub const NAME: &str = "name";
    /// `"block"` or `"mount"`.
    pub const ACCESS_TYPE: &str = "accessType";
    /// The filesystem a mount volume was created for; absent when the
    /// capability named none.
    pub const FS_TYPE: &str = "fsType";
}

/// The scheme of a plaintext export's `nbdUri`.
pub const NBD_SCHEME: &str = "nbd://";
/// The scheme of an export that requires TLS (libnbd's spelling).
pub const NBDS_SCHEME: &str = "nbds://";
/// Longest `nbdUri` accepted: a whole export name (the NBD protocol caps it
/// at 4096 bytes), every byte percent-encoded, plus the authority. Longer
/// input is refused before anything is allocated for it.
pub const MAX_URI_LEN: usize = NBDS_SCHEME.len() + 300 + 3 * MAX_STRING_LEN as usize;

/// Why a string is not an `nbd://` (or `nbds://`) URI. No variant carries the export name:
/// it is the volume's secret token, and these errors reach logs and events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("not an nbd:// or nbds:// URI (it starts with {0:?})")]
    Scheme(String),
    #[error("URI is {0} bytes long, more than {MAX_URI_LEN}")]
    TooLong(usize),
    #[error("bad host {0:?} (IPv6 addresses go in brackets)")]
    Host(String),
    #[error("bad port {0:?}")]
    Port(String),
    #[error("bad percent-encoding in the export name")]
    Escape,
    #[error("export name is longer than {MAX_STRING_LEN} bytes")]
    ExportTooLong,
}

/// Where an export lives and what it is called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// A DNS name or an IP address; IPv6 without brackets.
    pub host: String,
    pub port: u16,
    /// The export name, decoded (the volume's secret token).
    pub export: String,
    /// The export requires TLS (`nbds://`): every connection starts TLS
    /// before anything else, and never falls back to plaintext.
    pub tls: bool,
}

impl NbdUri {
    /// The URI of `export` served at `addr`, in plaintext.
    pub fn new(addr: SocketAddr, export: impl Into<String>) -> Self {
        Self { host: addr.ip().to_string(), port: addr.port(), export: export.into(), tls: false }
    }

    /// The same export, requiring TLS or not.
    pub fn with_tls(self, tls: bool) -> Self {
        Self { tls, ..self }
    }

    /// Parses the TCP forms of the NBD URI standard, `nbd://` and `nbds://`
    /// (TLS), with IPv6 hosts in brackets and a percent-encoded export name.
    /// A query or fragment is ignored (libnbd's `tls-certificates` and the
    /// like: the node's certificates come from its own flags); a missing
    /// port is the NBD default, 10809.
    pub fn parse(uri: &str) -> Result<Self, UriError> {
        if uri.len() > MAX_URI_LEN {
            return Err(UriError::TooLong(uri.len()));
        }
        let (rest, tls) = match (uri.strip_prefix(NBD_SCHEME), uri.strip_prefix(NBDS_SCHEME)) {
            (Some(rest), _) => (rest, false),
            (None, Some(rest)) => (rest, true),
            (None, None) => {
                let start: String = uri.chars().take(NBDS_SCHEME.len()).collect();
                return Err(UriError::Scheme(start));
            }
        };
        let rest = rest.split(['?', '#']).next().unwrap_or_default();
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| UriError::Host(authority.into()))?;
            match after {
                "" => (host, None),
                _ => (host, Some(after.strip_prefix(':').ok_or_else(|| UriError::Port(after.into()))?)),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() || (host.contains(':') && !authority.starts_with('[')) {
            return Err(UriError::Host(host.into()));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => p.parse().ok().filter(|&p| p != 0).ok_or_else(|| UriError::Port(p.into()))?,
        };
        let export = percent_decode(path).ok_or(UriError::Escape)?;
        if export.len() > MAX_STRING_LEN as usize {
            return Err(UriError::ExportTooLong);
        }
        Ok(Self { host: host.to_owned(), port, export, tls })
    }

    /// `host:port` for connecting, brackets kept for IPv6.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The whole URI, export name included, as [`parse`](Self::parse) reads
    /// it back. Only for the publish_context: use `Display` for logs.
    pub fn to_uri_string(&self) -> String {
        format!("{}{}/{}", self.scheme(), self.authority(), percent_encode(&self.export))
    }

    /// `nbds://` when the export requires TLS, else `nbd://`.
    pub fn scheme(&self) -> &'static str {
        if self.tls { NBDS_SCHEME } else { NBD_SCHEME }
    }
}

impl fmt::Display for NbdUri {
    /// Shows the URI without the export name, which is a secret token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}/<export>", self.scheme(), self.authority())
    }
}

/// Every byte but RFC 3986's unreserved characters as `%XX`: the export
/// names the controller makes (hex) come out unchanged.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Why a context map is not what the controller writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("{context} has no {key}")]
    Missing { context: &'static str, key: &'static str },
    #[error("{context} {key} is {value:?}, expected {expected}")]
    Bad { context: &'static str, key: &'static str, value: String, expected: &'static str },
    #[error("publish_context nbdUri: {0}")]
    Uri(#[from] UriError),
}

const PUBLISH_CONTEXT: &str = "publish_context";
const VOLUME_CONTEXT: &str = "volume_context";

fn get<'a>(
    map: &'a HashMap<String, String>,
    context: &'static str,
    key: &'static str,
) -> Result<&'a str, ContextError> {
    map.get(key).map(String::as_str).ok_or(ContextError::Missing { context, key })
}

/// What ControllerPublishVolume returns and NodeStageVolume attaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishContext {
    pub nbd_uri: NbdUri,
    /// The export gives this node a READ_ONLY session; the node mounts
    /// read-only too.
    pub read_only: bool,
}

impl PublishContext {
    pub fn to_map(&self) -> HashMap<String, String> {
        HashMap::from([
            (publish_key::NBD_URI.to_owned(), self.nbd_uri.to_uri_string()),
            (publish_key::READ_ONLY.to_owned(), self.read_only.to_string()),
        ])
    }
}

impl TryFrom<&HashMap<String, String>> for PublishContext {
    type Error = ContextError;

    fn try_from(map: &HashMap<String, String>) -> Result<Self, ContextError> {
        let nbd_uri = NbdUri::parse(get(map, PUBLISH_CONTEXT, publish_key::NBD_URI)?)?;
        // Absent only in contexts made by hand (every controller writes it);
        // the export enforces read-only access either way.
        let read_only = match map.get(publish_key::READ_ONLY).map(String::as_str) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(ContextError::Bad {
                    context: PUBLISH_CONTEXT,
                    key: publish_key::READ_ONLY,
                    value: other.to_owned(),
                    expected: "\"true\" or \"false\"",
                });
            }
        };
        Ok(Self { nbd_uri, read_only })
    }
}

/// How a volume is used, fixed when it is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeAccess {
    Block,
    /// `fs_type` is empty when the capability named no filesystem.
    Mount {
        fs_type: String,
    },
}

impl VolumeAccess {
    const BLOCK: &str = "block";
    const MOUNT: &str = "mount";

    /// The `accessType` value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Block => Self::BLOCK,
            Self::Mount { .. } => Self::MOUNT,
        }
    }
}

/// What the node plugin and operators learn about a volume (never its
/// export name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeContext {
    pub name: String,
    pub access: VolumeAccess,
}

impl VolumeContext {
    pub fn to_map(&self) -> HashMap<String, String> {
        let mut map = HashMap::from([
            (volume_key::NAME.to_owned(), self.name.clone()),
            (volume_key::ACCESS_TYPE.to_owned(), self.access.as_str().to_owned()),
        ]);
        if let VolumeAccess::Mount { fs_type } = &self.access
            && !fs_type.is_empty()
        {
            map.insert(volume_key::FS_TYPE.to_owned(), fs_type.clone());
        }
        map
    }
}

impl TryFrom<&HashMap<String, String>> for VolumeContext {
    type Error = ContextError;

    fn try_from(map: &HashMap<String, String>) -> Result<Self, ContextError> {
        let name = get(map, VOLUME_CONTEXT, volume_key::NAME)?.to_owned();
        let fs_type = map.get(volume_key::FS_TYPE);
        let access = match get(map, VOLUME_CONTEXT, volume_key::ACCESS_TYPE)? {
            VolumeAccess::BLOCK => match fs_type {
                None => VolumeAccess::Block,
                Some(fs) => {
                    return Err(ContextError::Bad {
                        context: VOLUME_CONTEXT,
                        key: volume_key::FS_TYPE,
                        value: fs.clone(),
                        expected: "no filesystem on a block volume",
                    });
                }
            },
            VolumeAccess::MOUNT => VolumeAccess::Mount { fs_type: fs_type.cloned().unwrap_or_default() },
            other => {
                return Err(ContextError::Bad {
                    context: VOLUME_CONTEXT,
                    key: volume_key::ACCESS_TYPE,
                    value: other.to_owned(),
                    expected: "\"block\" or \"mount\"",
                });
            }
        };
        Ok(Self { name, access })
    }
}

/// Prefix of the StorageClass parameters the Kubernetes sidecars reserve
/// for themselves (`csi.storage.k8s.io/fstype`, the secret references, the
/// PVC name and namespace): accepted and ignored.
pub const RESERVED_PARAMETER_PREFIX: &str = "csi.storage.k8s.io/";

/// StorageClass parameter keys the driver defines.
pub mod parameter_key {
    /// Restricts where a volume may be placed in cluster mode: storage
    /// nodes whose Node carries every `key=value` label of this
    /// comma-separated list.
    pub const STORAGE_NODE_SELECTOR: &str = "storageNodeSelector";
    /// Whether the volume's export speaks TLS: a [`VolumeTls`](super::VolumeTls).
    pub const TLS: &str = "tls";
}

/// The StorageClass parameter `tls`: whether a volume's NBD export speaks
/// TLS (NBD_OPT_STARTTLS), fixed when the volume is created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum VolumeTls {
    /// Plaintext only: the `nbdUri` is `nbd://` and STARTTLS is refused.
    #[default]
    Off,
    /// Either: the `nbdUri` stays `nbd://` (the node attaches in
    /// plaintext), while a client may start TLS.
    Allowed,
    /// TLS only: the `nbdUri` is `nbds://`, the node attaches over kernel
    /// TLS, and the export admits nodes by the name in their certificate.
    Required,
}

impl VolumeTls {
    /// Every value, in the order the error message names them.
    pub const ALL: [Self; 3] = [Self::Off, Self::Allowed, Self::Required];

    /// The parameter's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Allowed => "allowed",
            Self::Required => "required",
        }
    }

    /// The spelling of `value`, if it is one.
    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == value)
    }
}

impl fmt::Display for VolumeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// StorageClass (and VolumeSnapshotClass) parameters. The driver defines
/// [`parameter_key::STORAGE_NODE_SELECTOR`] and [`parameter_key::TLS`];
/// any other key outside [`RESERVED_PARAMETER_PREFIX`] is refused rather
/// than silently ignored. The selector is kept as written (the controller,
/// which places volumes, parses it); `tls` is parsed here, once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StorageClassParameters {
    pub storage_node_selector: Option<String>,
    /// `None` when the class does not say: the controller's default applies.
    pub tls: Option<VolumeTls>,
}

/// Why parameters are not what the driver accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParameterError {
    /// Parameters the driver does not define, sorted.
    #[error("unknown parameters: {}", .0.join(", "))]
    Unknown(Vec<String>),
    #[error("parameter {key} is {value:?}, expected one of {expected}")]
    Bad { key: &'static str, value: String, expected: String },
}

impl TryFrom<&HashMap<String, String>> for StorageClassParameters {
    type Error = ParameterError;

    fn try_from(map: &HashMap<String, String>) -> Result<Self, ParameterError> {
        let known = [parameter_key::STORAGE_NODE_SELECTOR, parameter_key::TLS];
        let mut unknown: Vec<String> = map
            .keys()
            .filter(|k| !k.starts_with(RESERVED_PARAMETER_PREFIX) && !known.contains(&k.as_str()))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            unknown.sort_unstable();
            return Err(ParameterError::Unknown(unknown));
        }
        let tls = match map.get(parameter_key::TLS) {
            None => None,
            Some(value) => Some(VolumeTls::parse(value).ok_or_else(|| ParameterError::Bad {
                key: parameter_key::TLS,
                value: value.clone(),
                expected: VolumeTls::ALL.map(VolumeTls::as_str).join(", "),
            })?),
        };
        Ok(Self { storage_node_selector: map.get(parameter_key::STORAGE_NODE_SELECTOR).cloned(), tls })
    }
}

#[cfg(test)]
mod tests;
