//! A full data filesystem (thin volumes written past the disk) does not
//! wedge detach: unpublish and delete still work, nothing is left behind,
//! and the metadata reserve comes back once space is freed.

use csi_proto::volume_capability::access_mode::Mode;
use csi_proto::*;

use super::nbd_client::Client;
use super::*;
use crate::store::reserve;

const MIB: u64 = 1 << 20;
const MODE: Mode = Mode::SingleNodeWriter;
/// NBD's ENOSPC error code.
const ENOSPC: u32 = 28;

/// Writes into the volume behind `client` from offset 0 until the server
/// answers ENOSPC (1 MiB, then 4 KiB at a time, so the filesystem ends with
/// no free page); returns whether it did.
async fn write_until_full(client: &mut Client, size: u64) -> bool {
    let mut offset = 0;
    for chunk in [MIB, 4096] {
        let data = vec![0xa5u8; chunk as usize];
        loop {
            if offset + chunk > size {
                break;
            }
            match client.write(offset, &data).await.unwrap() {
                0 => offset += chunk,
                ENOSPC if chunk == 4096 => return true,
                ENOSPC => break,
                other => panic!("write at {offset} failed with NBD error {other}"),
            }
        }
    }
    false
}

#[tokio::test]
async fn unpublish_and_delete_work_on_a_full_data_filesystem() {
    let fs = Tmpfs::mount(16 * MIB);
    let h = Harness::start(fs.path()).await;
    let store = Arc::clone(&h.driver.store);
    assert_eq!(store.reserve_len().unwrap(), reserve::SIZE, "the reserve is made at start");
    let mut c = h.controller().await;

    // Thin: two 10 MiB volumes on a 16 MiB filesystem, both published.
    let mut volumes = Vec::new();
    for name in ["full-a", "full-b"] {
        let v = c.create_volume(create_req(name, 10 * MIB as i64, true, MODE)).await.unwrap().into_inner();
        let id = v.volume.unwrap().volume_id;
        let ctx = c.controller_publish_volume(publish_req(&id, NODE_A, true, MODE, false)).await.unwrap().into_inner();
        let (addr, export) = parse_uri(&ctx.publish_context["nbdUri"]);
        volumes.push((id, Client::connect(&addr, &export).await.unwrap()));
    }
    let mut full = false;
    for (_, client) in &mut volumes {
        full = write_until_full(client, 10 * MIB).await;
        if full {
            break;
        }
    }
    assert!(full, "writing 20 MiB into a 16 MiB filesystem ends with ENOSPC");
    assert_eq!(store.space().unwrap().available, 0, "the filesystem is full");

    for (id, _) in &volumes {
        let unpublish =
            ControllerUnpublishVolumeRequest { volume_id: id.clone(), node_id: NODE_A.into(), ..Default::default() };
        c.controller_unpublish_volume(unpublish).await.expect("unpublish works on a full disk");
        let got = c.controller_get_volume(ControllerGetVolumeRequest { volume_id: id.clone() }).await.unwrap();
        assert!(got.into_inner().status.unwrap().published_node_ids.is_empty());
    }
    assert!(store.reserve_len().unwrap() < reserve::SIZE, "the record writes drew on the reserve");
    assert!(temp_files(&h.data_dir).is_empty(), "{:?}", temp_files(&h.data_dir));
    for (id, _) in &volumes {
        c.delete_volume(DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() })
            .await
            .expect("delete works after a full disk");
    }
    assert!(c.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().entries.is_empty());
    assert!(temp_files(&h.data_dir).is_empty(), "{:?}", temp_files(&h.data_dir));
    assert_eq!(store.reserve_len().unwrap(), reserve::SIZE, "the freed space refilled the reserve");
    let reserve_path = h.data_dir.join(reserve::NAME);
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&reserve_path).unwrap()) * 512;
    assert!(allocated >= reserve::SIZE, "the reserve is allocated, not sparse: {allocated} bytes");
    drop(volumes);
    h.stop().await;
}
