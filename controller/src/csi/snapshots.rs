//! CreateSnapshot, DeleteSnapshot, ListSnapshots, GetSnapshot; the agent
//! takes the point-in-time copy (in cluster mode, the agent of the source
//! volume's storage node, through an NbdSnapshot).

use agent::{NewSnapshot, SnapshotRecord};
use csi_proto::*;
use tracing::Span;

use super::{check_parameters, page, require};
use crate::driver::{Driver, LockKey};
use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::storage::objects;

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
        let checked = check_parameters(&req.parameters)?;
        if checked.tls.is_some() {
            // A restore speaks at least its source volume's TLS; a
            // snapshot has no export of its own to say it for.
            return Err(Error::invalid("tls is a StorageClass parameter: a VolumeSnapshotClass cannot set it"));
        }
        let parameters = checked.kept;
        let _name_guard = self.lock(LockKey::SnapshotName(req.name.to_owned())).await;
        let agent = match self.storage() {
            Storage::Embedded(agent) => agent,
            Storage::Cluster(cluster) => {
                Span::current().record("snapshot.id", objects::snapshot_id(&req.name).as_str());
                let snapshot = cluster.create_snapshot(&req.name, &req.source_volume_id, parameters).await?;
                return Ok(CreateSnapshotResponse { snapshot: Some(snapshot) });
            }
        };
        let existing = agent.find_snapshot_by_name(&req.name);
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
        let record = agent
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
        match self.storage() {
            Storage::Embedded(agent) => agent.delete_snapshot(&id).await?,
            Storage::Cluster(cluster) => cluster.delete_snapshot(&id).await?,
        }
        Ok(DeleteSnapshotResponse {})
    }

    #[tracing::instrument(err, skip_all, fields(snapshot.id = %req.snapshot_id, volume.id = %req.source_volume_id))]
    pub async fn list_snapshots(&self, req: ListSnapshotsRequest) -> Result<ListSnapshotsResponse> {
        let snapshots: Vec<Snapshot> = match self.storage() {
            Storage::Embedded(agent) => agent.snapshots().iter().map(snapshot_message).collect(),
            Storage::Cluster(cluster) => {
                cluster.list_snapshots().await?.iter().map(objects::snapshot_message).collect()
            }
        };
        let matching: Vec<&String> = snapshots
            .iter()
            .filter(|s| req.snapshot_id.is_empty() || s.snapshot_id == req.snapshot_id)
            .filter(|s| req.source_volume_id.is_empty() || s.source_volume_id == req.source_volume_id)
            .map(|s| &s.snapshot_id)
            .collect();
        let (ids, next_token) =
            page(matching.into_iter(), &req.starting_token, req.max_entries, agent::is_snapshot_id)?;
        let entries = snapshots
            .iter()
            // Both in id order: the page is one run of them.
            .filter(|s| ids.binary_search(&s.snapshot_id).is_ok())
            .map(|s| list_snapshots_response::Entry { snapshot: Some(s.clone()) })
            .collect();
        Ok(ListSnapshotsResponse { entries, next_token })
    }

    #[tracing::instrument(err, skip_all, fields(snapshot.id = %req.snapshot_id))]
    pub async fn get_snapshot(&self, req: GetSnapshotRequest) -> Result<GetSnapshotResponse> {
        require(&req.snapshot_id, "snapshot_id")?;
        let snapshot = match self.storage() {
            Storage::Embedded(agent) => agent
                .snapshot(&req.snapshot_id)
                .map(|record| snapshot_message(&record))
                .ok_or_else(|| Error::not_found("snapshot not found"))?,
            Storage::Cluster(cluster) => objects::snapshot_message(&cluster.snapshot(&req.snapshot_id).await?),
        };
        Ok(GetSnapshotResponse { snapshot: Some(snapshot) })
    }
}
