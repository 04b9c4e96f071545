use csi_proto::volume_capability::access_mode::Mode;
use csi_proto::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use csi_proto::*;
use tonic::Code;

use super::*;
use agent::testing::Client;

const MIB: i64 = 1 << 20;
const MODE: Mode = Mode::SingleNodeWriter;

fn snap_req(name: &str, volume_id: &str) -> CreateSnapshotRequest {
    CreateSnapshotRequest { name: name.into(), source_volume_id: volume_id.into(), ..Default::default() }
}

fn from_source(name: &str, source: SourceType, bytes: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        volume_content_source: Some(VolumeContentSource { r#type: Some(source) }),
        ..create_req(name, bytes, true, MODE)
    }
}

async fn attach(c: &mut ControllerClient<Channel>, volume_id: &str) -> Client {
    let ctx =
        c.controller_publish_volume(publish_req(volume_id, NODE_A, true, MODE, false)).await.unwrap().into_inner();
    let (addr, name) = export_of(&ctx.publish_context);
    Client::connect(&addr, &name).await.unwrap()
}

#[tokio::test]
async fn snapshots_are_point_in_time_and_restore_into_new_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path()).await;
    let mut c = h.controller().await;
    let v = c.create_volume(create_req("src", 2 * MIB, true, MODE)).await.unwrap().into_inner().volume.unwrap();
    let mut client = attach(&mut c, &v.volume_id).await;
    // Written without FLUSH: the snapshot must flush it itself.
    assert_eq!(client.write(MIB as u64, b"before").await.unwrap(), 0);
    let snap = c.create_snapshot(snap_req("s1", &v.volume_id)).await.unwrap().into_inner().snapshot.unwrap();
    assert!(snap.ready_to_use && snap.size_bytes == 2 * MIB && snap.creation_time.is_some());
    assert_eq!(snap.source_volume_id, v.volume_id);
    assert_eq!(client.write(MIB as u64, b"after!").await.unwrap(), 0);

    let same = c.create_snapshot(snap_req("s1", &v.volume_id)).await.unwrap().into_inner().snapshot.unwrap();
    assert_eq!(same.snapshot_id, snap.snapshot_id);
    let other = c.create_volume(create_req("other", MIB, true, MODE)).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(code(c.create_snapshot(snap_req("s1", &other.volume_id)).await), Code::AlreadyExists);
    assert_eq!(code(c.create_snapshot(snap_req("s2", "vol-nope")).await), Code::NotFound);
    assert_eq!(code(c.create_snapshot(snap_req("", &v.volume_id)).await), Code::InvalidArgument);
    assert_eq!(code(c.create_snapshot(snap_req("s3", "")).await), Code::InvalidArgument);

    let restore = SourceType::Snapshot(SnapshotSource { snapshot_id: snap.snapshot_id.clone() });
    let restored = c.create_volume(from_source("restored", restore.clone(), 4 * MIB)).await.unwrap().into_inner();
    let restored = restored.volume.unwrap();
    assert_eq!(restored.capacity_bytes, 4 * MIB);
    assert!(restored.content_source.is_some());
    let mut rc = {
        let ctx = c
            .controller_publish_volume(publish_req(&restored.volume_id, NODE_B, true, MODE, false))
            .await
            .unwrap()
            .into_inner();
        let (addr, name) = export_of(&ctx.publish_context);
        Client::connect(&addr, &name).await.unwrap()
    };
    assert_eq!(rc.size, 4 << 20);
    assert_eq!(rc.read(MIB as u64, 6).await.unwrap(), b"before");
    let mut small = from_source("small", restore, MIB);
    small.capacity_range.as_mut().unwrap().limit_bytes = MIB;
    assert_eq!(code(c.create_volume(small).await), Code::OutOfRange);

    // A clone of the live volume sees what was written up to the clone.
    let clone = SourceType::Volume(VolumeSource { volume_id: v.volume_id.clone() });
    let cloned = c.create_volume(from_source("clone", clone, 0)).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(cloned.capacity_bytes, 2 * MIB, "at least the source's size");
    let missing = SourceType::Volume(VolumeSource { volume_id: "vol-nope".into() });
    assert_eq!(code(c.create_volume(from_source("c2", missing, 0)).await), Code::NotFound);
    let image = std::fs::read(h.data_dir.join("volumes").join(format!("{}.img", cloned.volume_id))).unwrap();
    assert_eq!(&image[MIB as usize..MIB as usize + 6], b"after!");
    h.stop().await;
}

