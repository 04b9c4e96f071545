//! A snapshot of a published volume taken while real NBD clients write to
//! it without pause, through the agent's own API and its real server on
//! loopback TCP.
//!
//! The proof of the instant. Each writer owns its own 4 KiB blocks and
//! writes them one at a time, each block's content naming its writer, its
//! block and the writer's sequence number; a block never written holds
//! sequence 0. A snapshot of one instant holds, for every writer, exactly
//! the state after some prefix of its writes: its blocks are what its first
//! k writes made them, for one k, with no later write in any block and no
//! earlier one lost. That k is found from the snapshot and must lie between
//! what the writer had acknowledged when the call was made and what it had
//! issued when the marker written after the call was acknowledged. Marker A
//! (acknowledged before the call) is in the snapshot, marker B (written
//! once the call has taken its instant) is not. The image those prefixes
//! make is then built as a file of its own and `qemu-img compare`d with the
//! snapshot: byte for byte the volume at the instant.
//!
//! Where the data directory has no reflink (ext4, tmpfs) the copy is made
//! by copy-before-write: marker B and the writers' writes must be
//! acknowledged while the copy is still running (an ordering, not a
//! timing). Where it has reflink (XFS with `reflink=1`, btrfs) the snapshot
//! must share the volume's extents (`filefrag -v` says `shared`). The
//! directory is a temporary one, or the one `NBD_CSI_SNAPSHOT_DIR` names
//! (tests/snapshot-fs.sh runs this on ext4 and XFS loop devices); with
//! `NBD_CSI_SNAPSHOT_EXPECT=reflink` or `=copy` the test fails unless that
//! path is the one taken.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nbd_csi_agent::testing::Client;
use nbd_csi_agent::{Agent, Config, ConnectionCaps, LogsOnly, NewSnapshot, NewVolume, Publication};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
/// Large enough that the copy takes a good part of a second (debug build,
/// page cache), small enough for CI.
const SIZE: u64 = 128 * MIB;
/// The writers own every block below this; the markers live above it.
const WRITER_AREA: u64 = SIZE - MIB;
const MARKER_A: u64 = WRITER_AREA;
const MARKER_B: u64 = WRITER_AREA + 512 * 1024;
const WRITERS: u64 = 4;
/// Bounds on the load: writes per writer and the whole test's wait.
const MAX_WRITES: u64 = 2_000_000;
const LIMIT: Duration = Duration::from_secs(120);

/// Block `block` as writer `writer`'s write number `seq` makes it.
fn content(writer: u64, block: u64, seq: u64) -> Vec<u8> {
    let mut header = [0u8; 24];
    header[..8].copy_from_slice(&writer.to_le_bytes());
    header[8..16].copy_from_slice(&block.to_le_bytes());
    header[16..].copy_from_slice(&seq.to_le_bytes());
    // 4096 is not a multiple of 24: the tail is the header's start.
    let mut block = vec![0u8; BLOCK as usize];
    for piece in block.chunks_mut(header.len()) {
        piece.copy_from_slice(&header[..piece.len()]);
    }
    block
}

/// The sequence number a block's content names, if it is a whole block
/// written by `writer` for `block` (anything else is a torn or foreign one).
fn seq_of(data: &[u8], writer: u64, block: u64) -> Option<u64> {
    let seq = u64::from_le_bytes(data[16..24].try_into().unwrap());
    (data == content(writer, block, seq).as_slice()).then_some(seq)
}

fn owner(block: u64) -> u64 {
    block % WRITERS
}

/// What one writer did: `history[i]` is the block of its write i + 1.
#[derive(Default)]
struct Log {
    history: std::sync::Mutex<Vec<u64>>,
    acked: AtomicU64,
}

struct Load {
    stop: AtomicBool,
    logs: Vec<Log>,
    /// Writes acknowledged while a copy-before-write guard was in place.
    acked_while_copying: AtomicU64,
}

