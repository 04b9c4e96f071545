//! The [`Agent`]: the one owner of a data directory's volumes and snapshots
//! and of their NBD servers. It loads the store, serves every published
//! volume on its recorded port, keeps them serving (a background pass
//! retries servers that are down and notices an image put back), and
//! changes volumes and snapshots when asked, each operation durable before
//! it returns.
//!
//! Its operations say what should be (a volume of this size from this
//! source, these nodes may connect); they know nothing of CSI, gRPC or
//! Kubernetes. The controller drives one in-process agent directly; an
//! agent process can drive one from custom resources the same way.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use nbd::tls::TlsMode;
use tokio::sync::OwnedMutexGuard;

use crate::certificates::Certificates;
use crate::error::{Error, Kind, Result};
use crate::exports::ExportTable;
use crate::locks::Locks;
use crate::report::Reporter;
use crate::state::{State, VolumeStatus};
use crate::store::{ExportTls, SnapshotRecord, Space, Store, VolumeRecord};
use crate::volumes::{self, ConnectionCaps, Served};

/// How often servers that failed to start are retried, missing images
/// looked for again and the metadata reserve refilled.
pub const REFRESH: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Config {
    /// Address the NBD servers bind.
    pub listen: IpAddr,
    /// Ports the servers of published volumes take (the first free one); a
    /// volume keeps its port while it is published, across restarts, and
    /// gives it back when it is published nowhere.
    pub ports: RangeInclusive<u16>,
    pub connection_caps: ConnectionCaps,
    /// The directory holding the server's TLS certificates (see
    /// `certificates`); `None`: volumes that need TLS are refused.
    pub tls_dir: Option<PathBuf>,
}

#[derive(Debug)]
pub struct Agent {
    config: Config,
    store: Arc<Store>,
    state: Mutex<State>,
    /// The exports the metrics read; kept in step with the volumes' servers.
    exports: ExportTable,
    reporter: Arc<dyn Reporter>,
    locks: Locks<Object>,
    /// For the exports that speak TLS.
    certificates: Arc<Certificates>,
}

/// What one agent operation locks: changes to one volume or snapshot run
/// one at a time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Object {
    Volume(String),
    Snapshot(String),
    /// The creation of a volume or snapshot under an id the caller chose:
    /// taken before any other lock, so two creations of one id run one
    /// after the other without a lock order to get wrong.
    Creation(String),
}

/// Runs blocking filesystem work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::internal(format!("blocking task failed: {e}")))?
}

/// The id a creation uses: the caller's, once checked to be `prefix` and
/// 32 hex digits (`valid`), or a fresh random one.
pub(crate) fn creation_id(chosen: Option<String>, prefix: &str, valid: fn(&str) -> bool) -> Result<String> {
    match chosen {
        Some(id) if valid(&id) => Ok(id),
        Some(id) => Err(Error::new(Kind::InvalidArgument, format!("{id:?} is not {prefix} and 32 hex digits"))),
        None => Ok(format!("{prefix}{}", crate::store::random_hex(16)?)),
    }
}

