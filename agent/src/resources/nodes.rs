//! Which addresses a Node connects from (the IP addresses in its
//! `status.addresses`) and whether it is out of service: a volume published
//! to a node admits those peers only; both the controller and the
//! reconciler ask here.
//!
//! Why a watch: every publication, and every pass of the reconciler over a
//! published volume, needs the Node; a GET each time cost a round trip on
//! the path of every ControllerPublishVolume (bench/control-plane.sh). One
//! watch of every Node, cut down to the fields read here, answers from
//! memory. A Node the store lacks (not listed yet, or just registered) is
//! read from the API server, bounded by [`LOOKUP_TIMEOUT`], so an answer
//! never depends on the watch having caught up.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, NodeSpec, NodeStatus};
use kube::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

/// The longest a Node read from the API server may take.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// What a lookup failed with.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("no answer from the API server within {0:?}")]
    TimedOut(Duration),
}

/// The Nodes of the cluster as far as addresses and taints go.
pub struct NodeDirectory {
    client: kube::Client,
    store: Option<Store<Node>>,
    task: Option<JoinHandle<()>>,
}

impl Drop for NodeDirectory {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl std::fmt::Debug for NodeDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeDirectory").field("watched", &self.store.is_some()).finish_non_exhaustive()
    }
}

impl NodeDirectory {
    /// Every lookup reads the API server (nothing is watched).
    pub fn unwatched(client: kube::Client) -> Self {
        Self { client, store: None, task: None }
    }

    /// Watches every Node, keeping only its name, taints and addresses; the
    /// watch restarts itself with backoff after an error.
    pub fn watched(client: kube::Client) -> Self {
        let (store, writer) = reflector::store();
        let events = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .modify(keep_what_is_read)
            .reflect(writer);
        let task = tokio::spawn(async move {
            tokio::pin!(events);
            while let Some(event) = events.next().await {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "watching Nodes failed; it is retried");
                }
            }
        });
        Self { client, store: Some(store), task: Some(task) }
    }

    /// Node `name` (cut down), from the watch when it has it; `None` when
    /// there is no such Node.
    pub async fn node(&self, name: &str) -> Result<Option<Arc<Node>>, LookupError> {
        if let Some(node) = self.store.as_ref().and_then(|s| s.get(&ObjectRef::new(name))) {
            return Ok(Some(node));
        }
        let api: Api<Node> = Api::all(self.client.clone());
        match tokio::time::timeout(LOOKUP_TIMEOUT, api.get_opt(name)).await {
            Ok(found) => Ok(found?.map(Arc::new)),
            Err(_) => Err(LookupError::TimedOut(LOOKUP_TIMEOUT)),
        }
    }

    /// The IP addresses of Node `name`; `None` when there is no such Node.
    pub async fn addresses(&self, name: &str) -> Result<Option<BTreeSet<IpAddr>>, LookupError> {
        Ok(self.node(name).await?.map(|node| addresses_of(&node)))
    }
}

/// The IP addresses in `node`'s status (host names are skipped,
/// IPv4-mapped IPv6 addresses made IPv4).
pub fn addresses_of(node: &Node) -> BTreeSet<IpAddr> {
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_deref()).unwrap_or_default();
    addresses.iter().filter_map(|a| a.address.parse::<IpAddr>().ok()).map(|ip| ip.to_canonical()).collect()
}

/// Whether `node` carries a taint with key `key`.
pub fn has_taint(node: &Node, key: &str) -> bool {
    node.spec.as_ref().and_then(|s| s.taints.as_deref()).is_some_and(|taints| taints.iter().any(|t| t.key == key))
}

/// A Node as the store keeps it: a kubelet's status carries its images
/// and conditions (kilobytes per Node), none of which is read here.
fn keep_what_is_read(node: &mut Node) {
    node.metadata.managed_fields = None;
    node.metadata.annotations = None;
    node.metadata.labels = None;
    node.spec = node.spec.take().map(|s| NodeSpec { taints: s.taints, ..NodeSpec::default() });
    node.status = node.status.take().map(|s| NodeStatus { addresses: s.addresses, ..NodeStatus::default() });
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerImage, NodeAddress, Taint};

    fn node(name: &str, addresses: &[&str]) -> Node {
        let mut node = Node::default();
        node.metadata.name = Some(name.into());
        node.metadata.labels = Some([("kubernetes.io/hostname".to_owned(), name.to_owned())].into());
        node.spec = Some(NodeSpec {
            taints: Some(vec![Taint { key: "node.kubernetes.io/out-of-service".into(), ..Taint::default() }]),
            pod_cidr: Some("10.0.0.0/24".into()),
            ..NodeSpec::default()
        });
        node.status = Some(NodeStatus {
            addresses: Some(
                addresses.iter().map(|a| NodeAddress { type_: "InternalIP".into(), address: (*a).into() }).collect(),
            ),
            images: Some(vec![ContainerImage { names: Some(vec!["big".into()]), size_bytes: Some(1 << 30) }]),
            ..NodeStatus::default()
        });
        node
    }

    #[test]
    fn the_store_keeps_addresses_and_taints_only() {
        let mut kept = node("n1", &["10.1.2.3", "::ffff:10.1.2.4", "n1.example"]);
        keep_what_is_read(&mut kept);
        assert_eq!(kept.metadata.name.as_deref(), Some("n1"));
        assert!(kept.metadata.labels.is_none());
        assert!(kept.status.as_ref().unwrap().images.is_none());
        assert!(kept.spec.as_ref().unwrap().pod_cidr.is_none());
        assert!(has_taint(&kept, "node.kubernetes.io/out-of-service"));
        assert!(!has_taint(&kept, "other"));
        let want: BTreeSet<IpAddr> = ["10.1.2.3".parse().unwrap(), "10.1.2.4".parse().unwrap()].into();
        assert_eq!(addresses_of(&kept), want);
    }

    #[tokio::test]
    async fn a_watched_node_is_answered_without_a_request_and_an_unknown_one_is_read() {
        let (client, mut handle) = csi_events::mock_api::client();
        let (store, mut writer) = reflector::store();
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(node("n1", &["10.0.0.1"])));
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let directory = NodeDirectory { client, store: Some(store), task: None };
        let from_store = directory.addresses("n1").await.unwrap().unwrap();
        assert_eq!(from_store, ["10.0.0.1".parse::<IpAddr>().unwrap()].into());
        // n2 is not in the store: one GET, which says it does not exist.
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("a GET of n2");
            assert_eq!(request.uri().path(), "/api/v1/nodes/n2");
            let gone = csi_events::mock_api::status(404, "NotFound", "nodes \"n2\" not found");
            csi_events::mock_api::reply(send, http::StatusCode::NOT_FOUND, &gone);
        });
        assert_eq!(directory.addresses("n2").await.unwrap(), None);
        server.await.unwrap();
    }
}
