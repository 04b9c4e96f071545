//! Metadata records, one JSON file per volume and per snapshot.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Bumped when a record's meaning changes; older versions refuse newer records.
pub const FORMAT: u32 = 1;

/// Whether a volume's NBD export speaks TLS, fixed at its creation and
/// kept in its record (and, in a cluster, its NbdVolume's spec). Ordered:
/// a clone or restore is never served with less than its source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "kubernetes", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum ExportTls {
    /// Plaintext: NBD_OPT_STARTTLS is refused; peers are admitted by address.
    #[default]
    Off,
    /// Plaintext, or TLS when the client starts it; peers by address.
    Allowed,
    /// TLS before anything; peers by the node name in their verified
    /// client certificate, from any address.
    Required,
}

impl ExportTls {
    pub fn is_off(&self) -> bool {
        *self == Self::Off
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Snapshot(String),
    Volume(String),
}

/// One node a volume is published to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    pub read_only: bool,
    /// The CSI access mode (enum value) it was published with.
    pub access_mode: i32,
    /// The node's addresses as last resolved through Kubernetes; `None`
    /// without Kubernetes, where any address may connect.
    #[serde(default)]
    pub addresses: Option<Vec<std::net::IpAddr>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub format: u32,
    pub id: String,
    pub name: String,
    pub capacity_bytes: u64,
    /// Raw block access (true) or a filesystem the node formats (false).
    pub block: bool,
    /// CSI access mode enum values requested at creation.
    pub access_modes: Vec<i32>,
    #[serde(default)]
    pub fs_type: String,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    #[serde(default)]
    pub source: Option<Source>,
    /// The NBD server's port while the volume is published (taken at its
    /// first publication, kept across restarts, given back at its last
    /// unpublication); `None` while it is published nowhere. Older records
    /// kept a port for life: the agent gives back those of unpublished
    /// volumes when it opens the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The export name: a secret per-volume token.
    pub export_name: String,
    /// Every export of this volume refuses writes.
    pub read_only: bool,
    #[serde(default)]
    pub published: BTreeMap<String, Publication>,
    /// Whether its export speaks TLS. Absent in records of volumes made
    /// before TLS (and of plaintext ones): off.
    #[serde(default, skip_serializing_if = "ExportTls::is_off")]
    pub tls: ExportTls,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub format: u32,
    pub id: String,
    pub name: String,
    pub source_volume_id: String,
    pub size_bytes: u64,
    pub created_seconds: i64,
    pub created_nanos: i32,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// Whether the source volume was a block volume, whose user could write
    /// any bytes, a crafted filesystem superblock included: such content is
    /// never restored as a filesystem volume. `None` in records written
    /// before this was kept; the agent fills it in from the source volume
    /// while that still exists; callers treat it as block otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_block: Option<bool>,
    /// The source volume's TLS mode, which a restore keeps at least.
    /// Absent in records of snapshots of plaintext volumes: off.
    #[serde(default, skip_serializing_if = "ExportTls::is_off")]
    pub source_tls: ExportTls,
}
