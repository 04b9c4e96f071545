//! Snapshots as desired state: a point-in-time copy of a volume, kept until
//! deleted; and how copies of live volumes (snapshots and clones) are made
//! point-in-time without stalling its writes.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nbd::server::{CopyBeforeWrite, Export};
use tokio::sync::OwnedMutexGuard;

use crate::agent::{Agent, Object, blocking, creation_id};
use crate::error::{Error, Result};
use crate::store::copy::{self, Method};
use crate::store::{self, FORMAT, PendingImage, SnapshotRecord};

/// A snapshot to take; the agent picks its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSnapshot {
    /// The id to take it under, for a caller that names snapshots itself;
    /// `None` picks a fresh one. Taking an id that exists returns that
    /// snapshot as it is.
    pub id: Option<String>,
    /// The name it is taken under (the CSI request name), kept in the record.
    pub name: String,
    pub source_volume_id: String,
    pub parameters: BTreeMap<String, String>,
}

/// How long the write gate may be held back for a copy's instant at most:
/// writes in flight drain well within it, and a reflink that takes longer
/// (a filesystem writing back a huge dirty cache) is still waited for, but
/// logged.
const SLOW_INSTANT: Duration = Duration::from_millis(100);

impl Agent {
    /// Copies volume `id`'s image into `target` as it is now, while its
    /// writes go on. With no server nothing writes, and the file is copied
    /// (reflinked where it can be). With one, its writes are paused for the
    /// instant only: the in-flight ones finish, then a reflink (FICLONE,
    /// atomic) where the filesystem has it, else a copy-before-write guard
    /// goes in ([`CopyBeforeWrite`]), and the writes go on while the rest is
    /// copied in the background. The caller holds the volume's lock and
    /// hands it over: the copy keeps it until it is complete, even if the
    /// caller gives up waiting (a cancelled call), so nothing replaces the
    /// volume's server under the guard; it is handed back with the copy.
    pub(crate) async fn copy_at_instant(
        &self,
        id: &str,
        target: PendingImage,
        lock: OwnedMutexGuard<()>,
    ) -> Result<(PendingImage, OwnedMutexGuard<()>)> {
        let source = self.store().volume_image(id);
        let export = self.state().volume(id).and_then(|v| v.export());
        let volume = id.to_owned();
        let copy = tokio::spawn(async move {
            let copied = copy_live(export, source, target).await;
            match &copied {
                Ok((_, method)) => tracing::info!(volume.id = %volume, ?method, "copied the volume at an instant"),
                Err(e) => tracing::warn!(volume.id = %volume, error = %e, "copying the volume failed"),
            }
            (copied.map(|(target, _)| target), lock)
        });
        let (copied, lock) = copy.await.map_err(|e| Error::internal(format!("copy task failed: {e}")))?;
        Ok((copied?, lock))
    }

    /// Copies the source volume as it is at this call (its writes go on:
    /// a reflink, or copy-before-write), then writes the
    /// record: a snapshot exists, and is listed, only once it is complete.
    /// NOT_FOUND for a missing source, FAILED_PRECONDITION for one without
    /// its image, RESOURCE_EXHAUSTED when the copy cannot fit.
    ///
    /// It runs to the end even if the caller stops waiting (a gRPC call
    /// that timed out): a copy of a large volume is not thrown away, and
    /// the retry meets the snapshot, by its id or, for one taken without
    /// an id, by its name and source once the volume is free.
    pub async fn create_snapshot(self: &Arc<Self>, new: NewSnapshot) -> Result<SnapshotRecord> {
        let agent = Arc::clone(self);
        let taking = tokio::spawn(async move { agent.take_snapshot(new).await });
        taking.await.map_err(|e| Error::internal(format!("snapshot task failed: {e}")))?
    }

