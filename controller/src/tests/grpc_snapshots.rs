use csi_proto::volume_capability::access_mode::Mode;
use csi_proto::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use csi_proto::*;
use tonic::Code;

use super::nbd_client::Client;
use super::*;

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
    let (addr, name) = parse_uri(&ctx.publish_context["nbdUri"]);
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
        let (addr, name) = parse_uri(&ctx.publish_context["nbdUri"]);
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
