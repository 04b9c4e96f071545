//! The controller's driver: its storage backend ([`Storage`]: the
//! in-process [`Agent`] it drives, or the cluster's agents through
//! objects), per-object locks that make CSI calls idempotent, node
//! lookups, Events and metrics.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use agent::Agent;
use agent::locks::Locks;
use tokio::sync::OwnedMutexGuard;

use crate::error::{Error, Kind, Result};
use crate::events::Events;
use crate::metrics::Metrics;
use crate::nodes::{NodeAddresses, Nodes};
use crate::storage::{Cluster, Storage};

/// How often node addresses are re-read from Kubernetes.
const REFRESH: Duration = agent::REFRESH;

#[derive(Debug, Clone)]
pub struct Config {
    pub driver_name: String,
    /// Host put in `nbdUri`.
    pub advertise: IpAddr,
    /// TLS for new volumes whose StorageClass does not say.
    pub default_tls: csi_proto::contract::VolumeTls,
    /// The agent's: the address its NBD servers bind, their ports and caps.
    pub agent: agent::Config,
}

#[derive(Debug)]
pub struct Driver {
    config: Config,
    storage: Storage,
    nodes: Nodes,
    /// Kubernetes Events for failures a human must act on.
    events: Events,
    metrics: Arc<Metrics>,
    locks: Locks<LockKey>,
}

impl Driver {
    /// Opens the agent on `data_dir` (loading the store and starting every
    /// volume's server; see [`Agent::open`]), its failures reported as
    /// Events.
    pub async fn start(config: Config, data_dir: PathBuf, nodes: Nodes) -> Result<Arc<Self>> {
        let events = Events::new(&nodes, &config.driver_name);
        let agent = Agent::open(config.agent.clone(), &data_dir, Arc::new(events.clone())).await?;
        let driver = Arc::new(Self {
            metrics: Arc::new(Metrics::for_agent(&agent)),
            config,
            storage: Storage::Embedded(agent),
            nodes,
            events,
            locks: Locks::default(),
        });
        if driver.nodes.uses_kubernetes() {
            tokio::spawn(refresh_loop(Arc::downgrade(&driver)));
        }
        Ok(driver)
    }

    /// Drives the cluster's agents through objects; no volume is held
    /// here, so there is nothing to load or refresh.
    pub fn start_cluster(config: Config, nodes: Nodes, cluster: Cluster) -> Arc<Self> {
        Arc::new(Self {
            events: Events::new(&nodes, &config.driver_name),
            // No export is served here: volume metrics are the agents'.
            metrics: Arc::new(Metrics::new(agent::ExportTable::default())),
            config,
            storage: Storage::Cluster(Box::new(cluster)),
            nodes,
            locks: Locks::default(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The in-process agent, in embedded mode.
    #[cfg(test)]
    pub fn agent(&self) -> Option<&Arc<Agent>> {
        match &self.storage {
            Storage::Embedded(agent) => Some(agent),
            Storage::Cluster(_) => None,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// ControllerPublishVolume of an existing volume failed with `error`:
    /// an Event on its PVC (in cluster mode its name is read from the
    /// volume's object, one read on a call that failed anyway, and not when
    /// the API server is what is unavailable: the read would wait for it
    /// too, and the Event could not be written).
    pub async fn report_publish_refused(&self, id: &str, node_id: &str, error: &Error) {
        let pv_name = match &self.storage {
            Storage::Embedded(agent) => agent.volume(id).map(|volume| volume.record.name),
            Storage::Cluster(_) if error.kind() == Kind::Unavailable => None,
            Storage::Cluster(cluster) => cluster.volume(id).await.ok().map(|object| object.spec.request_name),
        };
        if let Some(pv_name) = pv_name {
            self.events.publish_refused(id, pv_name, node_id, error);
        }
    }

    /// Volume `id` was just unpublished from `node_id`: when that node is
    /// tainted out-of-service, the detach fenced it, which Events on the
    /// claim and the Node say.
    pub async fn report_fenced(&self, id: &str, node_id: &str) {
        if node_id.is_empty() || !self.nodes.out_of_service(node_id).await {
            return;
        }
        let pv_name = match &self.storage {
            Storage::Embedded(agent) => agent.volume(id).map(|volume| volume.record.name),
            Storage::Cluster(cluster) => cluster.volume(id).await.ok().map(|object| object.spec.request_name),
        };
        tracing::warn!(volume.id = %id, node.id = %node_id, "volume fenced off an out-of-service node");
        if let Some(pv_name) = pv_name {
            self.events.fenced(id, pv_name, node_id);
        }
    }

    pub async fn lock(&self, key: LockKey) -> OwnedMutexGuard<()> {
        self.locks.lock(key).await
    }

    /// Where nodes reach a volume's NBD server (the `nbdUri` authority).
    pub fn nbd_address(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.config.advertise, port)
    }

    /// Ready when the agent serves every volume it can; in cluster mode
    /// at once (each call reaches the API server itself).
    pub fn ready(&self) -> bool {
        match &self.storage {
            Storage::Embedded(agent) => agent.ready(),
            Storage::Cluster(_) => true,
        }
    }

    /// Addresses for a publication: `None` means any (no Kubernetes).
    pub async fn node_addresses(&self, node_id: &str) -> Result<Option<Vec<IpAddr>>> {
        Ok(match self.nodes.addresses(node_id).await? {
            NodeAddresses::Any => None,
            NodeAddresses::Only(set) => Some(set.into_iter().collect()),
        })
    }

    /// One background pass: re-read the addresses of the nodes every volume
    /// is published to, and give the agent any that changed.
    async fn refresh(&self) {
        let Storage::Embedded(agent) = &self.storage else { return };
        for id in agent.volume_ids() {
            let _guard = self.lock(LockKey::VolumeId(id.to_owned())).await;
            let Some(volume) = agent.volume(&id) else { continue };
            let mut published = volume.record.published.clone();
            for (node, publication) in published.iter_mut() {
                match self.node_addresses(node).await {
                    Ok(addresses) => publication.addresses = addresses,
                    Err(e) if e.kind() == Kind::NotFound => publication.addresses = Some(Vec::new()),
                    Err(e) => tracing::warn!(volume.id = %id, node, error = %e, "node lookup failed"),
                }
            }
            if published != volume.record.published
                && let Err(e) = self.set_access(agent, &id, published).await
            {
                tracing::warn!(volume.id = %id, error = %e, "applying node addresses failed");
            }
        }
    }

    /// Stops every volume server (flushing each file); for shutdown and tests.
    pub async fn shutdown(&self) {
        if let Storage::Embedded(agent) = &self.storage {
            agent.shutdown().await;
        }
    }
}

async fn refresh_loop(driver: Weak<Driver>) {
    loop {
        tokio::time::sleep(REFRESH).await;
        let Some(driver) = driver.upgrade() else { return };
        driver.refresh().await;
    }
}

/// What an operation holds while it changes one object: calls on the same
/// volume, snapshot or request name run one at a time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LockKey {
    VolumeId(String),
    /// A CreateVolume request name (idempotency: one creation per name).
    VolumeName(String),
    SnapshotId(String),
    /// A CreateSnapshot request name.
    SnapshotName(String),
}
