//! The control-plane benchmark's client (run by `bench/control-plane.sh`,
//! once per storage mode): over a running controller's CSI socket, times
//! CreateVolume followed by ControllerPublishVolume for N volumes, first
//! one pair after another, then with several pairs in flight, and reads the
//! resident memory of the watched processes (the controller, the agents)
//! with no volume, with N published idle volumes and with the same N
//! unpublished. Prints one JSON object; the script renders it.
//!
//! Phases, in order (every volume is created empty, no I/O ever):
//! 1. warm-up: a few volumes created, published, unpublished and deleted,
//!    so what the first RPCs allocate once is in the baseline;
//! 2. `memory.baseline`;
//! 3. sequential: N pairs, one at a time; `memory.published`;
//! 4. every volume unpublished (timed); `memory.unpublished`;
//! 5. every volume deleted (timed);
//! 6. concurrent: N more pairs, `--concurrency` in flight; then those are
//!    unpublished and deleted too;
//! 7. created only: with no volume left, `memory.rebased`; N volumes
//!    created (timed) and never published; `memory.created`; then deleted,
//!    so the controller is left empty.
//!
//! Usage: bench_control_plane --socket PATH --node NODE [--volumes 300]
//! [--concurrency 8] [--watch NAME=PID]...

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use csi_proto::contract::PublishContext;
use csi_proto::controller_client::ControllerClient;
use csi_proto::identity_client::IdentityClient;
use csi_proto::volume_capability::access_mode::Mode;
use csi_proto::*;
use nbd_csi_controller::cli::{all_volumes, capability, connect};
use nbd_csi_controller::service::Endpoint;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::transport::Channel;

/// No volume count beyond this: every volume holds ports and descriptors.
const MAX_VOLUMES: usize = 5000;
/// No more pairs in flight than this.
const MAX_CONCURRENCY: usize = 64;

#[derive(Debug, Parser)]
struct Args {
    /// The controller's CSI unix socket.
    #[arg(long)]
    socket: PathBuf,
    /// The node id volumes are published to (in cluster mode a Node
    /// object whose addresses the export accepts).
    #[arg(long)]
    node: String,
    /// Volumes per phase.
    #[arg(long, default_value_t = 300)]
    volumes: usize,
    /// Pairs in flight in the concurrent phase.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Size of each volume (sparse, so it costs no disk).
    #[arg(long, default_value_t = 16 << 20)]
    size: u64,
    /// Volumes created, published, unpublished and deleted before the
    /// baseline.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Seconds to let the processes settle before reading their memory.
    #[arg(long, default_value_t = 3)]
    settle: u64,
    /// Deadline of one RPC, in seconds.
    #[arg(long, default_value_t = 60)]
    rpc_timeout: u64,
    /// A process whose memory is read at each checkpoint, as NAME=PID.
    #[arg(long, value_parser = parse_watch)]
    watch: Vec<(String, u32)>,
}

fn parse_watch(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s.split_once('=').ok_or_else(|| format!("{s:?} is not NAME=PID"))?;
    let pid = pid.parse().map_err(|e| format!("pid in {s:?}: {e}"))?;
    Ok((name.to_owned(), pid))
}

// ------------------------------------------------------------ memory

/// A `Key:  123 kB` field of a /proc file, in KiB.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Resident memory of one process, KiB, and its descriptors and threads.
fn memory(pid: u32) -> anyhow::Result<Value> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (has the process exited?)"))?;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("reading /proc/{pid}/smaps_rollup"))?;
    let field = |text: &str, key: &str| kib_field(text, key).with_context(|| format!("{key} of process {pid}"));
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    Ok(json!({
        "vm_rss_kib": field(&status, "VmRSS")?,
        "rss_anon_kib": field(&status, "RssAnon")?,
        "pss_kib": field(&smaps, "Pss")?,
        "threads": field(&status, "Threads")?,
        "fds": fds,
    }))
}

/// Every watched process's memory, by name.
async fn checkpoint(args: &Args) -> anyhow::Result<Value> {
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let mut all = serde_json::Map::new();
    for (name, pid) in &args.watch {
        all.insert(name.clone(), memory(*pid)?);
    }
    Ok(Value::Object(all))
}

