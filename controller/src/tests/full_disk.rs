//! A full data filesystem (thin volumes written past the disk) does not
//! wedge detach: unpublish and delete still work, nothing is left behind,
//! and the metadata reserve comes back once space is freed.

use csi_proto::volume_capability::access_mode::Mode;
use csi_proto::*;

use super::*;
use agent::testing::{Client, Tmpfs, temp_files};
use agent::{RESERVE_FILE, RESERVE_SIZE};

const MIB: u64 = 1 << 20;
const MODE: Mode = Mode::SingleNodeWriter;
/// NBD's ENOSPC error code.
const ENOSPC: u32 = 28;

/// Writes into the volume behind `client` 1 MiB at a time from offset 0
/// until the server answers ENOSPC; returns whether it did. The write that
/// fails has filled every free page (a short write, then ENOSPC), which a
/// 4 KiB write into the volume's last, never written page confirms.
async fn write_until_full(client: &mut Client, size: u64) -> bool {
    let data = vec![0xa5u8; MIB as usize];
    for offset in (0..size).step_by(MIB as usize) {
        match client.write(offset, &data).await.unwrap() {
            0 => continue,
            ENOSPC => {
                assert_eq!(client.write(size - 4096, &[1; 4096]).await.unwrap(), ENOSPC, "no page is left");
                return true;
            }
            other => panic!("write at {offset} failed with NBD error {other}"),
        }
    }
    false
}

#[tokio::test]
async fn unpublish_and_delete_work_on_a_full_data_filesystem() {
    let fs = Tmpfs::mount(16 * MIB);
    let h = Harness::start(fs.path()).await;
    let agent = Arc::clone(h.driver.agent().expect("embedded"));
    assert_eq!(agent.reserve_len().unwrap(), RESERVE_SIZE, "the reserve is made at start");
    let mut c = h.controller().await;

    // Thin: two 10 MiB volumes on a 16 MiB filesystem, both published.
    let mut volumes = Vec::new();
    for name in ["full-a", "full-b"] {
        let v = c.create_volume(create_req(name, 10 * MIB as i64, true, MODE)).await.unwrap().into_inner();
        let id = v.volume.unwrap().volume_id;
        let ctx = c.controller_publish_volume(publish_req(&id, NODE_A, true, MODE, false)).await.unwrap().into_inner();
        let (addr, export) = export_of(&ctx.publish_context);
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
    assert_eq!(agent.space().await.unwrap().available, 0, "the filesystem is full");

    for (id, _) in &volumes {
        let unpublish =
            ControllerUnpublishVolumeRequest { volume_id: id.clone(), node_id: NODE_A.into(), ..Default::default() };
        c.controller_unpublish_volume(unpublish).await.expect("unpublish works on a full disk");
        let got = c.controller_get_volume(ControllerGetVolumeRequest { volume_id: id.clone() }).await.unwrap();
        assert!(got.into_inner().status.unwrap().published_node_ids.is_empty());
    }
    assert!(agent.reserve_len().unwrap() < RESERVE_SIZE, "the record writes drew on the reserve");
    assert!(temp_files(&h.data_dir).is_empty(), "{:?}", temp_files(&h.data_dir));
    for (id, _) in &volumes {
        c.delete_volume(DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() })
            .await
            .expect("delete works after a full disk");
    }
    assert!(c.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().entries.is_empty());
    assert!(temp_files(&h.data_dir).is_empty(), "{:?}", temp_files(&h.data_dir));
    assert_eq!(agent.reserve_len().unwrap(), RESERVE_SIZE, "the freed space refilled the reserve");
    let reserve_path = h.data_dir.join(RESERVE_FILE);
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&reserve_path).unwrap()) * 512;
    assert!(allocated >= RESERVE_SIZE, "the reserve is allocated, not sparse: {allocated} bytes");
    drop(volumes);
    h.stop().await;
}
