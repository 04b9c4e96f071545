//! Interop under load: fio's nbd engine (libnbd, one connection per job)
//! with 64 clients of 128 requests in flight each, and a write + verify
//! job whose data a second fio process verifies again.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;

const NAME: &str = "vol";

/// fio can be slow in a debug build on a small machine; still bounded.
const FIO_DEADLINE: Duration = Duration::from_secs(300);

/// One fio job's figures from `--output-format=json`.
#[derive(Debug)]
struct Job {
    error: u64,
    /// read, write, trim
    ios: [u64; 3],
    bytes: [u64; 3],
    short_or_dropped: u64,
}

/// Runs fio against `server` with `args`; returns its exit code and jobs.
fn fio(server: &Server, dir: &Path, args: &[&str]) -> (Option<i32>, Vec<Job>, String) {
    let json_path = dir.join(format!("fio-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&json_path);
    let mut cmd = tool("fio");
    cmd.current_dir(dir)
        .args(["--ioengine=nbd", &format!("--uri={}", server.uri())])
        .args(args)
        .args(["--output-format=json", &format!("--output={}", json_path.display())]);
    let started = Instant::now();
    let output = run(&mut cmd, FIO_DEADLINE);
    eprintln!("fio {args:?}: {:?}", started.elapsed());
    let json = std::fs::read_to_string(&json_path).unwrap_or_default();
    let head: String = json.chars().take(6000).collect();
    let diagnostics = format!("{}\n--- fio json (start) ---\n{head}", describe(&output));
    if json.trim().is_empty() {
        return (output.status.code(), Vec::new(), diagnostics);
    }
    let doc = parse_json(&json);
    let jobs = doc["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("no jobs in fio output\n{diagnostics}"))
        .iter()
        .map(|job| {
            let dirs = ["read", "write", "trim"].map(|dir| &job[dir]);
            Job {
                error: json_u64(job, "error"),
                ios: dirs.map(|d| json_u64(d, "total_ios")),
                bytes: dirs.map(|d| json_u64(d, "io_bytes")),
                short_or_dropped: dirs.iter().map(|d| json_u64(d, "short_ios") + json_u64(d, "drop_ios")).sum(),
            }
        })
        .collect();
    (output.status.code(), jobs, diagnostics)
}

#[test]
fn fio_64_connections_128_in_flight_each() {
    const JOBS: usize = 64;
    const IOS: u64 = 2000;
    let vol = Volume::sparse(128 * MIB);
    // Every job connects from 127.0.0.1: lift the per-address cap (32) for them.
    let server = Server::start(&vol, NAME, &["--max-connections-per-peer", "64"]);
    let (code, jobs, diag) = fio(
        &server,
        vol.dir(),
        &[
            "--name=load",
            &format!("--numjobs={JOBS}"),
            "--iodepth=128",
            "--rw=randrw",
            "--bs=4k",
            "--size=64M",
            &format!("--number_ios={IOS}"),
        ],
    );
    assert_eq!(code, Some(0), "fio failed\n{diag}");
    assert_eq!(jobs.len(), JOBS, "one report per job\n{diag}");
    for (i, job) in jobs.iter().enumerate() {
        assert_eq!(job.error, 0, "job {i}: {job:?}\n{diag}");
        assert_eq!(job.short_or_dropped, 0, "job {i}: {job:?}");
        assert_eq!(job.ios[0] + job.ios[1], IOS, "job {i} read + write I/Os: {job:?}");
        assert_eq!(job.ios[2], 0, "job {i}: no trims: {job:?}");
        assert_eq!(job.bytes[0] + job.bytes[1], IOS * 4096, "job {i} bytes: {job:?}");
    }
    let reads: u64 = jobs.iter().map(|j| j.ios[0]).sum();
    let writes: u64 = jobs.iter().map(|j| j.ios[1]).sum();
    assert!(reads > 0 && writes > 0, "a random mix: {reads} reads, {writes} writes");
    eprintln!("{reads} reads and {writes} writes over {JOBS} connections");
}

#[test]
fn fio_write_verify_over_4_connections() {
    const REGION: u64 = 16 << 20;
    let vol = Volume::sparse(64 * MIB);
    let server = Server::start(&vol, NAME, &[]);
    // Four jobs, each writing its own 16 MiB region in random order with a
    // checksum header per block, then reading it all back and checking.
    let job = |extra: &[&str]| {
        let mut args = vec![
            "--name=verify",
            "--numjobs=4",
            "--iodepth=32",
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--offset_increment=16M",
            "--verify=crc32c",
        ];
        args.extend_from_slice(extra);
        fio(&server, vol.dir(), &args)
    };

    let (code, jobs, diag) = job(&["--do_verify=1"]);
    assert_eq!(code, Some(0), "fio write + verify failed\n{diag}");
    assert_eq!(jobs.len(), 4, "{diag}");
    for (i, job) in jobs.iter().enumerate() {
        assert_eq!(job.error, 0, "job {i}: {job:?}\n{diag}");
        assert_eq!(job.bytes[1], REGION, "job {i} wrote its region: {job:?}");
        assert_eq!(job.bytes[0], REGION, "job {i} verified its region: {job:?}");
    }

    // A new fio process on new connections verifies the same data again.
    let (code, jobs, diag) = job(&["--verify_only"]);
    assert_eq!(code, Some(0), "fio verify_only failed\n{diag}");
    assert!(jobs.iter().all(|j| j.error == 0 && j.bytes[0] == REGION), "{jobs:?}\n{diag}");

    // And the check is real: one overwritten block in job 2's region fails it.
    let block = format!("write -P 0 {} 4k", 2 * REGION + (5 << 20));
    run_ok(tool("qemu-io").args(["-f", "raw", &server.uri(), "-c", &block]), QUICK);
    let (code, jobs, diag) = job(&["--verify_only"]);
    assert_ne!(code, Some(0), "verify_only should fail after corruption\n{diag}");
    assert_eq!(jobs.iter().filter(|j| j.error != 0).count(), 1, "only job 2 fails: {jobs:?}\n{diag}");
    assert_ne!(jobs[2].error, 0, "job 2 covers the corrupted block: {jobs:?}");
}

#[test]
fn sigterm_under_load_drains_and_exits() {
    let vol = Volume::with_data(&random_bytes(64 * MIB, 20));
    let mut server = Server::start(&vol, NAME, &[]);
    // 16 connections that keep 128 reads in flight until the server goes:
    // the server always has another request header to read. Reads only, so
    // the final flush has nothing to write and the timing is the drain's.
    let mut load = tool("fio")
        .current_dir(vol.dir())
        .args(["--ioengine=nbd", &format!("--uri={}", server.uri())])
        .args(["--name=busy", "--numjobs=16", "--iodepth=128", "--rw=randread", "--bs=64k", "--size=64M"])
        .args(["--time_based", "--runtime=60", "--output-format=json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fio is not installed (tests/run.sh installs it)");
    std::thread::sleep(Duration::from_secs(2));
    assert!(load.try_wait().unwrap().is_none(), "fio stopped before the signal");

    // The server stops reading new requests at once and sends what it owes,
    // well within its 5 s grace (after which it cuts connections off).
    let stopped = server.terminate(Duration::from_secs(10));
    let fio_exited = wait_or_kill(&mut load, Duration::from_secs(20));
    let (status, took) = stopped.expect("serve-file still running 10 s after SIGTERM under load");
    eprintln!("serve-file stopped {took:?} after SIGTERM under load");
    assert!(status.success(), "serve-file exit status {status}\n{}", server.log());
    assert!(
        took < Duration::from_secs(4),
        "serve-file took {took:?} to stop under load: connections did not drain by themselves\n{}",
        server.log()
    );
    assert!(fio_exited, "fio still running 20 s after the server stopped");
}

/// Waits for `child` up to `timeout`; kills it and returns false if it is
/// still running then.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}
