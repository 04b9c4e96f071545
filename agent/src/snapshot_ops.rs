//! Snapshots as desired state: a point-in-time copy of a volume, kept until
//! deleted; and the write pause that makes copies (snapshots and clones of
//! live volumes) point-in-time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use crate::agent::{Agent, Object, blocking, creation_id};
use crate::error::{Error, Result};
use crate::store::{self, FORMAT, SnapshotRecord};

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

impl Agent {
    /// Runs `copy` while no write can reach volume `id`: writes in flight
    /// finish, the file is flushed, new writes wait until the copy is done.
    /// The caller holds the volume's lock.
    pub(crate) async fn with_writes_paused<T: Send + 'static>(
        &self,
        id: &str,
        copy: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let export = self.state().volume(id).and_then(|v| v.export());
        let Some(export) = export else {
            // No server, no writers: the file is still.
            return blocking(copy).await;
        };
        let paused = export.write_gate().pause().await;
        let result = blocking(move || {
            export.flush().map_err(|e| Error::io("flushing volume", e))?;
            copy()
        })
        .await;
        drop(paused);
        result
    }

    /// Copies the source volume (a reflink where the filesystem shares
    /// extents) while its writes are paused, then writes the record.
    /// NOT_FOUND for a missing source, FAILED_PRECONDITION for one without
    /// its image, RESOURCE_EXHAUSTED when the copy cannot fit.
    pub async fn create_snapshot(&self, new: NewSnapshot) -> Result<SnapshotRecord> {
        let id = creation_id(new.id, "snap-", store::is_snapshot_id)?;
        let _creating = self.lock(Object::Creation(id.clone())).await;
        if let Some(existing) = self.state().snapshot(&id) {
            return Ok(existing.clone());
        }
        let volume_id = new.source_volume_id;
        let _guard = self.lock(Object::Volume(volume_id.clone())).await;
        let (size, source_block) = match self.state().volume(&volume_id) {
            None => return Err(Error::not_found(format!("source volume {volume_id} not found"))),
            Some(v) => {
                v.check_usable()?;
                (v.record().capacity_bytes, v.record().block)
            }
        };
        let (store, source, snap_id) = (Arc::clone(self.store()), self.store().volume_image(&volume_id), id.clone());
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        self.with_writes_paused(&volume_id, move || {
            // A reflink needs no space; a copy at most the source's allocated blocks.
            let allocated = std::os::unix::fs::MetadataExt::blocks(
                &std::fs::metadata(&source).map_err(|e| Error::io("stat volume", e))?,
            ) * 512;
            store.check_space(allocated)?;
            store.create_snapshot_image(&snap_id, &source)
        })
        .await?;
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
