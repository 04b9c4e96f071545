//! One client cannot starve the others, end to end: the real controller,
//! started with the usual container open-file limit (soft 1024), serves two
//! volumes; 1200 idle connections to volume A from one address leave
//! volume B's handshake answering within a second. The controller raises
//! its soft limit to the hard one at start, and caps connections per
//! volume and per address (here the per-address cap comes from its
//! environment fallback).

mod common;
mod process;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::wire::*;
use common::*;
use process::{Controller, cli_ok, free_port_block};

/// More connections than the soft limit the controller starts with.
const FLOOD: usize = 1200;
const PER_PEER: usize = 16;
const SOFT: u64 = 1024;
/// The controller's hard limit: this, or ours if lower.
const HARD: u64 = 8192;
const PROMPT: Duration = Duration::from_secs(1);

/// A published volume's (port, export name).
fn publish_new(cwd: &Path, name: &str) -> (u16, String) {
    let created = cli_ok(cwd, &["volume", "create", name, "--size", "16M", "-o", "json"]);
    let id = parse_json(&created)["id"].as_str().expect("id").to_string();
    let uri = cli_ok(cwd, &["volume", "publish", &id, "--node", "node-1"]).trim().to_string();
    let rest = uri.strip_prefix("nbd://127.0.0.1:").unwrap_or_else(|| panic!("nbdUri {uri}"));
    let (port, name) = rest.split_once('/').expect("port/name");
    (port.parse().expect("port"), name.to_string())
}

/// Fixed newstyle handshake with NBD_OPT_EXPORT_NAME; how long it took.
fn handshake_time(port: u16, name: &str) -> Duration {
    let started = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to B");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).expect("B's greeting");
    assert_eq!(u64::from_be_bytes(greeting[..8].try_into().unwrap()), NBDMAGIC);
    let mut msg = u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes().to_vec();
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    msg.extend_from_slice(&(name.len() as u32).to_be_bytes());
    msg.extend_from_slice(name.as_bytes());
    stream.write_all(&msg).expect("EXPORT_NAME");
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).expect("B's export reply");
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), 16 * MIB as u64);
    started.elapsed()
}

/// True if the server greets, false if it closes without a byte.
fn greeted(stream: &mut TcpStream) -> bool {
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 18];
    match stream.read(&mut buf) {
        Ok(0) => false,
        Ok(_) => {
            assert_eq!(&buf[..8], b"NBDMAGIC");
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => false,
        Err(e) => panic!("neither a greeting nor a close: {e}"),
    }
}

fn open_files_limit(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("Max open files");
    let fields: Vec<u64> = line.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    (fields[0], fields[1])
}

#[test]
fn a_flood_to_one_volume_leaves_another_volume_answering() {
    // This test holds over a thousand sockets itself.
    let hard = {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
        hard.min(HARD)
    };
    assert!(hard > FLOOD as u64 + 100, "an open-file hard limit of {hard} is too low for this test");
    let dir = tempfile::tempdir().expect("tempdir");
    let cwd = dir.path();
    let per_peer = PER_PEER.to_string();
    let env = [("NBD_CSI_NBD_MAX_CONNECTIONS_PER_PEER", per_peer.as_str())];
    let server = Controller::start_with_defaults_and(cwd, free_port_block(8), Some((SOFT, hard)), &env);
    let (port_a, _) = publish_new(cwd, "a");
    let (port_b, name_b) = publish_new(cwd, "b");

    let flood = std::thread::spawn(move || {
        (0..FLOOD).map(|_| TcpStream::connect(("127.0.0.1", port_a)).expect("connect to A")).collect::<Vec<_>>()
    });
    let mut slowest = Duration::ZERO;
    let mut handshakes = 0;
    while !flood.is_finished() || handshakes < 5 {
        slowest = slowest.max(handshake_time(port_b, &name_b));
        handshakes += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut flooded = flood.join().expect("flood thread");
    slowest = slowest.max(handshake_time(port_b, &name_b));
    eprintln!(
        "volume B: slowest of {} handshakes during and after {FLOOD} connections to A: {slowest:?}",
        handshakes + 1
    );
    assert!(slowest < PROMPT, "volume B's handshake took {slowest:?} under the flood");

    assert_eq!(open_files_limit(server.pid()), (hard, hard), "the controller raised its soft open-file limit");
    let admitted = flooded.iter_mut().map(greeted).filter(|&g| g).count();
    assert_eq!(admitted, PER_PEER, "connections from the flooding address greeted (the rest closed unserved)");
    let log = server.run_log();
    let lines = log.lines().filter(|l| l.contains("connections refused")).count();
    assert!((1..=3).contains(&lines), "{lines} log lines for {} refusals:\n{log}", FLOOD - PER_PEER);
}
