//! Crash safety of the controller's store, end to end: the real binary on a
//! temp data directory, driven over gRPC by storms of CreateVolume →
//! ControllerPublishVolume → write pattern A through the nbdUri (qemu-io) →
//! CreateSnapshot → write pattern B, SIGKILLed at a random moment of each
//! storm, restarted on the same directory.
//!
//! After every restart: the store loads without error, Probe is ready,
//! every acknowledged volume, publication and snapshot is back, and
//! unacknowledged ones are either fully there (listed, right size, served)
//! or absent, with no half-written files left in the data directory. At the
//! end every volume's content is compared through a fresh nbdUri with
//! `qemu-img compare` against a local reference (or `qemu-io read -P` where
//! a write was cut by the kill), and every snapshot is restored into a new
//! volume and compared: it holds pattern A and not B (point in time).
//!
//! The kill points come from a seed printed at the start; set
//! NBD_CSI_CRASH_SEED to replay one.

mod common;
mod process;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use csi_proto::contract::{PublishContext, VolumeAccess, VolumeContext};
use csi_proto::controller_client::ControllerClient;
use csi_proto::identity_client::IdentityClient;
use csi_proto::volume_capability::access_mode::Mode;
use csi_proto::volume_content_source::{SnapshotSource, Type as SourceType};
use csi_proto::*;
use nbd_csi_controller::cli::{all_snapshots, all_volumes, capability};
use process::{Controller, free_port_block, reference_file};
use tonic::transport::Channel;

const ROUNDS: usize = 5;
const WORKERS: usize = 4;
/// Cycles one worker may start per storm, so a fast machine stays bounded.
const MAX_CYCLES: usize = 12;
/// The kill comes this long after a storm starts (uniformly random).
const KILL_AFTER_MS: std::ops::Range<u64> = 100..700;
const SIZE: u64 = 4 << 20;
const REGION: u64 = 256 << 10;
const A_OFFSET: u64 = 0;
const B_OFFSET: u64 = 1 << 20;
const NODE: &str = "crash-node";
/// Per-RPC deadline: a call to a killed controller fails, never hangs.
const RPC_TIMEOUT: Duration = Duration::from_secs(20);

/// Where one step of a cycle got to when the controller was killed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Step {
    #[default]
    NotStarted,
    /// Sent, no answer: it may or may not have happened.
    InFlight,
    /// Acknowledged (or, for unacknowledged creates, found after a restart).
    Done,
}

/// One cycle: a volume and its snapshot, named after round, worker, cycle.
#[derive(Debug, Default, Clone)]
struct Cycle {
    name: String,
    a: u8,
    b: u8,
    create: Step,
    volume_id: Option<String>,
    publish: Step,
    write_a: Step,
    snapshot: Step,
    snapshot_id: Option<String>,
    write_b: Step,
}

type Cycles = Arc<Mutex<Vec<Cycle>>>;

fn update(cycles: &Cycles, index: usize, f: impl FnOnce(&mut Cycle)) {
    f(&mut cycles.lock().unwrap()[index]);
}

fn block_cap() -> VolumeCapability {
    capability(true, "", Mode::SingleNodeWriter)
}

fn create_req(name: &str, source: Option<&str>) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: Some(CapacityRange { required_bytes: SIZE as i64, limit_bytes: 0 }),
        volume_capabilities: vec![block_cap()],
        volume_content_source: source.map(|id| VolumeContentSource {
            r#type: Some(SourceType::Snapshot(SnapshotSource { snapshot_id: id.to_string() })),
        }),
        ..Default::default()
    }
}

async fn publish(c: &mut ControllerClient<Channel>, id: &str) -> Result<String, tonic::Status> {
    let req = ControllerPublishVolumeRequest {
        volume_id: id.to_string(),
        node_id: NODE.to_string(),
        volume_capability: Some(block_cap()),
        ..Default::default()
    };
    let context = c.controller_publish_volume(req).await?.into_inner().publish_context;
    let published = PublishContext::try_from(&context).expect("a publish_context the node accepts");
    Ok(published.nbd_uri.to_uri_string())
}

