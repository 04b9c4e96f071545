//! `NbdVolume`: one volume, named after its id. The controller writes the
//! spec; the agent of `spec.storageNode` makes its disk and servers match
//! and writes the status.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::access_mode::AccessMode;
use super::condition::Condition;
use super::invalid::{InvalidObject, MAX_NODE_NAME, NODE_NAME_PATTERN, check_node_name};
use crate::store::{self, ExportTls, Source};

/// What the volume should be.
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[kube(
    group = "nbd.csi.dev",
    derive = "PartialEq",
    version = "v1alpha1",
    kind = "NbdVolume",
    status = "NbdVolumeStatus",
    shortname = "nbdvol",
    category = "nbd-csi",
    doc = "A volume of nbd-csi, named after its id: the controller writes the spec, the agent of spec.storageNode the status.",
    selectable = ".spec.storageNode",
    validation = Rule::new("self.metadata.name.matches('^vol-[0-9a-f]{32}$')").message("the name is the volume id: vol- and 32 hex digits"),
    printcolumn(name = "Storage node", type_ = "string", json_path = ".spec.storageNode"),
    printcolumn(name = "Size", type_ = "integer", json_path = ".spec.sizeBytes"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Port", type_ = "integer", json_path = ".status.port", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("self.sizeBytes >= oldSelf.sizeBytes").message("a volume never shrinks"))]
// On the spec, not the field: an absent `tls` is off, and a rule on the
// field would not run when it is added or removed.
#[x_kube(
    validation = Rule::new("(has(self.tls) ? self.tls : 'off') == (has(oldSelf.tls) ? oldSelf.tls : 'off')")
        .message("a volume's TLS mode never changes")
)]
#[serde(rename_all = "camelCase")]
pub struct NbdVolumeSpec {
    /// The storage node (its NbdStorageNode and Node name) whose agent
    /// holds the data. Never changes: data does not move.
    #[schemars(length(min = 1, max = MAX_NODE_NAME), regex(pattern = NODE_NAME_PATTERN))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("a volume stays on its storage node"))]
    pub storage_node: String,
    /// The name the volume was asked for under (the CSI request name).
    #[schemars(length(max = 1024))]
    pub request_name: String,
    /// Size in bytes; grows, never shrinks.
    #[schemars(range(min = 1))]
    pub size_bytes: u64,
    /// Raw block device, or a filesystem the node formats.
    pub access_type: AccessType,
    /// The filesystem a mount volume is for; empty for the node's default.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 64))]
    pub fs_type: String,
    /// The access modes it was created for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access_modes: Vec<AccessMode>,
    /// Every export of it refuses writes.
    #[serde(default)]
    pub read_only: bool,
    /// The StorageClass parameters it was created with.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
    /// Content to start from; never changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("a volume's source never changes"))]
    pub source: Option<VolumeSource>,
    /// Whether its export speaks TLS (`off`, `allowed`, `required`; absent:
    /// off); never changes. With `required` the agent admits the published nodes by the
    /// node name in their client certificate instead of their addresses.
    #[serde(default, skip_serializing_if = "ExportTls::is_off")]
    pub tls: ExportTls,
    /// The nodes that may attach it, one entry per node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub published_to: Vec<PublishedTo>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AccessType {
    Block,
    Mount,
}

/// Where a new volume's content comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum VolumeSource {
    /// A snapshot id (`snap-…`) on the same storage node.
    Snapshot(String),
    /// A volume id (`vol-…`) on the same storage node: a point-in-time copy.
    Volume(String),
}

/// One node a volume is published to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublishedTo {
    /// The Node's name; its addresses are the only peers admitted.
    #[schemars(length(min = 1, max = MAX_NODE_NAME), regex(pattern = NODE_NAME_PATTERN))]
    pub node: String,
    #[serde(default)]
    pub read_only: bool,
    /// The access mode it was published with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_mode: Option<AccessMode>,
}

/// What the agent made of the spec. A writer of the spec waits for
/// `observedGeneration` to reach the object's `metadata.generation` with
/// the Ready condition True: that generation is then in effect, its access
/// changes fenced included (a Ready False of that generation says why not).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NbdVolumeStatus {
    #[serde(default)]
    pub phase: VolumePhase,
    /// The `metadata.generation` the rest of the status answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The NBD server's port on the storage node's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The size being served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum VolumePhase {
    /// Not acted on yet.
    #[default]
    Pending,
    /// Stored, served and published as the spec says.
    Available,
    /// Stored, but it cannot be served now (its server is down, or its
    /// image is missing); the conditions say why.
    Unavailable,
    /// The spec cannot be acted on; the Valid condition names the field.
    Invalid,
    /// Being deleted.
    Deleting,
}

/// An [`NbdVolume`]'s spec, checked: what the agent acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredVolume {
    pub id: String,
    /// The spec's `metadata.generation`, for `status.observedGeneration`.
    pub generation: Option<i64>,
    pub storage_node: String,
    pub request_name: String,
    pub size_bytes: u64,
    pub block: bool,
    pub fs_type: String,
    /// CSI enum values, as the agent's records keep them.
    pub access_modes: Vec<i32>,
    pub read_only: bool,
    pub parameters: BTreeMap<String, String>,
    pub source: Option<Source>,
    /// Node name to (read-only, CSI access mode value).
    pub published: BTreeMap<String, (bool, i32)>,
    pub tls: ExportTls,
}

impl NbdVolume {
    /// The spec, checked again here (an object may predate a schema rule or
    /// come from elsewhere): the name is a volume id, the size positive,
    /// node names are Node names and unique, a source names an id of its
    /// kind.
    pub fn desired(&self) -> Result<DesiredVolume, InvalidObject> {
        let bad = |problem: String| InvalidObject::of(self, problem);
        let id = self.metadata.name.clone().unwrap_or_default();
        if !store::is_volume_id(&id) {
            return Err(bad("metadata.name is not a volume id (vol- and 32 hex digits)".into()));
        }
        let spec = &self.spec;
        check_node_name("spec.storageNode", &spec.storage_node).map_err(bad)?;
        if spec.size_bytes == 0 {
            return Err(bad("spec.sizeBytes must be at least 1".into()));
        }
        let source = match &spec.source {
            None => None,
            Some(VolumeSource::Snapshot(s)) if store::is_snapshot_id(s) => Some(Source::Snapshot(s.clone())),
            Some(VolumeSource::Volume(v)) if store::is_volume_id(v) && *v != id => Some(Source::Volume(v.clone())),
            Some(other) => {
                return Err(bad(format!("spec.source {other:?} does not name another volume or a snapshot")));
            }
        };
        let mut published = BTreeMap::new();
        for (i, p) in spec.published_to.iter().enumerate() {
            check_node_name(&format!("spec.publishedTo[{i}].node"), &p.node).map_err(bad)?;
            let mode = p.access_mode.map_or(0, AccessMode::csi_value);
            if published.insert(p.node.clone(), (p.read_only, mode)).is_some() {
                return Err(bad(format!("spec.publishedTo lists node {:?} twice", p.node)));
            }
        }
        Ok(DesiredVolume {
            id,
            generation: self.metadata.generation,
            storage_node: spec.storage_node.clone(),
            request_name: spec.request_name.clone(),
            size_bytes: spec.size_bytes,
            block: spec.access_type == AccessType::Block,
            fs_type: spec.fs_type.clone(),
            access_modes: spec.access_modes.iter().map(|m| m.csi_value()).collect(),
            read_only: spec.read_only,
            parameters: spec.parameters.clone(),
            source,
            published,
            tls: spec.tls,
        })
    }
}
