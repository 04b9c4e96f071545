//! The controller's driver: the store, the [`State`] of volumes and
//! snapshots it guards, per-object locks and node lookups.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use nbd::server::Fence;
use tokio::sync::OwnedMutexGuard;

use crate::error::{Error, Result};
use crate::events::Events;
use crate::metrics::{ExportTable, Metrics};
use crate::nodes::{NodeAddresses, Nodes};
use crate::state::State;
use crate::store::{SnapshotRecord, Store, VolumeRecord};
use crate::volumes::{self, ConnectionCaps, Served};

/// How often servers that failed to start are retried and node addresses
/// re-read from Kubernetes.
const REFRESH: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Config {
    pub driver_name: String,
    /// Host put in `nbdUri`.
    pub advertise: IpAddr,
    /// Address the NBD servers bind.
    pub listen: IpAddr,
    pub ports: RangeInclusive<u16>,
    pub connection_caps: ConnectionCaps,
}

#[derive(Debug)]
pub struct Driver {
    config: Config,
    store: Arc<Store>,
    nodes: Nodes,
    /// Kubernetes Events for failures a human must act on.
    events: Events,
    metrics: Arc<Metrics>,
    /// The exports the metrics read; kept in step with the volumes' servers.
    exports: ExportTable,
    state: Mutex<State>,
    locks: Locks,
}

/// Runs blocking filesystem work off the async threads.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::internal(format!("blocking task failed: {e}")))?
}

impl Driver {
    /// Loads the store under `data_dir` and starts every volume's server on
    /// its recorded port. A server that cannot start is logged and retried
    /// in the background; Probe reports not-ready until it runs. A volume
    /// whose image file is missing is marked broken (abnormal, a Warning
    /// Event) instead of stopping start-up: the others serve normally.
    pub async fn start(config: Config, data_dir: PathBuf, nodes: Nodes) -> Result<Arc<Self>> {
        let (store, loaded) = blocking(move || Store::open(&data_dir)).await?;
        let exports = ExportTable::default();
        let events = Events::new(&nodes, &config.driver_name);
        let driver = Arc::new(Self {
            config,
            store: Arc::new(store),
            nodes,
            events,
            metrics: Arc::new(Metrics::new(exports.clone())),
            exports,
            state: Mutex::new(State::loaded(loaded)),
            locks: Locks::default(),
        });
        driver.fill_in_snapshot_sources().await;
        let ids: Vec<String> = driver.state().volume_ids().cloned().collect();
        for id in &ids {
            if let Some(reason) = driver.missing_image(id).await? {
                tracing::error!(volume.id = %id, reason, "volume cannot be served");
                driver.state().mark_broken(id, reason.clone());
                driver.report_image_missing(id, &reason);
                continue;
            }
            driver.reconcile_size(id).await?;
            if let Err(e) = driver.restart_server(id).await {
                tracing::error!(volume.id = %id, error = %e, "volume server did not start; will retry");
                driver.report_server_down(id, &e);
            }
        }
        let space = driver.store.space()?;
        tracing::info!(
            volumes = ids.len(),
            snapshots = driver.state().snapshot_count(),
            available = space.available,
            total = space.total,
            metadata_reserve = driver.store.reserve_len().unwrap_or(0),
            "store loaded"
        );
        tokio::spawn(refresh_loop(Arc::downgrade(&driver)));
        Ok(driver)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Adds a volume created just now, with its running server.
    pub fn add_served_volume(&self, record: VolumeRecord, served: Served) {
        self.exports.insert(&record.id, Arc::clone(&served.export));
        self.state().add_volume(record, Some(served));
    }

    /// Takes volume `id`'s server out of service (its metrics go with it).
    pub fn take_server(&self, id: &str) -> Option<Served> {
        self.exports.remove(id);
        self.state().take_server(id)
    }

    /// The CreateVolume name (the PV's name) of volume `id`, for an Event.
    fn pv_name(&self, id: &str) -> Option<String> {
        self.state().volume(id).map(|v| v.record().name.clone())
    }

    /// ControllerPublishVolume of an existing volume failed with `error`.
    pub fn report_publish_refused(&self, id: &str, node_id: &str, error: &Error) {
        if let Some(pv_name) = self.pv_name(id) {
            self.events.publish_refused(id, pv_name, node_id, error);
        }
    }

    fn report_server_down(&self, id: &str, error: &Error) {
        if let Some(pv_name) = self.pv_name(id) {
            self.events.server_down(id, pv_name, error);
        }
    }

    fn report_image_missing(&self, id: &str, reason: &str) {
        if let Some(pv_name) = self.pv_name(id) {
            self.events.image_missing(id, pv_name, reason);
        }
    }

    /// The volumes and snapshots, locked while the guard lives: hold it
    /// for a look or one change, never across an await.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn lock(&self, key: LockKey) -> OwnedMutexGuard<()> {
        self.locks.lock(key).await
    }

