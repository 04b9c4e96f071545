//! `NbdSnapshot`: one snapshot, named after its id, cut from a volume on
//! the same storage node. Its spec never changes once written.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::Condition;
use super::invalid::{InvalidObject, MAX_NODE_NAME, NODE_NAME_PATTERN, check_node_name};
use crate::store;
use crate::store::ExportTls;

#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[kube(
    group = "nbd.csi.dev",
    derive = "PartialEq",
    version = "v1alpha1",
    kind = "NbdSnapshot",
    status = "NbdSnapshotStatus",
    shortname = "nbdsnap",
    category = "nbd-csi",
    doc = "A snapshot of an nbd-csi volume, named after its id: the controller writes the spec, the agent of spec.storageNode the status.",
    selectable = ".spec.storageNode",
    validation = Rule::new("self.metadata.name.matches('^snap-[0-9a-f]{32}$')").message("the name is the snapshot id: snap- and 32 hex digits"),
    printcolumn(name = "Storage node", type_ = "string", json_path = ".spec.storageNode"),
    printcolumn(name = "Source", type_ = "string", json_path = ".spec.sourceVolume"),
    printcolumn(name = "Size", type_ = "integer", json_path = ".status.sizeBytes"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("a snapshot's spec never changes"))]
#[serde(rename_all = "camelCase")]
pub struct NbdSnapshotSpec {
    /// The storage node holding the source volume, and so the snapshot.
    #[schemars(length(min = 1, max = MAX_NODE_NAME), regex(pattern = NODE_NAME_PATTERN))]
    pub storage_node: String,
    /// The name it was asked for under (the CSI request name).
    #[schemars(length(max = 1024))]
    pub request_name: String,
    /// The volume id (`vol-…`) it is cut from.
    #[schemars(regex(pattern = r"^vol-[0-9a-f]{32}$"))]
    pub source_volume: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NbdSnapshotStatus {
    #[serde(default)]
    pub phase: SnapshotPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Its size: the source's when it was cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// When it was cut (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub created_at: Option<String>,
    /// Whether the source was a block volume (its content is then never
    /// restored as a filesystem volume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_block: Option<bool>,
    /// The source volume's TLS mode, which a restore keeps at least.
    #[serde(default, skip_serializing_if = "ExportTls::is_off")]
    pub source_tls: ExportTls,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SnapshotPhase {
    #[default]
    Pending,
    /// Cut and stored: volumes can be restored from it.
    Ready,
    /// It could not be cut (its source is missing, say); the conditions
    /// say why.
    Failed,
    /// The spec cannot be acted on; the Valid condition names the field.
    Invalid,
    Deleting,
}

/// An [`NbdSnapshot`]'s spec, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredSnapshot {
    pub id: String,
    pub generation: Option<i64>,
    pub storage_node: String,
    pub request_name: String,
    pub source_volume: String,
    pub parameters: BTreeMap<String, String>,
}

impl NbdSnapshot {
    /// The spec, checked again here (see [`NbdVolume::desired`](super::NbdVolume::desired)).
    pub fn desired(&self) -> Result<DesiredSnapshot, InvalidObject> {
        let bad = |problem: String| InvalidObject::of(self, problem);
        let id = self.metadata.name.clone().unwrap_or_default();
        if !store::is_snapshot_id(&id) {
            return Err(bad("metadata.name is not a snapshot id (snap- and 32 hex digits)".into()));
        }
        check_node_name("spec.storageNode", &self.spec.storage_node).map_err(bad)?;
        if !store::is_volume_id(&self.spec.source_volume) {
            return Err(bad(format!("spec.sourceVolume {:?} is not a volume id", self.spec.source_volume)));
        }
        Ok(DesiredSnapshot {
            id,
            generation: self.metadata.generation,
            storage_node: self.spec.storage_node.clone(),
            request_name: self.spec.request_name.clone(),
            source_volume: self.spec.source_volume.clone(),
            parameters: self.spec.parameters.clone(),
        })
    }
}
