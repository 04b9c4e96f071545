//! The operator CLI: `nbd-csi-controller volume …`, `snapshot …` and
//! `info`, thin clients of the CSI RPCs over the endpoint a running
//! controller serves, so a volume can be created, served and inspected
//! without Kubernetes.
//!
//! Without `--endpoint` the client uses the server's own default,
//! `unix://<data-dir>/csi.sock` with `--data-dir` defaulting to
//! `nbd-csi-data` in the working directory: a server started with no
//! arguments and a client started with none, in the same directory, meet.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use csi_proto::contract::{PublishContext, VolumeAccess, VolumeContext};
use csi_proto::controller_client::ControllerClient;
use csi_proto::identity_client::IdentityClient;
use csi_proto::volume_capability::access_mode::Mode;
use csi_proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use csi_proto::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use csi_proto::*;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::service::{self, Endpoint};

/// How to reach the controller, and how to print; shared by every client
/// subcommand (and accepted after it: `volume list --endpoint …`).
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// CSI endpoint of the running controller: unix:///path/csi.sock or
    /// tcp://host:port [default: unix://<data-dir>/csi.sock, as the server]
    #[allow(rustdoc::invalid_html_tags)] // `<data-dir>` is --help text, not HTML
    #[arg(long, env = "CSI_ENDPOINT", global = true)]
    endpoint: Option<Endpoint>,
    /// The server's --data-dir; only used to find its default endpoint.
    #[arg(long, env = "NBD_CSI_DATA_DIR", default_value = "nbd-csi-data", global = true)]
    data_dir: PathBuf,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text, global = true)]
    output: Output,
    /// Seconds to wait for one RPC (clones and snapshots of big volumes copy data).
    #[arg(long, default_value_t = 300, global = true)]
    timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct VolumeArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: VolumeCommand,
}

