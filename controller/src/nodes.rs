//! Which nodes exist and which addresses they connect from.
//!
//! With Kubernetes access (in-cluster config or `--kubeconfig`) a node id is
//! the name of a Node object and its `status.addresses` are the only peers an
//! export published to it accepts. Without it, an optional static list says
//! which node ids exist, and any address may connect (the export name is
//! then the only guard).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use agent::resources::{NodeDirectory, addresses_of, has_taint};

use crate::error::{Error, Kind, Result};

/// The taint of Kubernetes' non-graceful node shutdown: an admin says the
/// node is gone, and Kubernetes removes its pods and VolumeAttachments
/// without waiting for it. Detaching a volume from such a node fences it.
pub const OUT_OF_SERVICE: &str = "node.kubernetes.io/out-of-service";

/// Peers a node may connect from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAddresses {
    Any,
    Only(BTreeSet<IpAddr>),
}

#[derive(Clone)]
pub enum Nodes {
    /// The API server's client, and the Nodes as read through it.
    Kubernetes(kube::Client, Arc<NodeDirectory>),
    /// Node ids that exist; empty means any id is accepted.
    Static(BTreeSet<String>),
}

impl std::fmt::Debug for Nodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Kubernetes(..) => f.write_str("Nodes::Kubernetes"),
            Self::Static(ids) => f.debug_tuple("Nodes::Static").field(ids).finish(),
        }
    }
}

impl Nodes {
    /// Kubernetes from `kubeconfig`, else in-cluster when running in a pod,
    /// else the static list.
    pub async fn connect(kubeconfig: Option<&Path>, known_nodes: BTreeSet<String>) -> Result<Self> {
        match csi_events::client(kubeconfig).await.map_err(Error::invalid)? {
            Some(client) => Ok(Self::Kubernetes(client.clone(), Arc::new(NodeDirectory::watched(client)))),
            None => Ok(Self::Static(known_nodes)),
        }
    }

    /// Kubernetes through `client`, every Node read when asked for (no
    /// watch): for tests that answer each request.
    #[cfg(test)]
    pub fn unwatched(client: kube::Client) -> Self {
        Self::Kubernetes(client.clone(), Arc::new(NodeDirectory::unwatched(client)))
    }

    pub fn uses_kubernetes(&self) -> bool {
        matches!(self, Self::Kubernetes(..))
    }

    /// Whether Node `node_id` carries the [`OUT_OF_SERVICE`] taint; false
    /// without Kubernetes, for a Node that is gone, or when it cannot be read
    /// (this only decides whether to report a fencing).
    pub async fn out_of_service(&self, node_id: &str) -> bool {
        let Self::Kubernetes(_, nodes) = self else { return false };
        match nodes.node(node_id).await {
            Ok(node) => node.is_some_and(|n| has_taint(&n, OUT_OF_SERVICE)),
            Err(e) => {
                tracing::warn!(node.id = %node_id, error = %e, "reading the node's taints failed");
                false
            }
        }
    }

    /// The addresses of `node_id`; NOT_FOUND when there is no such node.
    pub async fn addresses(&self, node_id: &str) -> Result<NodeAddresses> {
        match self {
            Self::Static(ids) if ids.is_empty() || ids.contains(node_id) => Ok(NodeAddresses::Any),
            Self::Static(_) => Err(Error::not_found(format!("node {node_id:?} is not a known node"))),
            Self::Kubernetes(_, nodes) => match nodes.node(node_id).await {
                Ok(Some(node)) => Ok(NodeAddresses::Only(addresses_of(&node))),
                Ok(None) => Err(Error::not_found(format!("node {node_id:?} does not exist"))),
                Err(e) => {
                    Err(Error::new(Kind::Unavailable, format!("looking up node {node_id:?}: {e}")).with_source(e))
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use csi_events::mock_api::{self, reply};
    use http::StatusCode;

    fn mock() -> (kube::Client, mock_api::ApiHandle) {
        mock_api::client()
    }

    #[tokio::test]
    async fn node_addresses_come_from_the_node_status() {
        let (client, mut handle) = mock();
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("one request");
            assert_eq!(request.method(), http::Method::GET);
            assert_eq!(request.uri().path(), "/api/v1/nodes/worker-1");
            let node = serde_json::json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "worker-1"},
                "status": {"addresses": [
                    {"type": "InternalIP", "address": "10.0.0.7"},
                    {"type": "InternalIP", "address": "fd00::7"},
                    {"type": "Hostname", "address": "worker-1"}
                ]}
            });
            reply(send, StatusCode::OK, &node);
        });
        let got = Nodes::unwatched(client).addresses("worker-1").await.unwrap();
        let want: BTreeSet<IpAddr> = ["10.0.0.7".parse().unwrap(), "fd00::7".parse().unwrap()].into();
        assert_eq!(got, NodeAddresses::Only(want));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn missing_node_is_not_found() {
        let (client, mut handle) = mock();
        let server = tokio::spawn(async move {
            let (_, send) = handle.next_request().await.expect("one request");
            reply(send, StatusCode::NOT_FOUND, &mock_api::status(404, "NotFound", "nodes \"ghost\" not found"));
        });
        let err = Nodes::unwatched(client).addresses("ghost").await.unwrap_err();
        assert_eq!(err.kind(), Kind::NotFound);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn static_list_decides_existence_without_kubernetes() {
        let open = Nodes::Static(BTreeSet::new());
        assert_eq!(open.addresses("anything").await.unwrap(), NodeAddresses::Any);
        let listed = Nodes::Static(["n1".to_string()].into());
        assert_eq!(listed.addresses("n1").await.unwrap(), NodeAddresses::Any);
        assert_eq!(listed.addresses("n2").await.unwrap_err().kind(), Kind::NotFound);
    }
}
