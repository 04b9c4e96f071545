//! How an agent shows it is there: its own NbdStorageNode (where its
//! servers listen, as spec; its room and version, as status) and a Lease
//! it renews, whose renew time says whether it is alive. The Lease, not
//! the NbdStorageNode, carries the heartbeat, so that watchers of storage
//! nodes are not woken every few seconds.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};

use super::reconciler::{ReconcileError, Reconciler};
use super::storage_node::{NbdStorageNode, NbdStorageNodeSpec, NbdStorageNodeStatus, PortRange};

/// The field manager of what an agent writes.
pub const FIELD_MANAGER: &str = "nbd-csi-agent";
/// How long a Lease stays valid without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(40);
/// How often it is renewed: several renewals fit in one duration.
pub const LEASE_RENEWAL: Duration = Duration::from_secs(10);

impl Reconciler {
    /// Writes this node's NbdStorageNode: `address` and the agent's port
    /// range as spec (server-side apply), its space, version and whether it
    /// can serve TLS as status.
    pub async fn announce(&self, address: IpAddr) -> Result<(), ReconcileError> {
        let ports = self.agent().config().ports.clone();
        let object = NbdStorageNode::new(
            self.node(),
            NbdStorageNodeSpec {
                address: address.to_string(),
                ports: PortRange { first: *ports.start(), last: *ports.end() },
            },
        );
        let api: Api<NbdStorageNode> = Api::all(self.client().clone());
        api.patch(self.node(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&object)).await?;
        let space = self.agent().space().await?;
        let status = NbdStorageNodeStatus {
            total_bytes: Some(space.total),
            free_bytes: Some(space.available),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            serves_tls: self.agent().can_serve_tls().await,
            conditions: Vec::new(),
        };
        let patch = serde_json::json!({ "status": status });
        api.patch_status(self.node(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
        Ok(())
    }

    /// Renews this agent's Lease (named after its node, in `namespace`),
    /// creating it the first time.
    pub async fn renew_lease(&self, namespace: &str) -> Result<(), ReconcileError> {
        let api: Api<Lease> = Api::namespaced(self.client().clone(), namespace);
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let spec = LeaseSpec {
            holder_identity: Some(self.node().to_owned()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            renew_time: Some(now.clone()),
            ..Default::default()
        };
        let patch = serde_json::json!({ "spec": spec });
        match api.patch(self.node(), &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.node().to_owned()), ..Default::default() },
                    spec: Some(LeaseSpec { acquire_time: Some(now), ..spec }),
                };
                api.create(&PostParams::default(), &lease).await?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Keeps announcing this node (every [`crate::REFRESH`]) and renewing
    /// its Lease (every [`LEASE_RENEWAL`]) until dropped; failures are
    /// logged and retried on the next tick.
    pub async fn keep_present(self: Arc<Self>, address: IpAddr, namespace: String) {
        self.keep_present_every(address, namespace, LEASE_RENEWAL, crate::REFRESH).await;
    }

    /// [`Self::keep_present`] with its periods. Each write gets at most one
    /// `renewal` period: the client has no read timeout, so a request the
    /// API server never answers (a network that drops packets rather than
    /// refusing them) would otherwise hold the loop until TCP gives up,
    /// many minutes, and the agent would look dead long after the network
    /// is back.
    pub(crate) async fn keep_present_every(
        self: Arc<Self>,
        address: IpAddr,
        namespace: String,
        renewal: Duration,
        announcement: Duration,
    ) {
        let mut renewals = tokio::time::interval(renewal);
        let mut announcements = tokio::time::interval(announcement);
        loop {
            tokio::select! {
                _ = renewals.tick() => {
                    match tokio::time::timeout(renewal, self.renew_lease(&namespace)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::warn!(error = %e, "renewing the agent's Lease failed"),
                        Err(_) => tracing::warn!(within = ?renewal, "renewing the agent's Lease got no answer"),
                    }
                }
                _ = announcements.tick() => {
                    match tokio::time::timeout(renewal, self.announce(address)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::warn!(error = %e, "writing the NbdStorageNode failed"),
                        Err(_) => tracing::warn!(within = ?renewal, "writing the NbdStorageNode got no answer"),
                    }
                }
            }
        }
    }
}
