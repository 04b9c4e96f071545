//! The Kubernetes-facing contract of the agent: the custom resources
//! through which the controller says what should be and an agent says what
//! is, in group [`GROUP`], version [`VERSION`], all cluster-scoped.
//!
//! - [`NbdStorageNode`]: one per agent, named after its Node; where its NBD
//!   servers listen (spec) and how much room it has (status).
//! - [`NbdVolume`]: named after the volume id; the controller writes the
//!   spec (storage node, size, source, the nodes it is published to), the
//!   agent of that storage node makes its disk and servers match and
//!   writes the status (phase, port, size, conditions).
//! - [`NbdSnapshot`]: likewise, named after the snapshot id.
//!
//! Nothing here reaches the store or the servers directly: the agent's core
//! stays free of Kubernetes, and this module (the `kubernetes` feature)
//! only translates between objects and the [`Agent`](crate::Agent)'s
//! operations. An object is checked twice: by the API server against the
//! schema in the CRD (cheap rules: sizes, patterns, ordered port ranges)
//! and in Rust when it is read ([`NbdVolume::desired`] and its siblings),
//! so that an object written before a rule existed, or edited by hand past
//! it, gives a clear [`InvalidObject`] instead of a panic.
//!
//! An agent in a cluster runs a [`Reconciler`]: it watches the objects of
//! its storage node, makes its disk match them (deciding through [`plan`])
//! and writes their status; it never deletes data because an object is
//! missing. It also writes its own NbdStorageNode and renews a Lease that
//! says it is alive ([`Reconciler::keep_present`]).
//!
//! No object ever carries a volume's export name, the secret that lets a
//! client attach it: in a cluster both roles derive it from a key they
//! mount ([`ExportKey`]).

mod access_mode;
mod condition;
mod crds;
mod export_name;
mod invalid;
mod nodes;
pub mod plan;
mod presence;
mod raw;
mod reconciler;
mod snapshot;
mod storage_node;
mod volume;

pub use access_mode::AccessMode;
pub use condition::{Condition, ConditionStatus, ConditionType};
pub use crds::{CRD_FILE, crds, crds_yaml};
pub use export_name::{ExportKey, KeyError};
pub use invalid::{InvalidObject, is_node_name, parse};
pub use nodes::{LookupError, NodeDirectory, addresses_of, has_taint};
pub use presence::{FIELD_MANAGER, LEASE_DURATION, LEASE_RENEWAL};
pub use raw::{RawSnapshot, RawVolume};
pub use reconciler::{FINALIZER, ReconcileError, Reconciler};
pub use snapshot::{DesiredSnapshot, NbdSnapshot, NbdSnapshotSpec, NbdSnapshotStatus, SnapshotPhase};
pub use storage_node::{NbdStorageNode, NbdStorageNodeSpec, NbdStorageNodeStatus, PortRange};
pub use volume::{
    AccessType, DesiredVolume, NbdVolume, NbdVolumeSpec, NbdVolumeStatus, PublishedTo, VolumePhase, VolumeSource,
};

/// The API group of every resource here.
pub const GROUP: &str = "nbd.csi.dev";
/// Their one version so far; fields may still change.
pub const VERSION: &str = "v1alpha1";

#[cfg(test)]
mod reconciler_tests;
#[cfg(test)]
mod tests;
