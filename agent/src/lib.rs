//! `nbd-csi-agent`: the storage role of nbd-csi as a library. It owns a
//! data directory, the store (sparse image files with crash-safe JSON
//! records), and one NBD server per published volume, and changes them when
//! told what should be: create, clone, restore, grow and delete volumes,
//! take and delete snapshots, set which nodes may connect to a volume.
//!
//! Its core (the [`Agent`], the store, the servers) knows nothing of CSI,
//! gRPC or Kubernetes: the controller drives one in-process [`Agent`]
//! directly (the embedded default, no cluster needed) and maps its
//! [`Error`] kinds to gRPC codes once. With the `kubernetes` feature,
//! `resources` is the Kubernetes-facing contract: the custom resources
//! both roles share, their CRDs, cluster export names; a storage-node
//! process drives the same core from those objects.
//!
//! Public: the [`Agent`] with its configuration and operations, the records
//! it keeps (their on-disk format is the store's), and what metrics read:
//! the export table and the store's [`Usage`]. The store, the state and the volume servers stay private:
//! every change goes through the agent, which keeps them in step.

mod access;
mod agent;
mod certificates;
mod error;
mod exports;
pub mod locks;
mod quarantine;
mod report;
#[cfg(feature = "kubernetes")]
pub mod resources;
mod snapshot_ops;
mod state;
mod store;
mod usage;
mod volume_ops;
mod volumes;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use access::AccessChange;
pub use agent::{Agent, Config, REFRESH};
pub use certificates::{CA_FILE, CERT_FILE, KEY_FILE};
pub use error::{Error, Kind, Result};
pub use exports::ExportTable;
pub use report::{LogsOnly, Reporter};
pub use snapshot_ops::NewSnapshot;
pub use state::{Condition, VolumeStatus};
pub use store::reserve::{NAME as RESERVE_FILE, SIZE as RESERVE_SIZE};
pub use store::{
    ExportTls, FORMAT, Publication, QUARANTINE, SnapshotRecord, Source, Space, VolumeRecord, is_snapshot_id,
    is_volume_id,
};
pub use usage::{Usage, VolumeUsage};
pub use volume_ops::NewVolume;
pub use volumes::ConnectionCaps;

#[cfg(test)]
mod tests;
