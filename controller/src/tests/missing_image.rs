//! A stored volume whose image file is missing is reported abnormal and can
//! be deleted; it does not stop the controller, and the others serve.

use csi_proto::volume_capability::access_mode::Mode;
use csi_proto::*;
use tonic::Code;

use super::*;
use agent::testing::Client;

const MIB: i64 = 1 << 20;
const MODE: Mode = Mode::SingleNodeWriter;

fn condition_of(entries: &[list_volumes_response::Entry], id: &str) -> VolumeCondition {
    let entry = entries.iter().find(|e| e.volume.as_ref().unwrap().volume_id == id).expect("volume listed");
    entry.status.as_ref().unwrap().volume_condition.clone().unwrap()
}

#[tokio::test]
async fn a_volume_without_its_image_is_abnormal_and_the_others_serve() {
    let dir = tempfile::tempdir().unwrap();
    let ports = 27040..=27071;
    let h = Harness::start_with_ports(dir.path(), ports.clone()).await;
    let mut c = h.controller().await;
    let lost = c.create_volume(create_req("lost", MIB, true, MODE)).await.unwrap().into_inner().volume.unwrap();
    let kept = c.create_volume(create_req("kept", MIB, true, MODE)).await.unwrap().into_inner().volume.unwrap();
    let ctx = c
        .controller_publish_volume(publish_req(&kept.volume_id, NODE_A, true, MODE, false))
        .await
        .unwrap()
        .into_inner();
    let uri = published(&ctx.publish_context).nbd_uri;
    let (addr, export) = (uri.authority(), uri.export.clone());
    let mut client = Client::connect(&addr, &export).await.unwrap();
    assert_eq!(client.write(4096, &[7; 4096]).await.unwrap(), 0);
    assert_eq!(client.flush().await.unwrap(), 0);
    drop(client);
    h.stop().await;

    let image = dir.path().join("data/volumes").join(format!("{}.img", lost.volume_id));
    std::fs::remove_file(&image).unwrap();

    let h = Harness::start_with_ports(dir.path(), ports).await;
    let mut id = h.identity().await;
    assert_eq!(
        id.probe(ProbeRequest {}).await.unwrap().into_inner().ready,
        Some(true),
        "a volume that can never serve does not hold readiness back"
    );
    let mut c = h.controller().await;
    // The other volume serves its data.
    let again = c
        .controller_publish_volume(publish_req(&kept.volume_id, NODE_A, true, MODE, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(published(&again.publish_context).nbd_uri, uri);
    let mut client = Client::connect(&addr, &export).await.unwrap();
    assert_eq!(client.read(4096, 4096).await.unwrap(), vec![7; 4096]);

    // The broken one is abnormal, with the reason, in both RPCs.
    let got = c.controller_get_volume(ControllerGetVolumeRequest { volume_id: lost.volume_id.clone() }).await;
    let condition = got.unwrap().into_inner().status.unwrap().volume_condition.unwrap();
    assert!(condition.abnormal);
    assert!(condition.message.contains("missing") && condition.message.contains(&lost.volume_id), "{condition:?}");
    let list = c.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner();
    assert_eq!(condition_of(&list.entries, &lost.volume_id), condition);
    assert!(!condition_of(&list.entries, &kept.volume_id).abnormal);

    // What needs its data is refused clearly; deleting it works.
    let snap = CreateSnapshotRequest {
        name: "of-lost".into(),
        source_volume_id: lost.volume_id.clone(),
        ..Default::default()
    };
    assert_eq!(code(c.create_snapshot(snap).await), Code::FailedPrecondition);
    let expand = ControllerExpandVolumeRequest {
        volume_id: lost.volume_id.clone(),
        capacity_range: Some(CapacityRange { required_bytes: 2 * MIB, limit_bytes: 0 }),
        ..Default::default()
    };
    assert_eq!(code(c.controller_expand_volume(expand).await), Code::FailedPrecondition);
    let publish = publish_req(&lost.volume_id, NODE_B, true, MODE, false);
    assert_eq!(code(c.controller_publish_volume(publish).await), Code::FailedPrecondition, "nothing serves it");
    c.delete_volume(DeleteVolumeRequest { volume_id: lost.volume_id.clone(), ..Default::default() }).await.unwrap();
    let list = c.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner();
    let ids: Vec<&str> = list.entries.iter().map(|e| e.volume.as_ref().unwrap().volume_id.as_str()).collect();
    assert_eq!(ids, vec![kept.volume_id.as_str()]);
    assert!(!dir.path().join("data/volumes").join(format!("{}.json", lost.volume_id)).exists());
    assert_eq!(client.read(4096, 4096).await.unwrap(), vec![7; 4096]);
    drop(client);
    h.stop().await;
}