#[derive(Debug, clap::Subcommand)]
enum VolumeCommand {
    /// CreateVolume: a new volume (or the existing one of that name).
    Create {
        /// The volume's name; creating the same name again is idempotent.
        name: String,
        /// Size, in bytes or with a binary suffix: 512M, 1G, 1GiB, 2T.
        /// Rounded up to a whole MiB [default: 1G, or the source's size].
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// A raw block volume (default: a filesystem volume the node formats).
        #[arg(long)]
        block: bool,
        /// Filesystem for a mount volume (the node's default when unset).
        #[arg(long, conflicts_with = "block")]
        fs_type: Option<String>,
        /// Access mode; repeat for several.
        #[arg(long = "access-mode", value_enum, default_values_t = [AccessModeArg::SingleNodeWriter])]
        access_modes: Vec<AccessModeArg>,
        /// Content from this snapshot.
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Content cloned from this volume (point in time).
        #[arg(long)]
        from_volume: Option<String>,
    },
    /// ListVolumes: every volume, with the nodes it is published to.
    List,
    /// ControllerGetVolume: one volume and its condition.
    Get { id: String },
    /// DeleteVolume: stops its server and removes its data.
    Delete { id: String },
    /// ControllerExpandVolume: grows the volume online.
    Expand {
        id: String,
        /// The new size (never smaller than the current one).
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// ControllerPublishVolume: lets NODE attach the volume; prints the nbdUri.
    Publish {
        id: String,
        /// Node id (the Node's name under Kubernetes).
        #[arg(long)]
        node: String,
        /// Publish read-only.
        #[arg(long)]
        readonly: bool,
        /// Access mode of this publication.
        #[arg(long, value_enum, default_value_t = AccessModeArg::SingleNodeWriter)]
        access_mode: AccessModeArg,
    },
    /// ControllerUnpublishVolume: revokes NODE and closes its connections.
    Unpublish {
        id: String,
        #[arg(long)]
        node: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: SnapshotCommand,
}

#[derive(Debug, clap::Subcommand)]
enum SnapshotCommand {
    /// CreateSnapshot: a point-in-time copy of a volume.
    Create {
        /// The snapshot's name; creating the same name again is idempotent.
        name: String,
        /// The volume to snapshot.
        #[arg(long)]
        volume: String,
    },
    /// ListSnapshots, optionally of one volume.
    List {
        #[arg(long)]
        volume: Option<String>,
    },
    /// GetSnapshot.
    Get { id: String },
    /// DeleteSnapshot.
    Delete { id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AccessModeArg {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    MultiNodeMultiWriter,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl From<AccessModeArg> for Mode {
    fn from(mode: AccessModeArg) -> Self {
        match mode {
            AccessModeArg::SingleNodeWriter => Mode::SingleNodeWriter,
            AccessModeArg::SingleNodeReaderOnly => Mode::SingleNodeReaderOnly,
            AccessModeArg::MultiNodeReaderOnly => Mode::MultiNodeReaderOnly,
            AccessModeArg::MultiNodeMultiWriter => Mode::MultiNodeMultiWriter,
            AccessModeArg::SingleNodeSingleWriter => Mode::SingleNodeSingleWriter,
            AccessModeArg::SingleNodeMultiWriter => Mode::SingleNodeMultiWriter,
        }
    }
}

/// Bytes, or a number with a binary suffix (K, M, G, T, optionally
/// followed by `i` and/or `B`: 1G = 1GiB = 1073741824).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("size {s:?} must start with a number"))?;
    let unit = suffix.trim_end_matches(['B', 'b']).trim_end_matches('i');
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("size {s:?}: unknown unit {suffix:?} (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift).filter(|&b| b <= i64::MAX as u64).ok_or_else(|| format!("size {s:?} is too large"))
}

impl ClientArgs {
    fn endpoint(&self) -> Endpoint {
        self.endpoint.clone().unwrap_or_else(|| {
            let dir = std::path::absolute(&self.data_dir).unwrap_or_else(|_| self.data_dir.clone());
            service::default_endpoint(&dir)
        })
    }

    async fn channel(&self) -> anyhow::Result<Channel> {
        let endpoint = self.endpoint();
        let timeout = Duration::from_secs(self.timeout);
        // tonic dials unix:// URIs itself; a TCP endpoint is plain HTTP/2.
        let uri = match &endpoint {
            Endpoint::Unix(path) => format!("unix://{}", path.display()),
            Endpoint::Tcp(addr) => format!("http://{addr}"),
        };
        let connected = tonic::transport::Endpoint::from_shared(uri)
            .with_context(|| format!("endpoint {endpoint}"))?
            .connect_timeout(Duration::from_secs(10))
            .timeout(timeout)
            .connect()
            .await;
        connected.with_context(|| {
            format!("cannot reach the controller at {endpoint}; is nbd-csi-controller running there (same --data-dir or --endpoint)?")
        })
    }

    async fn controller(&self) -> anyhow::Result<ControllerClient<Channel>> {
        Ok(ControllerClient::new(self.channel().await?))
    }
}

/// An RPC's error as `METHOD: CODE: message`.
fn rpc<T>(method: &str, result: Result<tonic::Response<T>, tonic::Status>) -> anyhow::Result<T> {
    match result {
        Ok(response) => Ok(response.into_inner()),
        Err(status) => bail!("{method} failed: {:?}: {}", status.code(), status.message()),
    }
}

fn capability(block: bool, fs_type: &str, mode: Mode) -> VolumeCapability {
    let access_type = if block {
        AccessType::Block(BlockVolume {})
    } else {
        AccessType::Mount(MountVolume { fs_type: fs_type.to_string(), ..Default::default() })
    };
    VolumeCapability { access_type: Some(access_type), access_mode: Some(AccessMode { mode: mode as i32 }) }
}

fn print(output: Output, text: String, json: Value) {
    match output {
        Output::Text => print!("{text}"),
        Output::Json => println!("{}", serde_json::to_string_pretty(&json).unwrap_or_default()),
    }
}

/// 1073741824 → "1 GiB"; sizes that are no whole unit stay in bytes.
pub fn human_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} B")
}

/// UTC time of a protobuf timestamp as RFC 3339 (prost's own formatting).
fn rfc3339(ts: Option<&prost_types::Timestamp>) -> String {
    ts.map_or_else(|| "-".into(), ToString::to_string)
}

fn source_of(v: &Volume) -> (String, Value) {
    match v.content_source.as_ref().and_then(|s| s.r#type.as_ref()) {
        Some(SourceType::Snapshot(s)) => (format!("snapshot {}", s.snapshot_id), json!({"snapshot": s.snapshot_id})),
        Some(SourceType::Volume(s)) => (format!("volume {}", s.volume_id), json!({"volume": s.volume_id})),
        None => ("-".into(), Value::Null),
    }
}

/// A volume and, when known, where it is published and its condition.
struct VolumeView<'a> {
    volume: &'a Volume,
    published: Option<&'a [String]>,
    condition: Option<&'a VolumeCondition>,
}

impl VolumeView<'_> {
    /// The volume_context, when it is what the controller writes.
    fn context(&self) -> Option<VolumeContext> {
        VolumeContext::try_from(&self.volume.volume_context).ok()
    }

    fn name(&self) -> String {
        self.context().map(|c| c.name).unwrap_or_default()
    }

    fn access(&self) -> &'static str {
        self.context().map_or("", |c| c.access.as_str())
    }

    fn fs_type(&self) -> String {
        match self.context().map(|c| c.access) {
            Some(VolumeAccess::Mount { fs_type }) => fs_type,
            _ => String::new(),
        }
    }

    fn condition_text(&self) -> String {
        match self.condition {
            None => "-".into(),
            Some(c) if c.abnormal => format!("abnormal: {}", c.message),
            Some(c) => format!("ok: {}", c.message),
        }
    }

