//! `NbdStorageNode`: one per agent, named after the Node it runs on, and
//! written by that agent alone: where its NBD servers listen (spec, set at
//! start from its flags) and how much room it has (status, refreshed).
//! Whether the agent is alive is not here but in a Lease it renews, so a
//! heartbeat does not rewrite this object.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::Condition;
use super::invalid::{InvalidObject, check_node_name};

// Several printer columns share a type: clippy reads the derive's
// `type_ = "integer"` arguments as repeated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[kube(
    group = "nbd.csi.dev",
    derive = "PartialEq",
    version = "v1alpha1",
    kind = "NbdStorageNode",
    status = "NbdStorageNodeStatus",
    shortname = "nbdnode",
    category = "nbd-csi",
    doc = "A storage node of nbd-csi, named after its Node and written by its agent.",
    printcolumn(name = "Address", type_ = "string", json_path = ".spec.address"),
    printcolumn(name = "Free", type_ = "integer", json_path = ".status.freeBytes"),
    printcolumn(name = "Total", type_ = "integer", json_path = ".status.totalBytes"),
    printcolumn(name = "TLS", type_ = "boolean", json_path = ".status.servesTls"),
    printcolumn(name = "Version", type_ = "string", json_path = ".status.agentVersion", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct NbdStorageNodeSpec {
    /// The IP address nodes reach its NBD servers at.
    #[schemars(length(min = 2, max = 45))]
    pub address: String,
    /// The ports its NBD servers take.
    pub ports: PortRange,
}

/// An inclusive port range, first not after last.
#[derive(KubeSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("self.first <= self.last").message("the first port comes before the last"))]
pub struct PortRange {
    #[schemars(range(min = 1))]
    pub first: u16,
    #[schemars(range(min = 1))]
    pub last: u16,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NbdStorageNodeStatus {
    /// Bytes of the data directory's filesystem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    /// Bytes still free there for new volumes and growth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
    /// The agent's version.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_version: String,
    /// Whether its TLS certificates load, so that it can serve volumes
    /// whose export speaks TLS; placement gives those only to such nodes.
    #[serde(default)]
    pub serves_tls: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

impl NbdStorageNode {
    /// Where its servers listen, checked: the name is a Node name, the
    /// address an IP address, the port range ordered and without port 0.
    pub fn endpoint(&self) -> Result<(std::net::IpAddr, std::ops::RangeInclusive<u16>), InvalidObject> {
        let bad = |problem: String| InvalidObject::of(self, problem);
        check_node_name("metadata.name", self.metadata.name.as_deref().unwrap_or_default()).map_err(bad)?;
        let address = self
            .spec
            .address
            .parse()
            .map_err(|_| bad(format!("spec.address {:?} is not an IP address", self.spec.address)))?;
        let PortRange { first, last } = self.spec.ports;
        if first == 0 || first > last {
            return Err(bad(format!("spec.ports {first}-{last} is not an ordered range of non-zero ports")));
        }
        Ok((address, first..=last))
    }
}