// ------------------------------------------------------------ latencies

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn summary(mut samples: Vec<Duration>) -> Value {
    if samples.is_empty() {
        return json!({ "count": 0 });
    }
    samples.sort_unstable();
    json!({
        "count": samples.len(),
        "p50_ms": ms(percentile(&samples, 50.0)),
        "p90_ms": ms(percentile(&samples, 90.0)),
        "p99_ms": ms(percentile(&samples, 99.0)),
        "max_ms": ms(*samples.last().unwrap()),
    })
}

// ------------------------------------------------------------ RPCs

fn cap() -> VolumeCapability {
    capability(true, "", Mode::SingleNodeWriter)
}

/// One CreateVolume + ControllerPublishVolume pair.
struct Pair {
    id: String,
    create: Duration,
    publish: Duration,
    /// The storage node's address in the nbdUri.
    host: String,
}

/// One CreateVolume; the volume's id and the call's latency.
async fn create(c: &mut ControllerClient<Channel>, name: String, size: u64) -> anyhow::Result<(String, Duration)> {
    let start = Instant::now();
    let req = CreateVolumeRequest {
        name: name.clone(),
        capacity_range: Some(CapacityRange { required_bytes: size as i64, limit_bytes: 0 }),
        volume_capabilities: vec![cap()],
        ..Default::default()
    };
    let id = c
        .create_volume(req)
        .await
        .with_context(|| format!("CreateVolume {name}"))?
        .into_inner()
        .volume
        .context("CreateVolume answered no volume")?
        .volume_id;
    Ok((id, start.elapsed()))
}

async fn create_and_publish(
    mut c: ControllerClient<Channel>,
    name: String,
    size: u64,
    node: String,
) -> anyhow::Result<Pair> {
    let (id, create) = create(&mut c, name, size).await?;
    let start = Instant::now();
    let req = ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: node,
        volume_capability: Some(cap()),
        ..Default::default()
    };
    let context = c
        .controller_publish_volume(req)
        .await
        .with_context(|| format!("ControllerPublishVolume {id}"))?
        .into_inner()
        .publish_context;
    let publish = start.elapsed();
    let host = PublishContext::try_from(&context).context("ControllerPublishVolume's context")?.nbd_uri.host;
    Ok(Pair { id, create, publish, host })
}

/// Runs `count` pairs named PREFIX-NNNNN with `concurrency` in flight;
/// returns them in completion order and the wall time.
async fn pairs(
    c: &ControllerClient<Channel>,
    args: &Args,
    prefix: &str,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<(Vec<Pair>, Duration)> {
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut running = JoinSet::new();
    let started = Instant::now();
    for i in 0..count {
        let slot = slots.clone().acquire_owned().await?;
        let call = create_and_publish(c.clone(), format!("{prefix}-{i:05}"), args.size, args.node.clone());
        running.spawn(async move {
            let pair = call.await;
            drop(slot);
            pair
        });
    }
    let mut done = Vec::with_capacity(count);
    while let Some(pair) = running.join_next().await {
        done.push(pair??);
    }
    Ok((done, started.elapsed()))
}

/// Unpublishes, or deletes, every volume of `ids` with `concurrency` in
/// flight; returns each call's latency.
async fn undo(
    c: &ControllerClient<Channel>,
    node: &str,
    ids: &[String],
    concurrency: usize,
    delete: bool,
) -> anyhow::Result<Vec<Duration>> {
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut running = JoinSet::new();
    for id in ids {
        let slot = slots.clone().acquire_owned().await?;
        let (mut c, id, node) = (c.clone(), id.clone(), node.to_owned());
        running.spawn(async move {
            let start = Instant::now();
            let result = if delete {
                c.delete_volume(DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() })
                    .await
                    .map(drop)
                    .with_context(|| format!("DeleteVolume {id}"))
            } else {
                let req =
                    ControllerUnpublishVolumeRequest { volume_id: id.clone(), node_id: node, ..Default::default() };
                c.controller_unpublish_volume(req)
                    .await
                    .map(drop)
                    .with_context(|| format!("ControllerUnpublishVolume {id}"))
            };
            drop(slot);
            result.map(|()| start.elapsed())
        });
    }
    let mut took = Vec::with_capacity(ids.len());
    while let Some(one) = running.join_next().await {
        took.push(one??);
    }
    Ok(took)
}

