//! The controller benchmark's client (run by `bench/controller.sh`): over a
//! running controller's CSI socket, creates N volumes one after another,
//! each CreateVolume followed by ControllerPublishVolume, timing both; then
//! compares the controller's resident memory with N idle volumes served
//! against its baseline with none. Prints a Markdown section.
//!
//! Usage: bench_controller --socket PATH --pid PID [--volumes 1000]

use std::collections::BTreeMap;
use std::path::PathBuf;
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
use tonic::transport::Channel;

#[derive(Debug, Parser)]
struct Args {
    /// The controller's CSI unix socket.
    #[arg(long)]
    socket: PathBuf,
    /// The controller's process id, for /proc/PID/{status,smaps_rollup}.
    #[arg(long)]
    pid: u32,
    /// Volumes to create and publish.
    #[arg(long, default_value_t = 1000)]
    volumes: usize,
    /// Size of each volume (sparse, so it costs no disk).
    #[arg(long, default_value_t = 1 << 30)]
    size: u64,
    /// Volumes created, published, unpublished and deleted before the
    /// baseline, so it includes what the first RPCs allocate once.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Seconds to let the controller settle before reading its memory.
    #[arg(long, default_value_t = 3)]
    settle: u64,
    /// A directory on the data directory's filesystem: the storage floor is
    /// measured there (atomic small-file replaces, as the store does).
    #[arg(long)]
    probe_dir: Option<PathBuf>,
}

/// The store's unit of durability, timed: write a small temp file, fsync
/// it, rename it over the target, fsync the directory. CreateVolume does
/// two of these (image, record), ControllerPublishVolume one (record).
fn storage_floor(dir: &std::path::Path, n: usize) -> anyhow::Result<Vec<Duration>> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let mut samples = Vec::with_capacity(n);
    let record = vec![b'x'; 400];
    for i in 0..n {
        let start = Instant::now();
        let tmp = dir.join("probe.json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&record)?;
        f.write_all(format!("{i}").as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, dir.join("probe.json"))?;
        std::fs::File::open(dir)?.sync_all()?;
        samples.push(start.elapsed());
    }
    std::fs::remove_file(dir.join("probe.json"))?;
    samples.sort_unstable();
    Ok(samples)
}

/// Memory figures of one process, in KiB.
#[derive(Debug, Clone, Default)]
struct Memory {
    fields: BTreeMap<&'static str, u64>,
    fds: usize,
    threads: u64,
}

const STATUS_FIELDS: [&str; 3] = ["VmRSS", "RssAnon", "VmData"];
const SMAPS_FIELDS: [&str; 5] = ["Rss", "Pss", "Private_Clean", "Private_Dirty", "Anonymous"];

fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn memory(pid: u32) -> anyhow::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading /proc/PID/status")?;
    let smaps =
        std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).context("reading /proc/PID/smaps_rollup")?;
    let mut m = Memory::default();
    for key in STATUS_FIELDS {
        m.fields.insert(key, kib_field(&status, key).with_context(|| format!("{key} in status"))?);
    }
    for key in SMAPS_FIELDS {
        m.fields.insert(key, kib_field(&smaps, key).with_context(|| format!("{key} in smaps_rollup"))?);
    }
    m.threads = kib_field(&status, "Threads").unwrap_or(0);
    m.fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    Ok(m)
}

fn private(m: &Memory) -> u64 {
    m.fields["Private_Clean"] + m.fields["Private_Dirty"]
}

fn cap() -> VolumeCapability {
    capability(true, "", Mode::SingleNodeWriter)
}