/// `qemu-io -c 'write -P BYTE OFFSET LEN' -c flush URI`; true when qemu-io
/// reports the write done (it fails when the controller dies under it).
async fn write_pattern(uri: String, byte: u8, offset: u64) -> bool {
    tokio::task::spawn_blocking(move || {
        let write = format!("write -P {byte} {offset} {REGION}");
        let output = run(tool("qemu-io").args(["-f", "raw", &uri, "-c", &write, "-c", "flush"]), QUICK);
        let text = String::from_utf8_lossy(&output.stdout);
        output.status.success() && text.contains("wrote") && !text.contains("failed")
    })
    .await
    .expect("qemu-io task")
}

/// One worker's storm: cycles until the controller stops answering.
async fn storm_worker(channel: Channel, cycles: Cycles, round: usize, worker: usize, stop: Arc<AtomicBool>) {
    let mut c = ControllerClient::new(channel);
    for k in 0..MAX_CYCLES {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let n = (round * WORKERS * MAX_CYCLES + worker * MAX_CYCLES + k) as u8;
        let name = format!("crash-r{round}-w{worker}-c{k}");
        let index = {
            let mut all = cycles.lock().unwrap();
            // Two distinct non-zero patterns per cycle.
            let (a, b) = (n.wrapping_mul(2) % 250 + 1, n.wrapping_mul(2) % 250 + 2);
            all.push(Cycle { name: name.clone(), a, b, create: Step::InFlight, ..Default::default() });
            all.len() - 1
        };
        let Ok(created) = c.create_volume(create_req(&name, None)).await else { return };
        let id = created.into_inner().volume.expect("volume").volume_id;
        update(&cycles, index, |cy| {
            (cy.create, cy.volume_id, cy.publish) = (Step::Done, Some(id.clone()), Step::InFlight)
        });
        let Ok(uri) = publish(&mut c, &id).await else { return };
        let a = cycles.lock().unwrap()[index].a;
        update(&cycles, index, |cy| (cy.publish, cy.write_a) = (Step::Done, Step::InFlight));
        if !write_pattern(uri.clone(), a, A_OFFSET).await {
            return;
        }
        update(&cycles, index, |cy| (cy.write_a, cy.snapshot) = (Step::Done, Step::InFlight));
        let req =
            CreateSnapshotRequest { source_volume_id: id.clone(), name: format!("{name}-snap"), ..Default::default() };
        let Ok(snap) = c.create_snapshot(req).await else { return };
        let snap_id = snap.into_inner().snapshot.expect("snapshot").snapshot_id;
        let b = cycles.lock().unwrap()[index].b;
        update(&cycles, index, |cy| {
            (cy.snapshot, cy.snapshot_id, cy.write_b) = (Step::Done, Some(snap_id), Step::InFlight)
        });
        if !write_pattern(uri, b, B_OFFSET).await {
            return;
        }
        update(&cycles, index, |cy| cy.write_b = Step::Done);
    }
}

/// xorshift64*: the kill delays, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

async fn list_all(c: &mut ControllerClient<Channel>) -> (Vec<list_volumes_response::Entry>, Vec<Snapshot>) {
    // Small pages: pagination across a restarted store is exercised too.
    let volumes = all_volumes(c, 7).await.expect("ListVolumes");
    let snapshots = all_snapshots(c, "", 0).await.expect("ListSnapshots");
    (volumes, snapshots)
}

/// Every image has its record and every record its image; no temp files.
fn assert_store_consistent(data_dir: &Path, volumes: usize, snapshots: usize) {
    for (dir, expected) in [("volumes", volumes), ("snapshots", snapshots)] {
        let mut images = BTreeSet::new();
        let mut records = BTreeSet::new();
        for entry in std::fs::read_dir(data_dir.join(dir)).expect("read data dir") {
            let name = entry.expect("dir entry").file_name().into_string().expect("utf-8 name");
            if let Some(id) = name.strip_suffix(".img") {
                images.insert(id.to_string());
            } else if let Some(id) = name.strip_suffix(".json") {
                records.insert(id.to_string());
            } else {
                panic!("{dir}/{name}: a leftover file after loading the store");
            }
        }
        assert_eq!(images, records, "{dir}: images and records differ");
        assert_eq!(records.len(), expected, "{dir}: {} records, {expected} listed", records.len());
    }
}