    fn text(&self) -> String {
        let v = self.volume;
        let mut out = String::new();
        let _ = writeln!(out, "volume:     {}", v.volume_id);
        let _ = writeln!(out, "name:       {}", or_dash(&self.name()));
        let _ = writeln!(out, "size:       {} ({} bytes)", human_size(v.capacity_bytes as u64), v.capacity_bytes);
        let _ = writeln!(out, "access:     {}", or_dash(self.access()));
        let fs_type = self.fs_type();
        if !fs_type.is_empty() {
            let _ = writeln!(out, "fs type:    {fs_type}");
        }
        let _ = writeln!(out, "source:     {}", source_of(v).0);
        if let Some(nodes) = self.published {
            let _ = writeln!(out, "published:  {}", if nodes.is_empty() { "-".into() } else { nodes.join(", ") });
        }
        if self.condition.is_some() {
            let _ = writeln!(out, "condition:  {}", self.condition_text());
        }
        out
    }

    fn json(&self) -> Value {
        let v = self.volume;
        let mut doc = json!({
            "id": v.volume_id,
            "name": self.name(),
            "capacity_bytes": v.capacity_bytes,
            "volume_context": v.volume_context,
            "source": source_of(v).1,
        });
        if let Some(nodes) = self.published {
            doc["published_node_ids"] = json!(nodes);
        }
        if let Some(c) = self.condition {
            doc["condition"] = json!({"abnormal": c.abnormal, "message": c.message});
        }
        doc
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

fn snapshot_json(s: &Snapshot) -> Value {
    json!({
        "id": s.snapshot_id,
        "source_volume_id": s.source_volume_id,
        "size_bytes": s.size_bytes,
        "creation_time": rfc3339(s.creation_time.as_ref()),
        "ready_to_use": s.ready_to_use,
    })
}

fn snapshot_text(s: &Snapshot) -> String {
    format!(
        "snapshot:   {}\nvolume:     {}\nsize:       {} ({} bytes)\ncreated:    {}\nready:      {}\n",
        s.snapshot_id,
        s.source_volume_id,
        human_size(s.size_bytes as u64),
        s.size_bytes,
        rfc3339(s.creation_time.as_ref()),
        s.ready_to_use
    )
}

/// Left-aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (cell, w) in cells.zip(&widths) {
            let _ = write!(text, "{cell:<w$}  ");
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(&mut out, &mut header.iter().copied());
    for row in rows {
        line(&mut out, &mut row.iter().map(String::as_str));
    }
    out
}

/// Upper bound on pages followed, against a server that never ends a list.
const MAX_PAGES: usize = 100_000;

async fn all_volumes(c: &mut ControllerClient<Channel>) -> anyhow::Result<Vec<list_volumes_response::Entry>> {
    let mut entries = Vec::new();
    let mut token = String::new();
    for _ in 0..MAX_PAGES {
        let req = ListVolumesRequest { max_entries: 0, starting_token: token };
        let page = rpc("ListVolumes", c.list_volumes(req).await)?;
        entries.extend(page.entries);
        if page.next_token.is_empty() {
            return Ok(entries);
        }
        token = page.next_token;
    }
    bail!("ListVolumes did not end after {MAX_PAGES} pages")
}

async fn all_snapshots(c: &mut ControllerClient<Channel>, volume: &str) -> anyhow::Result<Vec<Snapshot>> {
    let mut snapshots = Vec::new();
    let mut token = String::new();
    for _ in 0..MAX_PAGES {
        let req =
            ListSnapshotsRequest { source_volume_id: volume.to_string(), starting_token: token, ..Default::default() };
        let page = rpc("ListSnapshots", c.list_snapshots(req).await)?;
        snapshots.extend(page.entries.into_iter().filter_map(|e| e.snapshot));
        if page.next_token.is_empty() {
            return Ok(snapshots);
        }
        token = page.next_token;
    }
    bail!("ListSnapshots did not end after {MAX_PAGES} pages")
}

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
            let entries = all_volumes(&mut c).await?;
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
            let node = if r.node_expansion_required { " (the node grows the filesystem)" } else { "" };
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
            let snapshots = all_snapshots(&mut c, volume.as_deref().unwrap_or("")).await?;
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
    let volumes = all_volumes(&mut c).await?.len();
    let snapshots = all_snapshots(&mut c, "").await?.len();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("2TB"), Ok(2 << 40));
        assert!(parse_size("G").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn sizes_print_in_the_largest_whole_unit() {
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(1536 << 20), "1536 MiB");
        assert_eq!(human_size(4096), "4 KiB");
        assert_eq!(human_size(1000), "1000 B");
        assert_eq!(human_size(0), "0 B");
    }

    #[test]
    fn timestamps_print_as_utc_rfc3339() {
        let ts = |seconds| prost_types::Timestamp { seconds, nanos: 0 };
        assert_eq!(rfc3339(Some(&ts(0))), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(Some(&ts(951_782_400))), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(Some(&ts(1_700_000_000))), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(None), "-");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&["ID", "N"], &[vec!["long-id".into(), "x".into()], vec!["a".into(), "yy".into()]]);
        assert_eq!(t, "ID       N\nlong-id  x\na        yy\n");
    }
}