/// Creates and publishes one volume; returns its id and both latencies.
async fn create_and_publish(
    c: &mut ControllerClient<Channel>,
    name: String,
    size: u64,
) -> anyhow::Result<(String, Duration, Duration)> {
    let start = Instant::now();
    let req = CreateVolumeRequest {
        name,
        capacity_range: Some(CapacityRange { required_bytes: size as i64, limit_bytes: 0 }),
        volume_capabilities: vec![cap()],
        ..Default::default()
    };
    let id = c.create_volume(req).await?.into_inner().volume.context("no volume")?.volume_id;
    let created = start.elapsed();
    let start = Instant::now();
    let req = ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "bench-node".into(),
        volume_capability: Some(cap()),
        ..Default::default()
    };
    let context = c.controller_publish_volume(req).await?.into_inner().publish_context;
    let published = start.elapsed();
    PublishContext::try_from(&context).context("ControllerPublishVolume")?;
    Ok((id, created, published))
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let channel = connect(&Endpoint::Unix(args.socket.clone()), Duration::from_secs(60)).await?;
    let mut identity = IdentityClient::new(channel.clone());
    let mut c = ControllerClient::new(channel);
    let ready = identity.probe(ProbeRequest {}).await?.into_inner().ready;
    if ready != Some(true) {
        bail!("controller not ready");
    }
    let existing = all_volumes(&mut c, 0).await?.len();
    if existing != 0 {
        bail!("the controller already has {existing} volumes; start it on an empty data directory");
    }

    // Warm-up: the first RPCs allocate (gRPC buffers, tracing, the runtime's
    // blocking threads); that belongs in the baseline, not per volume.
    for i in 0..args.warmup {
        let (id, _, _) = create_and_publish(&mut c, format!("warmup-{i}"), args.size).await?;
        let req = ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "bench-node".into(),
            ..Default::default()
        };
        c.controller_unpublish_volume(req).await?;
        c.delete_volume(DeleteVolumeRequest { volume_id: id, ..Default::default() }).await?;
    }
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let baseline = memory(args.pid)?;

    let mut creates = Vec::with_capacity(args.volumes);
    let mut publishes = Vec::with_capacity(args.volumes);
    let mut pairs = Vec::with_capacity(args.volumes);
    let started = Instant::now();
    for i in 0..args.volumes {
        let (_, created, published) = create_and_publish(&mut c, format!("bench-{i:05}"), args.size)
            .await
            .with_context(|| format!("volume {i}"))?;
        creates.push(created);
        publishes.push(published);
        pairs.push(created + published);
    }
    let total = started.elapsed();
    let floor = args.probe_dir.as_deref().map(|d| storage_floor(d, 300)).transpose()?;
    let listed = all_volumes(&mut c, 0).await?;
    if listed.len() != args.volumes {
        bail!("{} volumes listed, {} created", listed.len(), args.volumes);
    }
    if let Some(e) =
        listed.iter().find(|e| e.status.as_ref().and_then(|s| s.volume_condition.as_ref()).is_none_or(|c| c.abnormal))
    {
        bail!("a volume is not serving: {e:?}");
    }
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let loaded = memory(args.pid)?;

    let n = args.volumes;
    let mut out = String::new();
    out.push_str(&format!(
        "{n} volumes of {} GiB (sparse), created one after another over one gRPC connection on a unix socket, \
         each CreateVolume followed by ControllerPublishVolume; {:.1} s in all ({:.0} volumes/s).\n\n",
        args.size >> 30,
        total.as_secs_f64(),
        n as f64 / total.as_secs_f64()
    ));
    out.push_str("| RPC | p50 ms | p90 ms | p99 ms | max ms | target |\n|---|---:|---:|---:|---:|---|\n");
    for (name, samples, target) in [
        ("CreateVolume", &mut creates, ""),
        ("ControllerPublishVolume", &mut publishes, ""),
        ("CreateVolume + ControllerPublishVolume", &mut pairs, "p99 < 20 ms"),
    ] {
        samples.sort_unstable();
        let p99 = percentile(samples, 99.0);
        let verdict = if target.is_empty() {
            String::new()
        } else if p99 < Duration::from_millis(20) {
            format!("{target}: met")
        } else {
            format!("{target}: **missed**")
        };
        out.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {verdict} |\n",
            ms(percentile(samples, 50.0)),
            ms(percentile(samples, 90.0)),
            ms(p99),
            ms(*samples.last().unwrap()),
        ));
    }
    if let Some(floor) = &floor {
        out.push_str(&format!(
            "| storage floor: one atomic record replace (write, fsync, rename, fsync dir), {} samples | {} | {} | {} | {} | |\n",
            floor.len(),
            ms(percentile(floor, 50.0)),
            ms(percentile(floor, 90.0)),
            ms(percentile(floor, 99.0)),
            ms(*floor.last().unwrap()),
        ));
        out.push_str(
            "\nCreateVolume makes two such durable steps (the image, then its record), ControllerPublishVolume \
             one (the record): the pair costs three, plus well under a millisecond of CPU.\n",
        );
    }
    out.push_str(&format!(
        "\nResident memory of the controller with {n} idle volumes served (each: its NBD server listening \
         on its own port, its image open, no connections), against the baseline with 0 volumes after \
         {} warm-up volumes were created and deleted. KiB; per volume in bytes.\n\n",
        args.warmup
    ));
    out.push_str(&format!("| measure | 0 volumes | {n} volumes | per volume | target |\n|---|---:|---:|---:|---|\n"));
    let mut rows: Vec<(String, u64, u64)> = Vec::new();
    for key in ["VmRSS", "RssAnon"] {
        rows.push((format!("{key} (status)"), baseline.fields[key], loaded.fields[key]));
    }
    for key in ["Pss", "Anonymous"] {
        rows.push((format!("{key} (smaps_rollup)"), baseline.fields[key], loaded.fields[key]));
    }
    rows.push(("Private_Clean + Private_Dirty (smaps_rollup)".into(), private(&baseline), private(&loaded)));
    for (name, before, after) in &rows {
        let per = after.saturating_sub(*before) * 1024 / n as u64;
        let target = if name.starts_with("Pss") || name.starts_with("VmRSS") {
            if per < 64 * 1024 { "< 64 KiB: met" } else { "< 64 KiB: **missed**" }
        } else {
            ""
        };
        out.push_str(&format!("| {name} | {before} | {after} | {per} B | {target} |\n"));
    }
    out.push_str(&format!(
        "\nOpen file descriptors {} → {} ({:.1} per volume: the listening socket and the image), \
         threads {} → {}. Kernel memory of the listening sockets is not in these figures.\n",
        baseline.fds,
        loaded.fds,
        (loaded.fds as f64 - baseline.fds as f64) / n as f64,
        baseline.threads,
        loaded.threads
    ));
    print!("{out}");
    Ok(())
}