/// After a restart: the store loaded cleanly and holds every acknowledged
/// object; unacknowledged ones are whole or absent. Ones found whole are
/// from then on treated as acknowledged (they must never vanish).
async fn verify_loaded(ctl: &Controller, cycles: &Cycles) -> (usize, usize) {
    let channel = ctl.channel(RPC_TIMEOUT).await;
    let mut identity = IdentityClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = identity.probe(ProbeRequest {}).await.expect("Probe").into_inner().ready;
        if ready == Some(true) {
            break;
        }
        assert!(Instant::now() < deadline, "Probe not ready 20 s after restart\n{}", ctl.run_log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = ctl.run_log();
    assert!(log.contains("store loaded"), "{log}");
    assert!(!log.contains("ERROR") && !log.contains("corrupt"), "the store did not load cleanly:\n{log}");

    let mut c = ControllerClient::new(channel);
    let (volumes, snapshots) = list_all(&mut c).await;
    let by_id: BTreeMap<&str, &list_volumes_response::Entry> =
        volumes.iter().map(|e| (e.volume.as_ref().expect("volume").volume_id.as_str(), e)).collect();
    let mut by_name: BTreeMap<&str, &str> = BTreeMap::new();
    for (id, e) in &by_id {
        let name = e.volume.as_ref().unwrap().volume_context.get("name").expect("name in volume_context");
        assert!(by_name.insert(name, id).is_none(), "two volumes named {name}");
    }
    let snap_by_id: BTreeMap<&str, &Snapshot> = snapshots.iter().map(|s| (s.snapshot_id.as_str(), s)).collect();
    let mut snaps_of: BTreeMap<&str, Vec<&Snapshot>> = BTreeMap::new();
    for s in &snapshots {
        snaps_of.entry(s.source_volume_id.as_str()).or_default().push(s);
    }

    let mut all = cycles.lock().unwrap();
    let mut seen_volumes = 0;
    let mut seen_snapshots = 0;
    for cy in all.iter_mut() {
        let found = by_name.get(cy.name.as_str()).copied();
        match cy.create {
            Step::NotStarted => continue,
            Step::Done => {
                let id = cy.volume_id.as_deref().unwrap();
                assert_eq!(found, Some(id), "acknowledged volume {} ({id}) is not back", cy.name);
            }
            Step::InFlight => match found {
                // Never acknowledged, and not there: fine, and for good.
                None => {
                    cy.create = Step::NotStarted;
                    continue;
                }
                Some(id) => {
                    eprintln!("unacknowledged volume {} is whole after the crash: {id}", cy.name);
                    (cy.create, cy.volume_id) = (Step::Done, Some(id.to_string()));
                }
            },
        }
        seen_volumes += 1;
        let id = cy.volume_id.clone().unwrap();
        let entry = by_id[id.as_str()];
        let volume = entry.volume.as_ref().unwrap();
        assert_eq!(volume.capacity_bytes, SIZE as i64, "{} size", cy.name);
        let context = VolumeContext::try_from(&volume.volume_context).expect("volume_context");
        assert_eq!(context.access, VolumeAccess::Block, "{}", cy.name);
        let status = entry.status.as_ref().expect("status");
        let condition = status.volume_condition.as_ref().expect("condition");
        assert!(!condition.abnormal, "{}: {}", cy.name, condition.message);
        let published = status.published_node_ids.iter().any(|n| n == NODE);
        match cy.publish {
            Step::Done => assert!(published, "acknowledged publication of {} is lost", cy.name),
            Step::InFlight if published => cy.publish = Step::Done,
            Step::NotStarted => assert!(!published, "{} published without a request", cy.name),
            Step::InFlight => cy.publish = Step::NotStarted,
        }
        let snaps = snaps_of.get(id.as_str()).map_or(&[][..], Vec::as_slice);
        assert!(snaps.len() <= 1, "{}: {} snapshots from one CreateSnapshot", cy.name, snaps.len());
        match (cy.snapshot, snaps.first()) {
            (Step::Done, found) => {
                let want = cy.snapshot_id.as_deref().unwrap();
                assert_eq!(found.map(|s| s.snapshot_id.as_str()), Some(want), "acknowledged snapshot lost");
            }
            (Step::InFlight, Some(s)) => {
                eprintln!("unacknowledged snapshot of {} is whole after the crash: {}", cy.name, s.snapshot_id);
                (cy.snapshot, cy.snapshot_id) = (Step::Done, Some(s.snapshot_id.clone()));
            }
            (Step::InFlight, None) => cy.snapshot = Step::NotStarted,
            (Step::NotStarted, Some(s)) => panic!("{}: snapshot {} without a request", cy.name, s.snapshot_id),
            (Step::NotStarted, None) => {}
        }
        if let Some(sid) = &cy.snapshot_id {
            let s = snap_by_id[sid.as_str()];
            assert_eq!((s.size_bytes, s.ready_to_use), (SIZE as i64, true), "snapshot {sid}");
            seen_snapshots += 1;
        }
    }
    assert_eq!(volumes.len(), seen_volumes, "volumes nobody asked for: {by_name:?}");
    assert_eq!(snapshots.len(), seen_snapshots, "snapshots nobody asked for");
    assert_store_consistent(&ctl.data_dir, volumes.len(), snapshots.len());
    (seen_volumes, seen_snapshots)
}

/// What one region must hold: `Some(byte)`, or `None` when the write to it
/// was cut by the kill (either content is fine, the rest is still checked).
fn region(step: Step, byte: u8) -> Option<u8> {
    match step {
        Step::Done => Some(byte),
        Step::NotStarted => Some(0),
        Step::InFlight => None,
    }
}

/// A content check, run off the async threads.
struct Check {
    what: String,
    uri: String,
    a: Option<u8>,
    b: Option<u8>,
}

fn run_check(check: &Check, scratch: &Path, index: usize) -> bool {
    let certain = check.a.is_some() && check.b.is_some();
    if certain {
        let mut regions = Vec::new();
        regions.extend(check.a.filter(|&b| b != 0).map(|b| (A_OFFSET, REGION, b)));
        regions.extend(check.b.filter(|&b| b != 0).map(|b| (B_OFFSET, REGION, b)));
        let reference = scratch.join(format!("ref-{index}.img"));
        reference_file(&reference, SIZE, &regions);
        let output =
            run(tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&reference).arg(&check.uri), QUICK);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{}: qemu-img compare with the reference\n{}",
            check.what,
            describe(&output)
        );
        return true;
    }
    // A cut write: read every byte whose content is known.
    let mut commands = Vec::new();
    let mut read = |byte: u8, offset: u64, len: u64| commands.push(format!("read -P {byte} {offset} {len}"));
    if let Some(a) = check.a {
        read(a, A_OFFSET, REGION);
    }
    read(0, A_OFFSET + REGION, B_OFFSET - A_OFFSET - REGION);
    if let Some(b) = check.b {
        read(b, B_OFFSET, REGION);
    }
    read(0, B_OFFSET + REGION, SIZE - B_OFFSET - REGION);
    let mut cmd = tool("qemu-io");
    cmd.args(["-r", "-f", "raw", &check.uri]);
    for c in &commands {
        cmd.args(["-c", c]);
    }
    let out = run_ok(&mut cmd, QUICK);
    assert!(!out.contains("failed"), "{}: {commands:?}\n{out}", check.what);
    assert_eq!(out.matches("read ").count(), commands.len(), "{}: {out}", check.what);
    false
}