async fn write_until_stopped(
    mut client: Client,
    writer: u64,
    load: Arc<Load>,
    export: Arc<nbd::server::Export>,
) -> std::io::Result<()> {
    let log = &load.logs[writer as usize];
    let blocks = WRITER_AREA / BLOCK / WRITERS;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ writer;
    let started = Instant::now();
    for seq in 1..=MAX_WRITES {
        if load.stop.load(Ordering::Acquire) || started.elapsed() > LIMIT {
            break;
        }
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let block = (rng >> 33) % blocks * WRITERS + writer;
        log.history.lock().unwrap().push(block);
        assert_eq!(client.write(block * BLOCK, &content(writer, block, seq)).await?, 0, "write acknowledged");
        log.acked.store(seq, Ordering::Release);
        if export.copies_in_progress() > 0 {
            load.acked_while_copying.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

fn data_dir() -> (tempfile::TempDir, Option<String>) {
    let expect = std::env::var("NBD_CSI_SNAPSHOT_EXPECT").ok();
    let dir = match std::env::var_os("NBD_CSI_SNAPSHOT_DIR") {
        Some(root) => tempfile::tempdir_in(root).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    (dir, expect)
}

/// Whether `dir`'s filesystem can reflink: what the agent tries first.
fn has_reflink(dir: &Path) -> bool {
    let a = tempfile::tempfile_in(dir).unwrap();
    a.write_all_at(&[1; 4096], 0).unwrap();
    let b = tempfile::tempfile_in(dir).unwrap();
    rustix::fs::ioctl_ficlone(&b, &a).is_ok()
}

/// Whether `filefrag -v` reports any of `path`'s extents shared.
fn shares_extents(path: &Path) -> bool {
    let out = std::process::Command::new("filefrag").arg("-v").arg(path).output().expect("filefrag runs");
    assert!(out.status.success(), "filefrag: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).contains("shared")
}

fn fill_initial(image: &Path) {
    let file = File::options().write(true).open(image).unwrap();
    let mut chunk = Vec::with_capacity(MIB as usize);
    for first in (0..WRITER_AREA / BLOCK).step_by((MIB / BLOCK) as usize) {
        chunk.clear();
        for block in first..first + MIB / BLOCK {
            chunk.extend_from_slice(&content(owner(block), block, 0));
        }
        file.write_all_at(&chunk, first * BLOCK).unwrap();
    }
    file.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_under_writes_is_the_volume_at_the_instant_of_the_call() {
    let (dir, expect) = data_dir();
    let reflink = has_reflink(dir.path());
    match expect.as_deref() {
        None => {}
        Some("reflink") => assert!(reflink, "{} cannot reflink", dir.path().display()),
        Some("copy") => assert!(!reflink, "{} can reflink", dir.path().display()),
        Some(other) => panic!("NBD_CSI_SNAPSHOT_EXPECT={other}: reflink or copy"),
    }
    let config = Config {
        listen: "127.0.0.1".parse().unwrap(),
        ports: 29700..=29715,
        connection_caps: ConnectionCaps::default(),
        tls_dir: None,
    };
    let agent = Agent::open(config, dir.path(), Arc::new(LogsOnly)).await.unwrap();
    let volume = agent
        .create_volume(NewVolume {
            id: None,
            name: "written".into(),
            capacity_bytes: SIZE,
            block: true,
            access_modes: vec![1],
            fs_type: String::new(),
            parameters: BTreeMap::new(),
            source: None,
            read_only: false,
            export_name: None,
            tls: Default::default(),
        })
        .await
        .unwrap();
    let image = dir.path().join("volumes").join(format!("{}.img", volume.id));
    let filled = image.clone();
    tokio::task::spawn_blocking(move || fill_initial(&filled)).await.unwrap();
    let published =
        BTreeMap::from([("node".to_string(), Publication { read_only: false, access_mode: 1, addresses: None })]);
    let port = agent.set_access(&volume.id, published, Duration::from_secs(5)).await.unwrap().port.unwrap();
    let address = format!("127.0.0.1:{port}");
    let export = agent.exports().snapshot().into_iter().find(|(id, _)| *id == volume.id).unwrap().1;

    let load = Arc::new(Load {
        stop: AtomicBool::new(false),
        logs: (0..WRITERS).map(|_| Log::default()).collect(),
        acked_while_copying: AtomicU64::new(0),
    });
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let client = Client::connect(&address, &volume.export_name).await.unwrap();
        writers.push(tokio::spawn(write_until_stopped(client, writer, Arc::clone(&load), Arc::clone(&export))));
    }
    let mut markers = Client::connect(&address, &volume.export_name).await.unwrap();
    // The load is running before the call.
    let deadline = Instant::now() + LIMIT;
    while load.logs.iter().any(|log| log.acked.load(Ordering::Acquire) < 100) {
        assert!(Instant::now() < deadline, "the writers never got going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    assert_eq!(markers.write(MARKER_A, &[0xaa; BLOCK as usize]).await.unwrap(), 0);
    let acked_before: Vec<u64> = load.logs.iter().map(|log| log.acked.load(Ordering::Acquire)).collect();
    let snapshotting = {
        let agent = Arc::clone(&agent);
        let new = NewSnapshot {
            id: None,
            name: "under-writes".into(),
            source_volume_id: volume.id.clone(),
            parameters: BTreeMap::new(),
        };
        tokio::spawn(async move { agent.create_snapshot(new).await })
    };
    // Marker B goes in once the call has its instant: the guard is in
    // place (copy), or the reflink is done (the call returned).
    let instant = Instant::now() + LIMIT;
    while export.copies_in_progress() == 0 && !snapshotting.is_finished() {
        assert!(Instant::now() < instant, "the snapshot never took its instant");
        tokio::task::yield_now().await;
    }
    assert_eq!(markers.write(MARKER_B, &[0xbb; BLOCK as usize]).await.unwrap(), 0);
    let b_while_copying = export.copies_in_progress() > 0;
    let issued_at_b: Vec<u64> = load.logs.iter().map(|log| log.history.lock().unwrap().len() as u64).collect();
    let snapshot =
        tokio::time::timeout(LIMIT, snapshotting).await.expect("snapshot within the limit").unwrap().unwrap();
    load.stop.store(true, Ordering::Release);
    for writer in writers {
        writer.await.unwrap().unwrap();
    }
    let snap_image = dir.path().join("snapshots").join(format!("{}.img", snapshot.id));

    if reflink {
        assert!(shares_extents(&snap_image), "the snapshot shares the volume's extents (FICLONE)");
        assert_eq!(load.acked_while_copying.load(Ordering::Relaxed), 0, "a reflink needs no copy");
    } else {
        assert!(!shares_extents(&snap_image));
        assert!(b_while_copying, "marker B was acknowledged while the copy was still running");
        assert!(load.acked_while_copying.load(Ordering::Relaxed) > 0, "writes went on during the copy");
    }
    assert_eq!(export.copies_in_progress(), 0, "the guard is gone with the copy");

    let snap = tokio::task::spawn_blocking(move || std::fs::read(&snap_image).unwrap()).await.unwrap();
    assert_eq!(snap.len() as u64, SIZE);
    assert_eq!(&snap[MARKER_A as usize..(MARKER_A + BLOCK) as usize], [0xaa; BLOCK as usize], "marker A is in");
    assert_eq!(&snap[MARKER_B as usize..(MARKER_B + BLOCK) as usize], [0; BLOCK as usize], "marker B is not");

    // Each writer's cut: the highest sequence number any of its blocks
    // holds; then every block must be exactly what that prefix made it.
    let mut reference = vec![0u8; SIZE as usize];
    reference[MARKER_A as usize..(MARKER_A + BLOCK) as usize].fill(0xaa);
    for writer in 0..WRITERS {
        let history = load.logs[writer as usize].history.lock().unwrap().clone();
        let blocks: Vec<u64> = (0..WRITER_AREA / BLOCK).filter(|b| owner(*b) == writer).collect();
        let seqs: Vec<u64> = blocks
            .iter()
            .map(|&b| {
                let at = (b * BLOCK) as usize;
                seq_of(&snap[at..at + BLOCK as usize], writer, b)
                    .unwrap_or_else(|| panic!("block {b} of writer {writer} is torn or foreign"))
            })
            .collect();
        let cut = seqs.iter().copied().max().unwrap();
        assert!(cut >= acked_before[writer as usize], "writer {writer}: an acknowledged write is missing");
        assert!(cut <= issued_at_b[writer as usize], "writer {writer}: a write issued after marker B is in");
        let mut state: BTreeMap<u64, u64> = BTreeMap::new();
        for (i, &block) in history.iter().take(cut as usize).enumerate() {
            state.insert(block, i as u64 + 1);
        }
        for (&block, &seq) in blocks.iter().zip(&seqs) {
            let expected = state.get(&block).copied().unwrap_or(0);
            assert_eq!(seq, expected, "writer {writer} block {block}: not the state after its first {cut} writes");
            let at = (block * BLOCK) as usize;
            reference[at..at + BLOCK as usize].copy_from_slice(&content(writer, block, seq));
        }
    }
    let reference_path: PathBuf = dir.path().join("reference.img");
    std::fs::write(&reference_path, &reference).unwrap();
    let snap_image = dir.path().join("snapshots").join(format!("{}.img", snapshot.id));
    let compared = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&reference_path)
        .arg(&snap_image)
        .output()
        .expect("qemu-img runs");
    assert!(compared.status.success(), "qemu-img compare: {}", String::from_utf8_lossy(&compared.stdout));
    agent.shutdown().await;
}