    /// Where nodes reach a volume's NBD server (the `nbdUri` authority).
    pub fn nbd_address(&self, record: &VolumeRecord) -> SocketAddr {
        SocketAddr::new(self.config.advertise, record.port)
    }

    /// Ready when every stored volume's server is listening; a broken
    /// volume never will, and is reported through its condition instead.
    pub fn ready(&self) -> bool {
        self.state().all_serving_or_broken()
    }

    /// Why volume `id` cannot be served when its image file is missing.
    async fn missing_image(&self, id: &str) -> Result<Option<String>> {
        let image = self.store.volume_image(id);
        blocking(move || match std::fs::symlink_metadata(&image) {
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Some(format!(
                "image file {} is missing; its data is gone: delete the volume, or put the file back",
                image.display()
            ))),
            Err(e) => Err(Error::io(format!("stat {}", image.display()), e)),
        })
        .await
    }

    /// Snapshot records of older versions do not say whether their source
    /// was a block volume: fill it in (and save it) while the source exists.
    async fn fill_in_snapshot_sources(&self) {
        let unknown: Vec<SnapshotRecord> = {
            let state = self.state();
            state
                .snapshots()
                .filter(|s| s.source_block.is_none())
                .filter_map(|s| {
                    let block = state.volume(&s.source_volume_id)?.record().block;
                    Some(SnapshotRecord { source_block: Some(block), ..s.clone() })
                })
                .collect()
        };
        for record in unknown {
            let (store, saved) = (Arc::clone(&self.store), record.clone());
            match blocking(move || store.save_snapshot(&saved)).await {
                Ok(()) => {
                    tracing::info!(snapshot.id = %record.id, source_block = ?record.source_block, "recorded the snapshot's source access type");
                    self.state().insert_snapshot(record);
                }
                Err(e) => {
                    tracing::warn!(snapshot.id = %record.id, error = %e, "recording the snapshot's source access type failed")
                }
            }
        }
    }

    /// An expansion interrupted by a crash may have grown the file but not
    /// the record: the larger of the two wins, in both.
    async fn reconcile_size(&self, id: &str) -> Result<()> {
        let Some(mut record) = self.state().volume_record(id) else { return Ok(()) };
        let image = self.store.volume_image(id);
        let store = Arc::clone(&self.store);
        let changed = blocking(move || {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&image)
                .map_err(|e| Error::io(format!("opening {}", image.display()), e))?;
            let len = file.metadata().map_err(|e| Error::io("stat", e))?.len();
            if len == record.capacity_bytes {
                return Ok(None);
            }
            let size = len.max(record.capacity_bytes);
            file.set_len(size).and_then(|()| file.sync_all()).map_err(|e| Error::io("resizing image", e))?;
            record.capacity_bytes = size;
            store.save_volume(&record)?;
            Ok(Some(record))
        })
        .await?;
        if let Some(record) = changed {
            tracing::warn!(volume.id = %id, size = record.capacity_bytes, "finished an interrupted expansion");
            self.state().update_volume_record(record);
        }
        Ok(())
    }

    /// (Re)starts a stored volume's server on its recorded port.
    pub async fn restart_server(&self, id: &str) -> Result<()> {
        let Some(record) = self.state().volume_record(id) else { return Ok(()) };
        let served =
            volumes::serve(&self.store.volume_image(id), &record, self.config.listen, self.config.connection_caps)
                .await
                .map_err(|e| Error::io(format!("serving volume {id} on port {}", record.port), e))?;
        self.exports.insert(id, Arc::clone(&served.export));
        let old = self.state().replace_server(id, served);
        if let Some(old) = old {
            let _ = old.stop().await;
        }
        Ok(())
    }

    /// Starts a server for a new volume on the first free port of the range.
    pub async fn serve_new(&self, record: &mut VolumeRecord) -> Result<Served> {
        let image = self.store.volume_image(&record.id);
        let used = self.state().used_ports();
        for port in self.config.ports.clone().filter(|p| !used.contains(p)) {
            record.port = port;
            match volumes::serve(&image, record, self.config.listen, self.config.connection_caps).await {
                Ok(served) => return Ok(served),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(Error::io(format!("serving volume {} on port {port}", record.id), e)),
            }
        }
        Err(Error::exhausted(format!("no free NBD port in {}-{}", self.config.ports.start(), self.config.ports.end())))
    }

    /// Addresses for a publication: `None` means any (no Kubernetes).
    pub async fn node_addresses(&self, node_id: &str) -> Result<Option<Vec<IpAddr>>> {
        Ok(match self.nodes.addresses(node_id).await? {
            NodeAddresses::Any => None,
            NodeAddresses::Only(set) => Some(set.into_iter().collect()),
        })
    }

    /// Applies a volume's publications to its running export. The fence
    /// resolves once the connections it stopped are done with the file.
    pub fn apply_access(&self, id: &str) -> Fence {
        let state = self.state();
        let Some(volume) = state.volume(id) else { return Fence::default() };
        let Some(export) = volume.export() else { return Fence::default() };
        let fence = volumes::apply_policy(&export, &volume.record().published);
        if fence.stopped() > 0 {
            let stopped = fence.stopped();
            tracing::info!(volume.id = %id, stopped, "stopping connections of revoked peers, or of peers whose right to write changed");
        }
        fence
    }

    /// One background pass: refill the metadata reserve, restart servers
    /// that are down (a broken volume once its image is back), re-read node
    /// addresses from Kubernetes.
    async fn refresh(&self) {
        let store = Arc::clone(&self.store);
        let _ = blocking(move || {
            store.refill_reserve();
            Ok(())
        })
        .await;
        let ids: Vec<String> = self.state().volume_ids().cloned().collect();
        for id in ids {
            let _guard = self.lock(LockKey::VolumeId(id.to_owned())).await;
            let Some((serving, broken, record)) =
                self.state().volume(&id).map(|v| (v.is_serving(), v.broken().is_some(), v.record().clone()))
            else {
                continue;
            };
            if broken {
                if !matches!(self.missing_image(&id).await, Ok(None)) {
                    continue;
                }
                tracing::warn!(volume.id = %id, "image file is back; serving the volume again");
                self.state().clear_broken(&id);
                if let Err(e) = self.reconcile_size(&id).await {
                    tracing::warn!(volume.id = %id, error = %e, "checking the returned image failed");
                }
            }
            if !serving && let Err(e) = self.restart_server(&id).await {
                tracing::warn!(volume.id = %id, error = %e, "volume server still down");
                self.report_server_down(&id, &e);
            }
            if !self.nodes.uses_kubernetes() {
                continue;
            }
            let mut updated = record.clone();
            for (node, publication) in updated.published.iter_mut() {
                match self.node_addresses(node).await {
                    Ok(addresses) => publication.addresses = addresses,
                    Err(e) if e.kind() == crate::error::Kind::NotFound => publication.addresses = Some(Vec::new()),
                    Err(e) => tracing::warn!(volume.id = %id, node, error = %e, "node lookup failed"),
                }
            }
            if updated != record {
                let store = Arc::clone(&self.store);
                let saved = updated.clone();
                match blocking(move || store.save_volume(&saved)).await {
                    Ok(()) => {
                        self.state().update_volume_record(updated);
                        // The stop is sent; a background pass has nobody
                        // to report completion to.
                        drop(self.apply_access(&id));
                    }
                    Err(e) => tracing::warn!(volume.id = %id, error = %e, "saving node addresses failed"),
                }
            }
        }
    }

    /// Stops every server (flushing each file); for shutdown and tests.
    pub async fn shutdown(&self) {
        let served = self.state().take_all_servers();
        for s in served {
            let _ = s.stop().await;
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

/// Per-key async locks: operations on one volume (or name) run one at a time.
#[derive(Debug, Default)]
struct Locks(Mutex<HashMap<LockKey, Weak<tokio::sync::Mutex<()>>>>);

impl Locks {
    async fn lock(&self, key: LockKey) -> OwnedMutexGuard<()> {
        let mutex = {
            let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() > 256 {
                map.retain(|_, weak| weak.strong_count() > 0);
            }
            match map.get(&key).and_then(Weak::upgrade) {
                Some(mutex) => mutex,
                None => {
                    let mutex = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key, Arc::downgrade(&mutex));
                    mutex
                }
            }
        };
        mutex.lock_owned().await
    }
}
