//! CreateSnapshot, DeleteSnapshot, ListSnapshots, GetSnapshot, and the
//! point-in-time copy of a live volume they (and clones) use.

use std::sync::Arc;
use std::time::SystemTime;

use csi_proto::*;
use tracing::Span;

use super::{check_parameters, page, require};
use crate::driver::{Driver, LockKey, blocking};
use crate::error::{Error, Result};
use crate::store::{self, FORMAT, SnapshotRecord};

fn snapshot_message(record: &SnapshotRecord) -> Snapshot {
    Snapshot {
        size_bytes: record.size_bytes as i64,
        snapshot_id: record.id.clone(),
        source_volume_id: record.source_volume_id.clone(),
        creation_time: Some(prost_types::Timestamp { seconds: record.created_seconds, nanos: record.created_nanos }),
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}

impl Driver {
    /// Runs `copy` while no write can reach volume `id`: writes in flight
    /// finish, the file is flushed, new writes wait until the copy is done.
    /// The caller holds the volume's lock.
    pub async fn with_writes_paused<T: Send + 'static>(
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

    #[tracing::instrument(err, skip_all, fields(snapshot.name = %req.name, volume.id = %req.source_volume_id, snapshot.id = tracing::field::Empty))]
    pub async fn create_snapshot(&self, req: CreateSnapshotRequest) -> Result<CreateSnapshotResponse> {
        require(&req.name, "name")?;
        require(&req.source_volume_id, "source_volume_id")?;
        let parameters = check_parameters(&req.parameters)?;
        let _name_guard = self.lock(LockKey::SnapshotName(req.name.to_owned())).await;
        let existing = self.state().find_snapshot_by_name(&req.name).cloned();
        if let Some(record) = existing {
            if record.source_volume_id == req.source_volume_id {
                return Ok(CreateSnapshotResponse { snapshot: Some(snapshot_message(&record)) });
            }
            return Err(Error::exists(format!(
                "snapshot {:?} exists for volume {}",
                req.name, record.source_volume_id
            )));
        }
        let volume_id = req.source_volume_id.clone();
        let _guard = self.lock(LockKey::VolumeId(volume_id.to_owned())).await;
        let (size, source_block) = match self.state().volume(&volume_id) {
            None => return Err(Error::not_found(format!("source volume {volume_id} not found"))),
            Some(v) => {
                v.check_usable()?;
                (v.record().capacity_bytes, v.record().block)
            }
        };
        let id = format!("snap-{}", store::random_hex(16)?);
        Span::current().record("snapshot.id", id.as_str());
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
            name: req.name.clone(),
            source_volume_id: volume_id,
            size_bytes: size,
            created_seconds: now.as_secs() as i64,
            created_nanos: now.subsec_nanos() as i32,
            parameters,
            source_block: Some(source_block),
        };
        let (store, saved) = (Arc::clone(self.store()), record.clone());
        if let Err(e) = blocking(move || store.save_snapshot(&saved)).await {
            let (store, id) = (Arc::clone(self.store()), id.clone());
            let _ = blocking(move || store.remove_snapshot(&id)).await;
            return Err(e);
        }
        tracing::info!(snapshot.id = %id, "snapshot created");
        self.state().insert_snapshot(record.clone());
        Ok(CreateSnapshotResponse { snapshot: Some(snapshot_message(&record)) })
    }

    #[tracing::instrument(err, skip_all, fields(snapshot.id = %req.snapshot_id))]
    pub async fn delete_snapshot(&self, req: DeleteSnapshotRequest) -> Result<DeleteSnapshotResponse> {
        require(&req.snapshot_id, "snapshot_id")?;
        let id = req.snapshot_id;
        let _guard = self.lock(LockKey::SnapshotId(id.to_owned())).await;
        if self.state().snapshot(&id).is_none() {
            return Ok(DeleteSnapshotResponse {});
        }
        let (store, rid) = (Arc::clone(self.store()), id.clone());
        blocking(move || store.remove_snapshot(&rid)).await?;
        self.state().remove_snapshot(&id);
        tracing::info!("snapshot deleted");
        Ok(DeleteSnapshotResponse {})
    }

    #[tracing::instrument(err, skip_all, fields(snapshot.id = %req.snapshot_id, volume.id = %req.source_volume_id))]
    pub async fn list_snapshots(&self, req: ListSnapshotsRequest) -> Result<ListSnapshotsResponse> {
        let state = self.state();
        let matching: Vec<&String> = state
            .snapshots()
            .filter(|s| req.snapshot_id.is_empty() || s.id == req.snapshot_id)
            .filter(|s| req.source_volume_id.is_empty() || s.source_volume_id == req.source_volume_id)
            .map(|s| &s.id)
            .collect();
        let (ids, next_token) =
            page(matching.into_iter(), &req.starting_token, req.max_entries, store::is_snapshot_id)?;
        let entries = ids
            .iter()
            .filter_map(|id| state.snapshot(id))
            .map(|s| list_snapshots_response::Entry { snapshot: Some(snapshot_message(s)) })
            .collect();
        Ok(ListSnapshotsResponse { entries, next_token })
    }

    #[tracing::instrument(err, skip_all, fields(snapshot.id = %req.snapshot_id))]
    pub async fn get_snapshot(&self, req: GetSnapshotRequest) -> Result<GetSnapshotResponse> {
        require(&req.snapshot_id, "snapshot_id")?;
        let state = self.state();
        let record = state.snapshot(&req.snapshot_id).ok_or_else(|| Error::not_found("snapshot not found"))?;
        Ok(GetSnapshotResponse { snapshot: Some(snapshot_message(record)) })
    }
}
