//! The CSI requests the client subcommands send, and the answers they
//! read: errors as one line, capabilities, lists followed to their end.
//! The examples and the integration tests build theirs with these too.

use anyhow::bail;
use csi_proto::controller_client::ControllerClient;
use csi_proto::volume_capability::access_mode::Mode;
use csi_proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use csi_proto::*;
use tonic::transport::Channel;

/// An RPC's error as `METHOD: CODE: message`.
pub(super) fn rpc<T>(method: &str, result: Result<tonic::Response<T>, tonic::Status>) -> anyhow::Result<T> {
    match result {
        Ok(response) => Ok(response.into_inner()),
        Err(status) => bail!("{method} failed: {:?}: {}", status.code(), status.message()),
    }
}

/// One volume capability: raw block, or a filesystem of `fs_type` (empty:
/// the node's default), with access `mode`.
pub fn capability(block: bool, fs_type: &str, mode: Mode) -> VolumeCapability {
    let access_type = if block {
        AccessType::Block(BlockVolume {})
    } else {
        AccessType::Mount(MountVolume { fs_type: fs_type.to_string(), ..Default::default() })
    };
    VolumeCapability { access_type: Some(access_type), access_mode: Some(AccessMode { mode: mode as i32 }) }
}

/// Upper bound on pages followed, against a server that never ends a list.
const MAX_PAGES: usize = 100_000;

/// Every volume, following ListVolumes' pages of at most `max_entries`
/// (0: as many as the server sends) to the end.
pub async fn all_volumes(
    c: &mut ControllerClient<Channel>,
    max_entries: i32,
) -> anyhow::Result<Vec<list_volumes_response::Entry>> {
    let mut entries = Vec::new();
    let mut token = String::new();
    for _ in 0..MAX_PAGES {
        let req = ListVolumesRequest { max_entries, starting_token: token };
        let page = rpc("ListVolumes", c.list_volumes(req).await)?;
        entries.extend(page.entries);
        if page.next_token.is_empty() {
            return Ok(entries);
        }
        token = page.next_token;
    }
    bail!("ListVolumes did not end after {MAX_PAGES} pages")
}

/// Every snapshot (of `volume`, when not empty), following ListSnapshots'
/// pages of at most `max_entries` (0: as many as the server sends).
pub async fn all_snapshots(
    c: &mut ControllerClient<Channel>,
    volume: &str,
    max_entries: i32,
) -> anyhow::Result<Vec<Snapshot>> {
    let mut snapshots = Vec::new();
    let mut token = String::new();
    for _ in 0..MAX_PAGES {
        let req = ListSnapshotsRequest {
            source_volume_id: volume.to_string(),
            max_entries,
            starting_token: token,
            ..Default::default()
        };
        let page = rpc("ListSnapshots", c.list_snapshots(req).await)?;
        snapshots.extend(page.entries.into_iter().filter_map(|e| e.snapshot));
        if page.next_token.is_empty() {
            return Ok(snapshots);
        }
        token = page.next_token;
    }
    bail!("ListSnapshots did not end after {MAX_PAGES} pages")
}
