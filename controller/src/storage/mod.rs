//! Where volumes live, behind the CSI layer: the seam between the CSI
//! services (`csi/`: validation, idempotency, error codes) and a storage
//! backend.
//!
//! - [`Storage::Embedded`], the default: one in-process [`Agent`] on the
//!   controller's data directory, driven directly (today's behaviour; no
//!   Kubernetes needed).
//! - [`Storage::Cluster`] (`--storage-mode cluster`): agents on storage
//!   nodes, driven through NbdVolume and NbdSnapshot objects; the
//!   controller only places volumes and writes specs ([`Cluster`]).
//!
//! An enum rather than a trait: there are exactly two backends, both known
//! here, and their operations differ in shape (the embedded one holds
//! records, per-object locks and fences in process and answers at once;
//! the cluster one writes objects and waits for an agent's status), so one
//! trait would either be as wide as both or force one shape on the other.
//! Each RPC matches on the backend exhaustively, which keeps what it does
//! in each mode side by side, with no boxed async calls.

mod cluster;
mod export_key;
mod in_flight;
pub mod objects;
pub mod placement;
mod watched;

use std::sync::Arc;

use agent::Agent;

pub use cluster::Cluster;
pub use export_key::load_or_create as load_export_key;

/// The field manager of every object the controller writes.
pub const FIELD_MANAGER: &str = "nbd-csi-controller";

/// `--storage-mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum StorageMode {
    /// One in-process agent on --data-dir; no Kubernetes needed.
    #[default]
    Embedded,
    /// Agents on storage nodes, driven through nbd.csi.dev objects; needs
    /// Kubernetes and the nbd-csi-controller agent DaemonSet.
    Cluster,
}

impl std::fmt::Display for StorageMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Embedded => "embedded",
            Self::Cluster => "cluster",
        })
    }
}

/// The backend the CSI services drive.
#[derive(Debug)]
pub enum Storage {
    Embedded(Arc<Agent>),
    Cluster(Box<Cluster>),
}