    async fn take_snapshot(&self, new: NewSnapshot) -> Result<SnapshotRecord> {
        let by_name = new.id.is_none();
        let id = creation_id(new.id, "snap-", store::is_snapshot_id)?;
        let _creating = self.lock(Object::Creation(id.clone())).await;
        if let Some(existing) = self.state().snapshot(&id) {
            return Ok(existing.clone());
        }
        let volume_id = new.source_volume_id;
        let volume_lock = self.lock(Object::Volume(volume_id.clone())).await;
        if by_name {
            // An earlier call for this name, abandoned by its caller, may
            // have finished while this one waited for the volume.
            let earlier =
                self.state().snapshots().find(|s| s.name == new.name && s.source_volume_id == volume_id).cloned();
            if let Some(earlier) = earlier {
                return Ok(earlier);
            }
        }
        let (size, source_block, source_tls) = match self.state().volume(&volume_id) {
            None => return Err(Error::not_found(format!("source volume {volume_id} not found"))),
            Some(v) => {
                v.check_usable()?;
                (v.record().capacity_bytes, v.record().block, v.record().tls)
            }
        };
        let (store, source, snap_id) = (Arc::clone(self.store()), self.store().volume_image(&volume_id), id.clone());
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let target = blocking(move || {
            // A reflink needs no space; a copy at most the source's allocated blocks.
            let allocated = std::os::unix::fs::MetadataExt::blocks(
                &std::fs::metadata(&source).map_err(|e| Error::io("stat volume", e))?,
            ) * 512;
            store.check_space(allocated)?;
            store.begin_snapshot_image(&snap_id)
        })
        .await?;
        let (target, _volume_lock) = self.copy_at_instant(&volume_id, target, volume_lock).await?;
        blocking(move || target.commit(0)).await?;
        let record = SnapshotRecord {
            format: FORMAT,
            id: id.clone(),
            name: new.name,
            source_volume_id: volume_id,
            size_bytes: size,
            created_seconds: now.as_secs() as i64,
            created_nanos: now.subsec_nanos() as i32,
            parameters: new.parameters,
            source_block: Some(source_block),
            source_tls,
        };
        let (store, saved) = (Arc::clone(self.store()), record.clone());
        if let Err(e) = blocking(move || store.save_snapshot(&saved)).await {
            let (store, id) = (Arc::clone(self.store()), id.clone());
            let _ = blocking(move || store.remove_snapshot(&id)).await;
            return Err(e);
        }
        tracing::info!(snapshot.id = %id, volume.id = %record.source_volume_id, "snapshot created");
        self.state().insert_snapshot(record.clone());
        Ok(record)
    }

    /// Removes snapshot `id`, record first; one that is not there succeeds.
    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        let _guard = self.lock(Object::Snapshot(id.to_owned())).await;
        if self.state().snapshot(id).is_none() {
            return Ok(());
        }
        let (store, rid) = (Arc::clone(self.store()), id.to_owned());
        blocking(move || store.remove_snapshot(&rid)).await?;
        self.state().remove_snapshot(id);
        tracing::info!(snapshot.id = %id, "snapshot deleted");
        Ok(())
    }
}

/// The copy behind [`Agent::copy_at_instant`].
async fn copy_live(
    export: Option<Arc<Export>>,
    source: PathBuf,
    target: PendingImage,
) -> Result<(PendingImage, Method)> {
    let open = source.clone();
    let from = blocking(move || File::open(&open).map_err(|e| Error::io(format!("opening {}", open.display()), e)));
    let from = from.await?;
    let Some(export) = export else {
        // No server, no writers: the file is still.
        return blocking(move || {
            let method = copy::copy_file(&from, target.file()).map_err(|e| Error::io("copying volume", e))?;
            Ok((target, method))
        })
        .await;
    };
    // Written back before the instant, so that a reflink has little left
    // to write back while writes wait. They go on meanwhile.
    let from = blocking(move || from.sync_data().map(|()| from).map_err(|e| Error::io("flushing volume", e))).await?;
    let paused = export.write_gate().pause().await;
    let paused_at = Instant::now();
    let size = export.size();
    let instant = blocking(move || {
        let copy = if copy::reflink(&from, target.file()).map_err(|e| Error::io("reflinking volume", e))? {
            None
        } else {
            let file = target.file().try_clone().map_err(|e| Error::io("opening the copy", e))?;
            Some(Arc::new(CopyBeforeWrite::new(file, size).map_err(|e| Error::io("sizing the copy", e))?))
        };
        Ok((from, target, copy))
    })
    .await;
    let (from, target, guard) = match instant {
        Ok(taken) => taken,
        Err(e) => {
            drop(paused);
            return Err(e);
        }
    };
    if let Some(guard) = &guard {
        export.start_copy(Arc::clone(guard));
    }
    drop(paused);
    let held = paused_at.elapsed();
    if held > SLOW_INSTANT {
        tracing::warn!(?held, "writes waited long for the copy's instant");
    }
    let Some(guard) = guard else { return Ok((target, Method::Reflink)) };
    let copier = Arc::clone(&guard);
    let copied = blocking(move || copier.copy_rest(&from).map_err(|e| Error::io("copying volume", e))).await;
    // Complete or failed, the guard has nothing more to do.
    export.end_copy(&guard);
    copied.map(|()| (target, Method::SparseCopy))
}