#[tokio::test]
async fn list_get_and_delete_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path()).await;
    let mut c = h.controller().await;
    let a = c.create_volume(create_req("a", MIB, true, MODE)).await.unwrap().into_inner().volume.unwrap().volume_id;
    let b = c.create_volume(create_req("b", MIB, true, MODE)).await.unwrap().into_inner().volume.unwrap().volume_id;
    let mut ids = Vec::new();
    for (i, vol) in [&a, &a, &b, &b, &b].iter().enumerate() {
        let s = c.create_snapshot(snap_req(&format!("s{i}"), vol)).await.unwrap().into_inner().snapshot.unwrap();
        ids.push(s.snapshot_id);
    }
    let all = c.list_snapshots(ListSnapshotsRequest::default()).await.unwrap().into_inner();
    assert_eq!(all.entries.len(), 5);
    let page =
        c.list_snapshots(ListSnapshotsRequest { max_entries: 2, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(page.entries.len(), 2);
    let rest = c
        .list_snapshots(ListSnapshotsRequest { starting_token: page.next_token, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.entries.len(), 3);
    let of_b = ListSnapshotsRequest { source_volume_id: b.clone(), ..Default::default() };
    assert_eq!(c.list_snapshots(of_b).await.unwrap().into_inner().entries.len(), 3);
    let one = ListSnapshotsRequest { snapshot_id: ids[0].clone(), ..Default::default() };
    let one = c.list_snapshots(one).await.unwrap().into_inner();
    assert_eq!(one.entries.len(), 1);
    let none = ListSnapshotsRequest { snapshot_id: "snap-nope".into(), ..Default::default() };
    assert!(c.list_snapshots(none).await.unwrap().into_inner().entries.is_empty());
    let bad = ListSnapshotsRequest { starting_token: "garbage".into(), ..Default::default() };
    assert_eq!(code(c.list_snapshots(bad).await), Code::Aborted);

    let got = c.get_snapshot(GetSnapshotRequest { snapshot_id: ids[2].clone(), ..Default::default() }).await.unwrap();
    assert_eq!(got.into_inner().snapshot.unwrap().source_volume_id, b);
    let missing = GetSnapshotRequest { snapshot_id: "snap-nope".into(), ..Default::default() };
    assert_eq!(code(c.get_snapshot(missing).await), Code::NotFound);

    // Snapshots outlive their source volume.
    c.delete_volume(DeleteVolumeRequest { volume_id: b.clone(), ..Default::default() }).await.unwrap();
    let del = |id: &str| DeleteSnapshotRequest { snapshot_id: id.into(), ..Default::default() };
    c.delete_snapshot(del(&ids[2])).await.unwrap();
    c.delete_snapshot(del(&ids[2])).await.unwrap();
    assert_eq!(code(c.delete_snapshot(del("")).await), Code::InvalidArgument);
    let left = c.list_snapshots(ListSnapshotsRequest::default()).await.unwrap().into_inner();
    assert_eq!(left.entries.len(), 4);
    h.stop().await;
}

fn mount_from(name: &str, source: SourceType) -> CreateVolumeRequest {
    CreateVolumeRequest {
        volume_content_source: Some(VolumeContentSource { r#type: Some(source) }),
        ..create_req(name, MIB, false, MODE)
    }
}

#[tokio::test]
async fn block_content_never_becomes_a_filesystem_volume() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path()).await;
    let mut c = h.controller().await;
    let block = c.create_volume(create_req("raw", MIB, true, MODE)).await.unwrap().into_inner().volume.unwrap();
    let fs = c.create_volume(create_req("fs", MIB, false, MODE)).await.unwrap().into_inner().volume.unwrap();
    let block_snap = c.create_snapshot(snap_req("raw-snap", &block.volume_id)).await.unwrap().into_inner();
    let block_snap = block_snap.snapshot.unwrap().snapshot_id;
    let fs_snap = c.create_snapshot(snap_req("fs-snap", &fs.volume_id)).await.unwrap().into_inner();
    let fs_snap = fs_snap.snapshot.unwrap().snapshot_id;
    let snapshot = |id: &str| SourceType::Snapshot(SnapshotSource { snapshot_id: id.into() });
    let volume = |id: &str| SourceType::Volume(VolumeSource { volume_id: id.into() });

    // A block volume's bytes (a crafted superblock, say) are never mounted.
    for (name, source) in [("m1", snapshot(&block_snap)), ("m2", volume(&block.volume_id))] {
        let err = c.create_volume(mount_from(name, source)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("block"), "{}", err.message());
    }
    // Block to block, and a filesystem either way, are fine.
    c.create_volume(from_source("b1", snapshot(&block_snap), MIB)).await.unwrap();
    c.create_volume(from_source("b2", volume(&block.volume_id), MIB)).await.unwrap();
    c.create_volume(mount_from("m3", snapshot(&fs_snap))).await.unwrap();
    c.create_volume(mount_from("m4", volume(&fs.volume_id))).await.unwrap();
    c.create_volume(from_source("b3", snapshot(&fs_snap), MIB)).await.unwrap();
    let list = c.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner();
    assert_eq!(list.entries.len(), 2 + 5);
    h.stop().await;
}

#[tokio::test]
async fn older_snapshot_records_learn_their_source_access_type_or_count_as_block() {
    let dir = tempfile::tempdir().unwrap();
    let ports = 27080..=27111;
    let h = Harness::start_with_ports(dir.path(), ports.clone()).await;
    let mut c = h.controller().await;
    let fs = c.create_volume(create_req("fs", MIB, false, MODE)).await.unwrap().into_inner().volume.unwrap();
    let gone = c.create_volume(create_req("gone", MIB, false, MODE)).await.unwrap().into_inner().volume.unwrap();
    let mut snaps = Vec::new();
    for (name, volume) in [("of-fs", &fs), ("of-gone", &gone)] {
        let s = c.create_snapshot(snap_req(name, &volume.volume_id)).await.unwrap().into_inner();
        snaps.push(s.snapshot.unwrap().snapshot_id);
    }
    c.delete_volume(DeleteVolumeRequest { volume_id: gone.volume_id.clone(), ..Default::default() }).await.unwrap();
    h.stop().await;
    // Rewrite both records as an older version wrote them.
    let record_path = |id: &str| dir.path().join("data/snapshots").join(format!("{id}.json"));
    for id in &snaps {
        let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(record_path(id)).unwrap()).unwrap();
        assert_eq!(json.as_object_mut().unwrap().remove("source_block"), Some(serde_json::Value::Bool(false)));
        std::fs::write(record_path(id), json.to_string()).unwrap();
    }

    let h = Harness::start_with_ports(dir.path(), ports).await;
    let mut c = h.controller().await;
    // The source still exists: its access type is learnt and saved.
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(record_path(&snaps[0])).unwrap()).unwrap();
    assert_eq!(saved["source_block"], serde_json::Value::Bool(false));
    let snapshot = |id: &str| SourceType::Snapshot(SnapshotSource { snapshot_id: id.into() });
    c.create_volume(mount_from("from-fs", snapshot(&snaps[0]))).await.unwrap();
    // The source is gone: it might have been block, so only block restores.
    assert_eq!(code(c.create_volume(mount_from("from-gone", snapshot(&snaps[1]))).await), Code::InvalidArgument);
    c.create_volume(from_source("from-gone-block", snapshot(&snaps[1]), MIB)).await.unwrap();
    h.stop().await;
}