/// Every volume through its nbdUri, every snapshot restored into a new
/// volume: their bytes are the ones acknowledged.
async fn verify_content(ctl: &Controller, cycles: &Cycles, scratch: &Path) -> (usize, usize) {
    let mut c = ControllerClient::new(ctl.channel(RPC_TIMEOUT).await);
    let all: Vec<Cycle> = cycles.lock().unwrap().clone();
    let mut checks = Vec::new();
    for cy in all.iter().filter(|cy| cy.create == Step::Done) {
        let id = cy.volume_id.as_deref().unwrap();
        let uri = publish(&mut c, id).await.unwrap_or_else(|e| panic!("publishing {id} after restart: {e}"));
        checks.push(Check {
            what: format!("volume {}", cy.name),
            uri,
            a: region(cy.write_a, cy.a),
            b: region(cy.write_b, cy.b),
        });
        if let Some(sid) = &cy.snapshot_id {
            // Taken after A was written and before B was: A only.
            let restore = format!("restore-{}", cy.name);
            let created = c.create_volume(create_req(&restore, Some(sid))).await;
            let vid = created.unwrap_or_else(|e| panic!("restoring {sid}: {e}")).into_inner().volume.unwrap().volume_id;
            let uri = publish(&mut c, &vid).await.expect("publish restored volume");
            checks.push(Check { what: format!("snapshot of {}", cy.name), uri, a: Some(cy.a), b: Some(0) });
        }
    }
    let scratch = scratch.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let compared = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some(check) = checks.get(i) else { return };
                        if run_check(check, &scratch, i) {
                            compared.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        (checks.len(), compared.into_inner())
    })
    .await
    .expect("content checks")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_volumes_and_snapshots_survive_sigkill() {
    let started = Instant::now();
    let seed = std::env::var("NBD_CSI_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("NBD_CSI_CRASH_SEED={seed}");
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let scratch = tempfile::tempdir().expect("tempdir");
    // Each cycle's volume, and its restored snapshot, takes a port.
    let ports = free_port_block((2 * ROUNDS * WORKERS * MAX_CYCLES + 8) as u16);
    let cycles: Cycles = Arc::default();
    let mut ctl = Controller::start(dir.path(), ports);

    for round in 0..ROUNDS {
        if round > 0 {
            ctl.restart();
            let (v, s) = verify_loaded(&ctl, &cycles).await;
            eprintln!("round {round}: restarted with {v} volumes, {s} snapshots");
        }
        let channel = ctl.channel(RPC_TIMEOUT).await;
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| tokio::spawn(storm_worker(channel.clone(), Arc::clone(&cycles), round, w, Arc::clone(&stop))))
            .collect();
        let delay = KILL_AFTER_MS.start + rng.next() % (KILL_AFTER_MS.end - KILL_AFTER_MS.start);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let busy = workers.iter().filter(|w| !w.is_finished()).count();
        ctl.kill();
        stop.store(true, Ordering::SeqCst);
        for w in workers {
            tokio::time::timeout(Duration::from_secs(60), w).await.expect("storm worker ends").expect("storm worker");
        }
        let all = cycles.lock().unwrap();
        let in_flight = all
            .iter()
            .filter(|c| [c.create, c.publish, c.write_a, c.snapshot, c.write_b].contains(&Step::InFlight))
            .count();
        eprintln!(
            "round {round}: SIGKILL after {delay} ms with {busy} of {WORKERS} workers busy; {} cycles so far, \
             {in_flight} cut mid-way",
            all.len()
        );
    }

    ctl.restart();
    let (volumes, snapshots) = verify_loaded(&ctl, &cycles).await;
    let acked = cycles.lock().unwrap().iter().filter(|c| c.create == Step::Done).count();
    assert!(acked >= ROUNDS, "the storms made too little progress to test anything ({acked} volumes)");
    let (checked, compared) = verify_content(&ctl, &cycles, scratch.path()).await;
    eprintln!(
        "final: {volumes} volumes and {snapshots} snapshots back; {checked} contents checked \
         ({compared} by qemu-img compare, the rest by qemu-io read -P around cut writes) in {:?}",
        started.elapsed()
    );
    assert_eq!(checked, volumes + snapshots);
    ctl.terminate();
}
