//! CreateSnapshot, DeleteSnapshot, ListSnapshots, GetSnapshot; the agent
//! takes the point-in-time copy.

use agent::{NewSnapshot, SnapshotRecord};
use csi_proto::*;
use tracing::Span;

use super::{check_parameters, page, require};
use crate::driver::{Driver, LockKey};
use crate::error::{Error, Result};

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
    #[tracing::instrument(err, skip_all, fields(snapshot.name = %req.name, volume.id = %req.source_volume_id, snapshot.id = tracing::field::Empty))]
    pub async fn create_snapshot(&self, req: CreateSnapshotRequest) -> Result<CreateSnapshotResponse> {
        require(&req.name, "name")?;
        require(&req.source_volume_id, "source_volume_id")?;
        let parameters = check_parameters(&req.parameters)?;
        let _name_guard = self.lock(LockKey::SnapshotName(req.name.to_owned())).await;
        let existing = self.agent().find_snapshot_by_name(&req.name);
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
        let record = self
            .agent()
            .create_snapshot(NewSnapshot { id: None, name: req.name, source_volume_id: volume_id, parameters })
            .await?;
        Span::current().record("snapshot.id", record.id.as_str());
        Ok(CreateSnapshotResponse { snapshot: Some(snapshot_message(&record)) })
    }

    #[tracing::instrument(err, skip_all, fields(snapshot.id = %req.snapshot_id))]
    pub async fn delete_snapshot(&self, req: DeleteSnapshotRequest) -> Result<DeleteSnapshotResponse> {
        require(&req.snapshot_id, "snapshot_id")?;
        let id = req.snapshot_id;
        let _guard = self.lock(LockKey::SnapshotId(id.to_owned())).await;
        self.agent().delete_snapshot(&id).await?;
        Ok(DeleteSnapshotResponse {})
    }

    #[tracing::instrument(err, skip_all, fields(snapshot.id = %req.snapshot_id, volume.id = %req.source_volume_id))]
    pub async fn list_snapshots(&self, req: ListSnapshotsRequest) -> Result<ListSnapshotsResponse> {
        let snapshots = self.agent().snapshots();
        let matching: Vec<&String> = snapshots
            .iter()
            .filter(|s| req.snapshot_id.is_empty() || s.id == req.snapshot_id)
            .filter(|s| req.source_volume_id.is_empty() || s.source_volume_id == req.source_volume_id)
            .map(|s| &s.id)
            .collect();
        let (ids, next_token) =
            page(matching.into_iter(), &req.starting_token, req.max_entries, agent::is_snapshot_id)?;
        let entries = snapshots
            .iter()
            // Both in id order: the page is one run of them.
            .filter(|s| ids.binary_search(&s.id).is_ok())
            .map(|s| list_snapshots_response::Entry { snapshot: Some(snapshot_message(s)) })
            .collect();
        Ok(ListSnapshotsResponse { entries, next_token })
    }

    #[tracing::instrument(err, skip_all, fields(snapshot.id = %req.snapshot_id))]
    pub async fn get_snapshot(&self, req: GetSnapshotRequest) -> Result<GetSnapshotResponse> {
        require(&req.snapshot_id, "snapshot_id")?;
        let record = self.agent().snapshot(&req.snapshot_id).ok_or_else(|| Error::not_found("snapshot not found"))?;
        Ok(GetSnapshotResponse { snapshot: Some(snapshot_message(&record)) })
    }
}
