//! A minimal CSI Node client for the real-kernel tests: one RPC per run
//! against `nbd-csi-node serve`, printing the reply (or the gRPC status)
//! and how long the call took.
//!
//! Usage:
//!   csi-node-client SOCKET stage VOLUME STAGING NBD_URI [--block] [--fs-type T]
//!   csi-node-client SOCKET unstage VOLUME STAGING
//!   csi-node-client SOCKET publish VOLUME STAGING TARGET [--block]
//!   csi-node-client SOCKET unpublish VOLUME TARGET
//!   csi-node-client SOCKET expand VOLUME VOLUME_PATH STAGING BYTES
//!   csi-node-client SOCKET stats VOLUME VOLUME_PATH

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use csi_proto::contract::publish_key;
use csi_proto::node_client::NodeClient;
use csi_proto::volume_capability::access_mode::Mode;
use csi_proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use csi_proto::*;

fn capability(block: bool, fs_type: &str) -> VolumeCapability {
    let access_type = if block {
        AccessType::Block(BlockVolume {})
    } else {
        AccessType::Mount(MountVolume { fs_type: fs_type.to_owned(), ..Default::default() })
    };
    VolumeCapability {
        access_type: Some(access_type),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let block = args.iter().any(|a| a == "--block");
    let fs_type = args.iter().position(|a| a == "--fs-type").and_then(|i| args.get(i + 1)).cloned();
    let pos: Vec<&str> = {
        let mut skip = false;
        let mut out = Vec::new();
        for a in &args {
            if skip {
                skip = false;
            } else if a == "--fs-type" {
                skip = true;
            } else if !a.starts_with("--") {
                out.push(a.as_str());
            }
        }
        out
    };
    let arg = |i: usize| pos.get(i).copied().context("missing argument (see the usage in the source)");
    let socket = arg(0)?.trim_start_matches("unix://");
    let channel = tonic::transport::Endpoint::from_shared(format!("unix://{socket}"))?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .context("connecting to the node plugin")?;
    let mut node = NodeClient::new(channel);
    let start = Instant::now();
    let cap = capability(block, fs_type.as_deref().unwrap_or(""));
    let reply = match arg(1)? {
        "stage" => {
            // Sent as given, unchecked: a test may want the node to refuse it.
            let publish_context = HashMap::from([(publish_key::NBD_URI.to_owned(), arg(4)?.to_owned())]);
            node.node_stage_volume(NodeStageVolumeRequest {
                volume_id: arg(2)?.into(),
                staging_target_path: arg(3)?.into(),
                publish_context,
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .map(|r| format!("{:?}", r.into_inner()))
        }
        "unstage" => node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: arg(2)?.into(),
                staging_target_path: arg(3)?.into(),
            })
            .await
            .map(|r| format!("{:?}", r.into_inner())),
        "publish" => node
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: arg(2)?.into(),
                staging_target_path: arg(3)?.into(),
                target_path: arg(4)?.into(),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .map(|r| format!("{:?}", r.into_inner())),
        "unpublish" => node
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: arg(2)?.into(),
                target_path: arg(3)?.into(),
            })
            .await
            .map(|r| format!("{:?}", r.into_inner())),
        "expand" => {
            let bytes: i64 = arg(5)?.parse().context("BYTES")?;
            node.node_expand_volume(NodeExpandVolumeRequest {
                volume_id: arg(2)?.into(),
                volume_path: arg(3)?.into(),
                staging_target_path: arg(4)?.into(),
                capacity_range: Some(CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .map(|r| format!("capacity_bytes={}", r.into_inner().capacity_bytes))
        }
        "stats" => node
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: arg(2)?.into(),
                volume_path: arg(3)?.into(),
                staging_target_path: String::new(),
            })
            .await
            .map(|r| format!("{:?}", r.into_inner())),
        other => bail!("unknown call {other:?}"),
    };
    let ms = start.elapsed().as_millis();
    match reply {
        Ok(text) => {
            println!("ok ms={ms} {text}");
            Ok(())
        }
        Err(status) => {
            println!("error ms={ms} code={:?} message={}", status.code(), status.message());
            std::process::exit(2)
        }
    }
}
