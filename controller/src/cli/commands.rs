//! The client subcommands themselves: `volume …`, `snapshot …` and
//! `info`, each one or a few CSI RPCs and what they print.

use std::collections::HashMap;

use anyhow::Context;
use csi_proto::contract::{PublishContext, VolumeAccess, VolumeContext};
use csi_proto::controller_client::ControllerClient;
use csi_proto::identity_client::IdentityClient;
use csi_proto::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use csi_proto::*;
use serde_json::{Value, json};

use super::args::Output;
use super::args::{SnapshotCommand, VolumeCommand};
use super::render::{VolumeView, human_size, or_dash, print, rfc3339, snapshot_json, snapshot_text, table};
use super::requests::{all_snapshots, all_volumes, capability, rpc};
use super::{ClientArgs, SnapshotArgs, VolumeArgs};

pub async fn volume(args: VolumeArgs) -> anyhow::Result<()> {
    let out = args.client.output;
    let mut c = args.client.controller().await?;
    match args.command {
        VolumeCommand::Create { name, size, block, fs_type, access_modes, from_snapshot, from_volume } => {
            let fs_type = fs_type.unwrap_or_default();
            let source = match (from_snapshot, from_volume) {
                (Some(id), _) => {
                    Some(VolumeContentSource { r#type: Some(SourceType::Snapshot(SnapshotSource { snapshot_id: id })) })
                }
                (None, Some(id)) => {
                    Some(VolumeContentSource { r#type: Some(SourceType::Volume(VolumeSource { volume_id: id })) })
                }
                (None, None) => None,
            };
            let req = CreateVolumeRequest {
                name,
                capacity_range: size.map(|s| CapacityRange { required_bytes: s as i64, limit_bytes: 0 }),
                volume_capabilities: access_modes.iter().map(|m| capability(block, &fs_type, (*m).into())).collect(),
                volume_content_source: source,
                ..Default::default()
            };
            let v =
                rpc("CreateVolume", c.create_volume(req).await)?.volume.context("CreateVolume returned no volume")?;
            let view = VolumeView { volume: &v, published: None, condition: None };
            print(out, view.text(), view.json());
        }
        VolumeCommand::List => {
            let entries = all_volumes(&mut c, 0).await?;
            let mut rows = Vec::new();
            let mut docs = Vec::new();
            for e in &entries {
                let Some(v) = &e.volume else { continue };
                let status = e.status.as_ref();
                let view = VolumeView {
                    volume: v,
                    published: status.map(|s| s.published_node_ids.as_slice()),
                    condition: status.and_then(|s| s.volume_condition.as_ref()),
                };
                let nodes = view.published.map(|n| n.join(",")).unwrap_or_default();
                let condition = view.condition.map_or("-", |c| if c.abnormal { "abnormal" } else { "ok" });
                rows.push(vec![
                    v.volume_id.clone(),
                    or_dash(&view.name()).to_string(),
                    human_size(v.capacity_bytes as u64),
                    or_dash(view.access()).to_string(),
                    or_dash(&nodes).to_string(),
                    condition.to_string(),
                ]);
                docs.push(view.json());
            }
            let text = if rows.is_empty() {
                "no volumes\n".to_string()
            } else {
                table(&["ID", "NAME", "SIZE", "ACCESS", "PUBLISHED", "CONDITION"], &rows)
            };
            print(out, text, Value::Array(docs));
        }
        VolumeCommand::Get { id } => {
            let r = rpc(
                "ControllerGetVolume",
                c.controller_get_volume(ControllerGetVolumeRequest { volume_id: id }).await,
            )?;
            let v = r.volume.context("ControllerGetVolume returned no volume")?;
            let status = r.status.as_ref();
            let view = VolumeView {
                volume: &v,
                published: status.map(|s| s.published_node_ids.as_slice()),
                condition: status.and_then(|s| s.volume_condition.as_ref()),
            };
            print(out, view.text(), view.json());
        }
        VolumeCommand::Delete { id } => {
            rpc(
                "DeleteVolume",
                c.delete_volume(DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() }).await,
            )?;
            print(out, format!("deleted volume {id}\n"), json!({"deleted": id}));
        }
        VolumeCommand::Expand { id, size } => {
            let req = ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                capacity_range: Some(CapacityRange { required_bytes: size as i64, limit_bytes: 0 }),
                ..Default::default()
            };
            let r = rpc("ControllerExpandVolume", c.controller_expand_volume(req).await)?;
            let node = if r.node_expansion_required { " (NodeExpandVolume finishes it on the node)" } else { "" };
            print(
                out,
                format!("volume {id} is {} ({} bytes){node}\n", human_size(r.capacity_bytes as u64), r.capacity_bytes),
                json!({"id": id, "capacity_bytes": r.capacity_bytes, "node_expansion_required": r.node_expansion_required}),
            );
        }
        VolumeCommand::Publish { id, node, readonly, access_mode } => {
            // The capability must match how the volume was created.
            let got = rpc(
                "ControllerGetVolume",
                c.controller_get_volume(ControllerGetVolumeRequest { volume_id: id.clone() }).await,
            )?;
            let context = got.volume.map(|v| v.volume_context).unwrap_or_default();
            let (block, fs_type) = match VolumeContext::try_from(&context).context("ControllerGetVolume")?.access {
                VolumeAccess::Block => (true, String::new()),
                VolumeAccess::Mount { fs_type } => (false, fs_type),
            };
            let req = ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: node.clone(),
                volume_capability: Some(capability(block, &fs_type, access_mode.into())),
                readonly,
                ..Default::default()
            };
            let r = rpc("ControllerPublishVolume", c.controller_publish_volume(req).await)?;
            let published = PublishContext::try_from(&r.publish_context).context("ControllerPublishVolume")?;
            let uri = published.nbd_uri.to_uri_string();
            if out == Output::Text {
                let ro = published.read_only;
                eprintln!("published {id} to node {node} ({})", if ro { "read-only" } else { "read-write" });
            }
            let context: HashMap<&String, &String> = r.publish_context.iter().collect();
            print(out, format!("{uri}\n"), json!({"id": id, "node": node, "publish_context": context}));
        }
        VolumeCommand::Unpublish { id, node } => {
            let req =
                ControllerUnpublishVolumeRequest { volume_id: id.clone(), node_id: node.clone(), ..Default::default() };
            rpc("ControllerUnpublishVolume", c.controller_unpublish_volume(req).await)?;
            print(out, format!("unpublished {id} from node {node}\n"), json!({"id": id, "unpublished": node}));
        }
    }
    Ok(())
}

pub async fn snapshot(args: SnapshotArgs) -> anyhow::Result<()> {
    let out = args.client.output;
    let mut c = args.client.controller().await?;
    match args.command {
        SnapshotCommand::Create { name, volume } => {
            let req = CreateSnapshotRequest { source_volume_id: volume, name, ..Default::default() };
            let s = rpc("CreateSnapshot", c.create_snapshot(req).await)?.snapshot.context("no snapshot returned")?;
            print(out, snapshot_text(&s), snapshot_json(&s));
        }
        SnapshotCommand::List { volume } => {
            let snapshots = all_snapshots(&mut c, volume.as_deref().unwrap_or(""), 0).await?;
            let rows: Vec<Vec<String>> = snapshots
                .iter()
                .map(|s| {
                    vec![
                        s.snapshot_id.clone(),
                        s.source_volume_id.clone(),
                        human_size(s.size_bytes as u64),
                        rfc3339(s.creation_time.as_ref()),
                        s.ready_to_use.to_string(),
                    ]
                })
                .collect();
            let text = if rows.is_empty() {
                "no snapshots\n".to_string()
            } else {
                table(&["ID", "VOLUME", "SIZE", "CREATED", "READY"], &rows)
            };
            print(out, text, Value::Array(snapshots.iter().map(snapshot_json).collect()));
        }
        SnapshotCommand::Get { id } => {
            let req = GetSnapshotRequest { snapshot_id: id, ..Default::default() };
            let s = rpc("GetSnapshot", c.get_snapshot(req).await)?.snapshot.context("no snapshot returned")?;
            print(out, snapshot_text(&s), snapshot_json(&s));
        }
        SnapshotCommand::Delete { id } => {
            let req = DeleteSnapshotRequest { snapshot_id: id.clone(), ..Default::default() };
            rpc("DeleteSnapshot", c.delete_snapshot(req).await)?;
            print(out, format!("deleted snapshot {id}\n"), json!({"deleted": id}));
        }
    }
    Ok(())
}

/// `info`: plugin name and version, readiness, free capacity.
pub async fn info(args: ClientArgs) -> anyhow::Result<()> {
    let channel = args.channel().await?;
    let mut identity = IdentityClient::new(channel.clone());
    let mut c = ControllerClient::new(channel);
    let plugin = rpc("GetPluginInfo", identity.get_plugin_info(GetPluginInfoRequest {}).await)?;
    let ready = rpc("Probe", identity.probe(ProbeRequest {}).await)?.ready;
    let capacity = rpc("GetCapacity", c.get_capacity(GetCapacityRequest::default()).await)?;
    let volumes = all_volumes(&mut c, 0).await?.len();
    let snapshots = all_snapshots(&mut c, "", 0).await?.len();
    let text = format!(
        "endpoint:   {}\ndriver:     {} {}\nready:      {}\nvolumes:    {volumes}\nsnapshots:  {snapshots}\navailable:  {} ({} bytes)\n",
        args.endpoint(),
        plugin.name,
        plugin.vendor_version,
        ready.map_or("unknown".into(), |r| r.to_string()),
        human_size(capacity.available_capacity as u64 / (1 << 20) * (1 << 20)),
        capacity.available_capacity,
    );
    let doc = json!({
        "endpoint": args.endpoint().to_string(),
        "driver": plugin.name,
        "version": plugin.vendor_version,
        "ready": ready,
        "volumes": volumes,
        "snapshots": snapshots,
        "available_capacity": capacity.available_capacity,
    });
    print(args.output, text, doc);
    Ok(())
}