impl Agent {
    /// Loads the store under `data_dir` (creating it if needed) and starts
    /// every published volume's server on its recorded port (ports that
    /// unpublished volumes of older versions still hold are given back). A
    /// server that cannot start is logged, reported and retried in the
    /// background;
    /// [`Agent::ready`] is false until it runs. A volume whose image file is
    /// missing is marked broken (reported through its condition and to
    /// `reporter`) instead of stopping start-up: the others serve normally.
    pub async fn open(config: Config, data_dir: &Path, reporter: Arc<dyn Reporter>) -> Result<Arc<Self>> {
        let data_dir = data_dir.to_path_buf();
        let (store, loaded) = blocking(move || Store::open(&data_dir)).await?;
        let certificates = Arc::new(Certificates::new(config.tls_dir.clone()));
        if config.tls_dir.is_some() {
            let loading = Arc::clone(&certificates);
            if let Err(e) = blocking(move || loading.server_tls()).await {
                tracing::warn!(error = %e, "TLS certificates not loaded yet; volumes that need TLS wait for them");
            }
        }
        let agent = Arc::new(Self {
            certificates,
            config,
            store: Arc::new(store),
            state: Mutex::new(State::loaded(loaded)),
            exports: ExportTable::default(),
            reporter,
            locks: Locks::default(),
        });
        agent.fill_in_snapshot_sources().await;
        let ids: Vec<String> = agent.state().volume_ids().cloned().collect();
        for id in &ids {
            if let Some(reason) = agent.missing_image(id).await? {
                tracing::error!(volume.id = %id, reason, "volume cannot be served");
                agent.state().mark_broken(id, reason.clone());
                if let Some(record) = agent.state().volume_record(id) {
                    agent.reporter.image_missing(&record, &reason);
                }
                continue;
            }
            agent.reconcile_size(id).await?;
            let Some(record) = agent.state().volume_record(id) else { continue };
            if record.published.is_empty() {
                if record.port.is_some()
                    && let Err(e) = agent.release_port(record).await
                {
                    // Still held in the record: given back at its next unpublish.
                    tracing::warn!(volume.id = %id, error = %e, "giving back an unpublished volume's port failed");
                }
                continue;
            }
            if let Err(e) = agent.start_server(id).await {
                tracing::error!(volume.id = %id, error = %e, "volume server did not start; will retry");
                agent.report_server_down(id, &e);
            }
        }
        let space = agent.store.space()?;
        tracing::info!(
            volumes = ids.len(),
            snapshots = agent.state().snapshot_count(),
            available = space.available,
            total = space.total,
            metadata_reserve = agent.store.reserve_len().unwrap_or(0),
            "store loaded"
        );
        tokio::spawn(refresh_loop(Arc::downgrade(&agent)));
        Ok(agent)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The exports being served, for metrics.
    pub fn exports(&self) -> &ExportTable {
        &self.exports
    }

    /// Whether volumes whose export speaks TLS can be served now: the
    /// certificates load.
    pub async fn can_serve_tls(&self) -> bool {
        let certificates = Arc::clone(&self.certificates);
        blocking(move || Ok(certificates.usable())).await.unwrap_or(false)
    }

    /// What an export of TLS mode `tls` does, with its certificates:
    /// FAILED_PRECONDITION when it needs them and they do not load.
    pub(crate) async fn export_mode(&self, tls: ExportTls) -> Result<TlsMode> {
        if tls.is_off() {
            return Ok(TlsMode::Off);
        }
        let certificates = Arc::clone(&self.certificates);
        blocking(move || certificates.export_mode(tls)).await
    }

    /// Ready when every published volume's server is listening; a broken
    /// volume never will, and is reported through its condition instead.
    pub fn ready(&self) -> bool {
        self.state().all_serving_or_broken()
    }

    // ------------------------------------------------------------ reads

    /// Volume `id` as it is now.
    pub fn volume(&self, id: &str) -> Option<VolumeStatus> {
        self.state().volume(id).map(|v| v.status())
    }

    /// Every volume id, in order.
    pub fn volume_ids(&self) -> Vec<String> {
        self.state().volume_ids().cloned().collect()
    }

    /// The volume whose record carries `name`.
    pub fn find_volume_by_name(&self, name: &str) -> Option<VolumeRecord> {
        self.state().find_volume_by_name(name).cloned()
    }

    pub fn snapshot(&self, id: &str) -> Option<SnapshotRecord> {
        self.state().snapshot(id).cloned()
    }

    /// Every snapshot record, in id order.
    pub fn snapshots(&self) -> Vec<SnapshotRecord> {
        self.state().snapshots().cloned().collect()
    }

    /// The snapshot whose record carries `name`.
    pub fn find_snapshot_by_name(&self, name: &str) -> Option<SnapshotRecord> {
        self.state().find_snapshot_by_name(name).cloned()
    }

    /// Space on the data directory's filesystem.
    pub async fn space(&self) -> Result<Space> {
        let store = Arc::clone(&self.store);
        blocking(move || store.space()).await
    }

    /// Bytes the metadata reserve holds now.
    pub fn reserve_len(&self) -> Result<u64> {
        self.store.reserve_len()
    }

    // -------------------------------------------------------- internals

    /// The volumes and snapshots, locked while the guard lives: hold it
    /// for a look or one change, never across an await.
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub(crate) async fn lock(&self, object: Object) -> OwnedMutexGuard<()> {
        self.locks.lock(object).await
    }

    /// Takes volume `id`'s server out of service (its metrics go with it).
    pub(crate) fn take_server(&self, id: &str) -> Option<Served> {
        self.exports.remove(id);
        self.state().take_server(id)
    }

    fn report_server_down(&self, id: &str, error: &Error) {
        if let Some(record) = self.state().volume_record(id) {
            self.reporter.server_down(&record, error);
        }
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

    /// (Re)starts a published volume's server: on its recorded port, or on
    /// the first free one (saved in its record) when it has none yet.
    pub(crate) async fn start_server(&self, id: &str) -> Result<()> {
        let Some(mut record) = self.state().volume_record(id) else { return Ok(()) };
        let served = match record.port {
            Some(port) => {
                let addr = SocketAddr::new(self.config.listen, port);
                let tls = self.export_mode(record.tls).await?;
                volumes::serve(&self.store.volume_image(id), &record, addr, self.config.connection_caps, tls)
                    .await
                    .map_err(|e| Error::io(format!("serving volume {id} on port {port}"), e))?
            }
            None => {
                let served = self.serve_new(&mut record).await?;
                if let Err(e) = self.save(record).await {
                    let _ = served.stop().await;
                    return Err(e);
                }
                served
            }
        };
        self.install_server(id, served).await;
        Ok(())
    }

    /// After a failed attempt to take volume `id` out of service: serves it
    /// again if it is published (a volume published nowhere has no server).
    pub(crate) async fn resume_serving(&self, id: &str) {
        let published = self.state().volume(id).is_some_and(|v| v.should_serve());
        if published && let Err(e) = self.start_server(id).await {
            tracing::warn!(volume.id = %id, error = %e, "volume server did not start again; will retry");
            self.report_server_down(id, &e);
        }
    }

    /// Makes `served` volume `id`'s server, stopping the one it replaces.
    pub(crate) async fn install_server(&self, id: &str, served: Served) {
        self.exports.insert(id, Arc::clone(&served.export));
        let old = self.state().replace_server(id, served);
        if let Some(old) = old {
            let _ = old.stop().await;
        }
    }

    /// Starts a server for a volume on the first free port of the range
    /// and names it in `record` (not saved yet).
    pub(crate) async fn serve_new(&self, record: &mut VolumeRecord) -> Result<Served> {
        let image = self.store.volume_image(&record.id);
        let tls = self.export_mode(record.tls).await?;
        let used = self.state().used_ports();
        for port in self.config.ports.clone().filter(|p| !used.contains(p)) {
            record.port = Some(port);
            let addr = SocketAddr::new(self.config.listen, port);
            match volumes::serve(&image, record, addr, self.config.connection_caps, tls.clone()).await {
                Ok(served) => return Ok(served),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(Error::io(format!("serving volume {} on port {port}", record.id), e)),
            }
        }
        record.port = None;
        Err(Error::exhausted(format!(
            "no free NBD port in {}-{}: as many volumes as the range holds are published",
            self.config.ports.start(),
            self.config.ports.end()
        )))
    }

    /// One background pass: refill the metadata reserve, restart servers
    /// that are down (a broken volume once its image is back).
    pub async fn refresh(&self) {
        let store = Arc::clone(&self.store);
        let _ = blocking(move || {
            store.refill_reserve();
            Ok(())
        })
        .await;
        let ids: Vec<String> = self.state().volume_ids().cloned().collect();
        for id in ids {
            let _guard = self.lock(Object::Volume(id.clone())).await;
            let Some((serving, broken)) =
                self.state().volume(&id).map(|v| (v.is_serving() || !v.should_serve(), v.broken().is_some()))
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
            if !serving && let Err(e) = self.start_server(&id).await {
                tracing::warn!(volume.id = %id, error = %e, "volume server still down");
                self.report_server_down(&id, &e);
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

async fn refresh_loop(agent: Weak<Agent>) {
    loop {
        tokio::time::sleep(REFRESH).await;
        let Some(agent) = agent.upgrade() else { return };
        agent.refresh().await;
    }
}