fn phase(name: &str, concurrency: usize, done: &[Pair], wall: Duration) -> Value {
    let mut spread: BTreeMap<&str, usize> = BTreeMap::new();
    for p in done {
        *spread.entry(p.host.as_str()).or_default() += 1;
    }
    json!({
        "name": name,
        "concurrency": concurrency,
        "pairs": done.len(),
        "wall_seconds": (wall.as_secs_f64() * 1e3).round() / 1e3,
        "create": summary(done.iter().map(|p| p.create).collect()),
        "publish": summary(done.iter().map(|p| p.publish).collect()),
        "pair": summary(done.iter().map(|p| p.create + p.publish).collect()),
        "spread": spread,
    })
}

/// Every volume the controller lists is published to `node`, and there
/// are `want` of them.
async fn check_published(c: &mut ControllerClient<Channel>, node: &str, want: usize) -> anyhow::Result<()> {
    let listed = all_volumes(c, 0).await?;
    if listed.len() != want {
        bail!("{} volumes listed, {want} created", listed.len());
    }
    if let Some(e) =
        listed.iter().find(|e| e.status.as_ref().is_none_or(|s| !s.published_node_ids.iter().any(|n| n == node)))
    {
        bail!("a volume is not published to {node}: {e:?}");
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(1..=MAX_VOLUMES).contains(&args.volumes) {
        bail!("--volumes must be 1..={MAX_VOLUMES}");
    }
    if !(1..=MAX_CONCURRENCY).contains(&args.concurrency) {
        bail!("--concurrency must be 1..={MAX_CONCURRENCY}");
    }
    let channel = connect(&Endpoint::Unix(args.socket.clone()), Duration::from_secs(args.rpc_timeout)).await?;
    let ready = IdentityClient::new(channel.clone()).probe(ProbeRequest {}).await?.into_inner().ready;
    if ready != Some(true) {
        bail!("controller not ready");
    }
    let mut c = ControllerClient::new(channel);
    let existing = all_volumes(&mut c, 0).await?.len();
    if existing != 0 {
        bail!("the controller already has {existing} volumes; start it on empty storage");
    }

    let (warm, _) = pairs(&c, &args, "warmup", args.warmup, 1).await.context("warm-up")?;
    let warm: Vec<String> = warm.into_iter().map(|p| p.id).collect();
    undo(&c, &args.node, &warm, 1, false).await?;
    undo(&c, &args.node, &warm, 1, true).await?;
    let baseline = checkpoint(&args).await?;

    let (done, wall) = pairs(&c, &args, "seq", args.volumes, 1).await.context("sequential phase")?;
    let sequential = phase("sequential", 1, &done, wall);
    check_published(&mut c, &args.node, args.volumes).await?;
    let published = checkpoint(&args).await?;
    let ids: Vec<String> = done.iter().map(|p| p.id.clone()).collect();
    let unpublish = summary(undo(&c, &args.node, &ids, 1, false).await?);
    let unpublished = checkpoint(&args).await?;
    let delete = summary(undo(&c, &args.node, &ids, 1, true).await?);

    let (done, wall) = pairs(&c, &args, "par", args.volumes, args.concurrency).await.context("concurrent phase")?;
    let concurrent = phase("concurrent", args.concurrency, &done, wall);
    check_published(&mut c, &args.node, args.volumes).await?;
    let ids: Vec<String> = done.iter().map(|p| p.id.clone()).collect();
    undo(&c, &args.node, &ids, args.concurrency, false).await?;
    undo(&c, &args.node, &ids, args.concurrency, true).await?;

    // Created and never published: whether that costs a server and a port
    // is the build's choice; this measures it apart from publishing.
    let rebased = checkpoint(&args).await?;
    let mut ids = Vec::with_capacity(args.volumes);
    let mut creates = Vec::with_capacity(args.volumes);
    for i in 0..args.volumes {
        let (id, took) = create(&mut c, format!("new-{i:05}"), args.size).await.context("created-only phase")?;
        ids.push(id);
        creates.push(took);
    }
    let created = checkpoint(&args).await?;
    undo(&c, &args.node, &ids, 1, true).await?;
    let left = all_volumes(&mut c, 0).await?.len();
    if left != 0 {
        bail!("{left} volumes left after deleting every one");
    }

    let report = json!({
        "volumes": args.volumes,
        "size_bytes": args.size,
        "node": args.node,
        "warmup": args.warmup,
        "settle_seconds": args.settle,
        "phases": [sequential, concurrent],
        "unpublish": unpublish,
        "delete": delete,
        "create_only": summary(creates),
        "memory": {
            "baseline": baseline,
            "published": published,
            "unpublished": unpublished,
            "rebased": rebased,
            "created": created,
        },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
