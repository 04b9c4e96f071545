//! Interop: `nbd-csi-controller serve-file` driven by NBD clients nobody
//! here wrote — nbdinfo, nbdcopy and nbdsh (libnbd), qemu-io and qemu-img.
//! Each test starts its own server on its own file and port.
//!
//! Errors and the raw-socket cases are in `interop_errors.rs`, fio load in
//! `interop_load.rs`.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;

const NAME: &str = "vol";

/// nbdinfo's whole JSON document and its one export.
fn nbdinfo_json(server: &Server) -> (serde_json::Value, serde_json::Value) {
    let doc = parse_json(&run_ok(tool("nbdinfo").args(["--json", &server.uri()]), QUICK));
    let exports = doc["exports"].as_array().unwrap_or_else(|| panic!("no exports in {doc:#}"));
    assert_eq!(exports.len(), 1, "{doc:#}");
    let export = exports[0].clone();
    (doc, export)
}

/// Exit code of `nbdinfo --can|--is WHAT URI`: 0 true, 2 false.
fn nbdinfo_test(server: &Server, how: &str, what: &str) -> i32 {
    exit_code(tool("nbdinfo").args([how, what, &server.uri()]), QUICK)
}

fn qemu_io(server: &Server, commands: &[&str]) -> String {
    let mut cmd = tool("qemu-io");
    cmd.args(["-f", "raw", &server.uri()]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = run_ok(&mut cmd, QUICK);
    assert!(!out.contains("failed"), "qemu-io {commands:?} reported a failure:\n{out}");
    out
}

#[test]
fn nbdinfo_reports_every_capability() {
    let vol = Volume::sparse(64 * MIB);
    let server = Server::start(&vol, NAME, &[]);
    let (doc, json) = nbdinfo_json(&server);
    for key in
        ["can_multi_conn", "can_cache", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_df"]
    {
        assert!(json_bool(&json, key), "{key} should be true:\n{json}");
    }
    assert!(!json_bool(&json, "is_read_only"), "{json}");
    assert!(json_bool(&doc, "structured"), "{doc}");
    assert_eq!(json["contexts"], serde_json::json!(["base:allocation"]), "{json}");
    assert_eq!(json_u64(&json, "export-size"), 64 * MIB as u64, "{json}");
    assert_eq!(json_u64(&json, "block_size_maximum"), 32 * MIB as u64, "{json}");
    assert_eq!(json_str(&json, "export-name"), NAME, "{json}");

    // The exit-code forms agree.
    for what in ["multi-conn", "cache", "flush", "fua", "trim", "zero", "fast-zero", "df"] {
        assert_eq!(nbdinfo_test(&server, "--can", what), 0, "nbdinfo --can {what}");
    }
    assert_eq!(nbdinfo_test(&server, "--is", "read-only"), 2, "nbdinfo --is read-only");

    // Another export name is refused.
    let other = format!("nbd://127.0.0.1:{}/other", server.port());
    let output = run(tool("nbdinfo").arg(&other), QUICK);
    assert!(!output.status.success(), "nbdinfo {other} should fail\n{}", describe(&output));
}

#[test]
fn nbdinfo_without_multi_conn() {
    let vol = Volume::sparse(8 * MIB);
    let server = Server::start(&vol, NAME, &["--no-multi-conn"]);
    let (_, json) = nbdinfo_json(&server);
    assert!(!json_bool(&json, "can_multi_conn"), "{json}");
    for key in ["can_cache", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_df"] {
        assert!(json_bool(&json, key), "{key} should still be true:\n{json}");
    }
    assert_eq!(nbdinfo_test(&server, "--can", "multi-conn"), 2);
    assert_eq!(nbdinfo_test(&server, "--can", "cache"), 0);
}

#[test]
fn nbdinfo_read_only_export() {
    let vol = Volume::sparse(8 * MIB);
    let server = Server::start(&vol, NAME, &["--read-only"]);
    let (_, json) = nbdinfo_json(&server);
    assert!(json_bool(&json, "is_read_only"), "{json}");
    for key in ["can_trim", "can_zero", "can_fast_zero"] {
        assert!(!json_bool(&json, key), "{key} should be false on a read-only export:\n{json}");
    }
    for key in ["can_multi_conn", "can_cache", "can_flush", "can_df"] {
        assert!(json_bool(&json, key), "{key} should be true:\n{json}");
    }
    assert_eq!(nbdinfo_test(&server, "--is", "read-only"), 0);
    assert_eq!(nbdinfo_test(&server, "--can", "trim"), 2);
    assert_eq!(nbdinfo_test(&server, "--can", "zero"), 2);
}

#[test]
fn qemu_io_writes_nbdcopy_reads_back() {
    let initial = random_bytes(4 * MIB, 1);
    let vol = Volume::with_data(&initial);
    let server = Server::start(&vol, NAME, &[]);
    qemu_io(&server, &["write -P 0xa5 0 1M", "write -f -P 0x5a 2M 512k", "write -z 3M 64k"]);
    let mut expected = initial;
    expected[..MIB].fill(0xa5);
    expected[2 * MIB..2 * MIB + 512 * KIB].fill(0x5a);
    expected[3 * MIB..3 * MIB + 64 * KIB].fill(0);

    // qemu-io verifies the patterns itself (and exits 1 on a mismatch)...
    qemu_io(&server, &["read -P 0xa5 0 1M", "read -P 0x5a 2M 512k", "read -P 0 3M 64k"]);
    // ...nbdcopy, another client, copies the whole export out...
    let out = vol.local("out.img");
    run_ok(tool("nbdcopy").arg(server.uri()).arg(&out), QUICK);
    assert_same_bytes(&std::fs::read(&out).unwrap(), &expected, "nbdcopy of the export");
    // ...and the backing file holds the same.
    assert_same_bytes(&vol.contents(), &expected, "backing file");
}

#[test]
fn nbdcopy_round_trips_random_data() {
    let size = 8 * MIB;
    // Start from non-zero content so zero ranges nbdcopy skips or sends as
    // WRITE_ZEROES must really be zeroed.
    let vol = Volume::with_data(&vec![0xff; size]);
    let server = Server::start(&vol, NAME, &[]);
    let mut data = random_bytes(size, 2);
    data[3 * MIB..5 * MIB].fill(0);
    let input = vol.local("in.bin");
    std::fs::write(&input, &data).unwrap();

    // With CAN_MULTI_CONN nbdcopy spreads the copy over several connections.
    run_ok(tool("nbdcopy").arg("--flush").arg(&input).arg(server.uri()), QUICK);
    assert_same_bytes(&vol.contents(), &data, "backing file after nbdcopy in");

    let out = vol.local("out.bin");
    run_ok(tool("nbdcopy").arg(server.uri()).arg(&out), QUICK);
    assert_same_bytes(&std::fs::read(&out).unwrap(), &data, "nbdcopy out");

    // The same through a single connection.
    let out1 = vol.local("out1.bin");
    run_ok(tool("nbdcopy").args(["--connections=1", &server.uri()]).arg(&out1), QUICK);
    assert_same_bytes(&std::fs::read(&out1).unwrap(), &data, "nbdcopy --connections=1 out");
}

#[test]
fn several_files_each_on_its_own_port_in_one_process() {
    let sizes = [MIB, 3 * MIB, 2 * MIB];
    let datas: Vec<Vec<u8>> = sizes.iter().zip(10..).map(|(&size, seed)| random_bytes(size, seed)).collect();
    let vols: Vec<Volume> = datas.iter().map(|data| Volume::with_data(data)).collect();
    let server = Server::start_many(&vols.iter().collect::<Vec<_>>(), NAME, &[]);

    for (index, (vol, data)) in (0..).zip(vols.iter().zip(&datas)) {
        let uri = server.uri_of(index);
        let size = run_ok(tool("nbdinfo").args(["--size", &uri]), QUICK);
        assert_eq!(size.trim(), data.len().to_string(), "{uri}: size");
        let out = vol.local("out.bin");
        run_ok(tool("nbdcopy").arg(&uri).arg(&out), QUICK);
        assert_same_bytes(&std::fs::read(&out).unwrap(), data, &uri);
    }
    // A write through one port lands in its file and no other.
    let second = vols[1].local("in.bin");
    std::fs::write(&second, random_bytes(sizes[1], 20)).unwrap();
    run_ok(tool("nbdcopy").arg("--flush").arg(&second).arg(server.uri_of(1)), QUICK);
    assert_same_bytes(&vols[1].contents(), &random_bytes(sizes[1], 20), "second file after the write");
    assert_same_bytes(&vols[0].contents(), &datas[0], "first file untouched");
    assert_same_bytes(&vols[2].contents(), &datas[2], "third file untouched");
}

/// Runs with nbdsh's `h` already connected to the export.
const TWO_CONNECTIONS: &str = r#"
assert h.can_multi_conn(), "CAN_MULTI_CONN expected"
h2 = nbd.NBD()
h2.connect_uri(h.get_uri())

# A FUA write acknowledged on h is read back on h2.
d1 = bytes(range(256)) * 4096          # 1 MiB
h.pwrite(d1, 4096, nbd.CMD_FLAG_FUA)
assert h2.pread(len(d1), 4096) == d1, "FUA write not visible on the second connection"

# A plain write, then FLUSH on the same connection, then read on the other.
d2 = bytes((i * 7 + 3) & 255 for i in range(65536))
h.pwrite(d2, 8 << 20)
h.flush()
assert h2.pread(len(d2), 8 << 20) == d2, "flushed write not visible on the second connection"

# And the other way round, with a FUA WRITE_ZEROES.
h2.zero(65536, 8 << 20, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 8 << 20) == bytes(65536), "FUA zero not visible on the first connection"

h2.shutdown()
h.shutdown()
print("two connections ok")
"#;

#[test]
fn fua_write_on_one_connection_reads_back_on_another() {
    let vol = Volume::sparse(16 * MIB);
    let server = Server::start(&vol, NAME, &[]);
    let out = run_ok(nbdsh(vol.dir()).args(["-u", &server.uri(), "-c", TWO_CONNECTIONS]), QUICK);
    assert!(out.contains("two connections ok"), "{out}");
    let contents = vol.contents();
    let d1: Vec<u8> = (0..MIB).map(|i| i as u8).collect();
    assert_same_bytes(&contents[4096..4096 + MIB], &d1, "FUA write in the backing file");
    assert!(contents[8 * MIB..8 * MIB + 64 * KIB].iter().all(|&b| b == 0));
}

/// `nbdinfo --map` as (offset, length, type) with adjacent extents of the
/// same type merged (a server may split them across replies).
fn map(server: &Server) -> Vec<(u64, u64, u32)> {
    let out = run_ok(tool("nbdinfo").args(["--map", &server.uri()]), QUICK);
    let mut extents: Vec<(u64, u64, u32)> = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let mut fields = line.split_whitespace();
        let mut number =
            || -> u64 { fields.next().and_then(|f| f.parse().ok()).unwrap_or_else(|| panic!("bad map line {line:?}")) };
        let (offset, length, kind) = (number(), number(), number() as u32);
        let description: Vec<&str> = fields.collect();
        let want = match kind {
            0 => "data",
            3 => "hole,zero",
            other => panic!("unexpected extent type {other} in {line:?}"),
        };
        assert_eq!(description.join(" "), want, "{line:?}");
        match extents.last_mut() {
            Some(last) if last.2 == kind && last.0 + last.1 == offset => last.1 += length,
            _ => extents.push((offset, length, kind)),
        }
    }
    extents
}

#[test]
fn nbdinfo_map_shows_holes_and_data() {
    let m = MIB as u64;
    let k = KIB as u64;
    let vol = Volume::sparse(64 * MIB);
    let server = Server::start(&vol, NAME, &[]);
    qemu_io(&server, &["write -P 0x11 1M 64k", "write -P 0x22 32M 64k"]);
    assert_eq!(
        map(&server),
        [
            (0, m, 3),
            (m, 64 * k, 0),
            (m + 64 * k, 31 * m - 64 * k, 3),
            (32 * m, 64 * k, 0),
            (32 * m + 64 * k, 32 * m - 64 * k, 3),
        ]
    );
    // A trim punches the first range out again.
    qemu_io(&server, &["discard 1M 64k"]);
    assert_eq!(map(&server), [(0, 32 * m, 3), (32 * m, 64 * k, 0), (32 * m + 64 * k, 32 * m - 64 * k, 3)]);
}

#[test]
fn qemu_img_info_shows_virtual_size() {
    let vol = Volume::sparse(48 * MIB);
    let server = Server::start(&vol, NAME, &[]);
    let json = parse_json(&run_ok(tool("qemu-img").args(["info", "--output=json", &server.uri()]), QUICK));
    assert_eq!(json_u64(&json, "virtual-size"), 48 * MIB as u64, "{json}");
    assert_eq!(json_str(&json, "format"), "raw", "{json}");

    let opts =
        format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export={}", server.port(), NAME);
    let json = parse_json(&run_ok(tool("qemu-img").args(["info", "--output=json", "--image-opts", &opts]), QUICK));
    assert_eq!(json_u64(&json, "virtual-size"), 48 * MIB as u64, "{json}");
}

#[test]
fn qemu_img_convert_then_compare() {
    let size = 16 * MIB;
    let vol = Volume::sparse(size);
    let server = Server::start(&vol, NAME, &[]);
    let data = random_bytes(size, 3);
    let local = vol.local("local.raw");
    std::fs::write(&local, &data).unwrap();
    let local = local.to_str().unwrap();

    run_ok(tool("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw", local, &server.uri()]), QUICK);
    let compare = |other: &str| {
        let mut cmd = tool("qemu-img");
        cmd.args(["compare", "-f", "raw", "-F", "raw", local, other]);
        let output = run(&mut cmd, QUICK);
        (output.status.code(), describe(&output))
    };
    let (code, out) = compare(&server.uri());
    assert_eq!(code, Some(0), "qemu-img compare after convert\n{out}");
    assert_same_bytes(&vol.contents(), &data, "backing file after qemu-img convert");

    // Reading the export into another format gives the same image.
    let qcow2 = vol.local("copy.qcow2");
    let qcow2 = qcow2.to_str().unwrap();
    run_ok(tool("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2", &server.uri(), qcow2]), QUICK);
    let output = run(tool("qemu-img").args(["compare", "-f", "raw", "-F", "qcow2", local, qcow2]), QUICK);
    assert_eq!(output.status.code(), Some(0), "compare with qcow2 copy\n{}", describe(&output));

    // compare does compare: one changed block makes it report a difference.
    qemu_io(&server, &["write -P 0 5M 4k"]);
    let (code, out) = compare(&server.uri());
    assert_eq!(code, Some(1), "qemu-img compare should see the changed block\n{out}");
}

#[test]
fn sigterm_stops_cleanly_and_keeps_fua_writes() {
    let vol = Volume::sparse(MIB);
    let mut server = Server::start(&vol, NAME, &[]);
    qemu_io(&server, &["write -f -P 0x77 0 64k"]);
    // A client still connected when the signal arrives, its last write FUA.
    let mut conn = RawConn::connect(&server);
    let block = random_bytes(4096, 4);
    assert_eq!(conn.write(128 * KIB as u64, &block, wire::CMD_FLAG_FUA), 0);

    let (status, took) = server.terminate(Duration::from_secs(5)).expect("serve-file still running 5 s after SIGTERM");
    assert!(status.success(), "serve-file exit status {status} after SIGTERM\n{}", server.log());
    eprintln!("serve-file stopped {took:?} after SIGTERM");
    conn.assert_closed();
    assert!(std::net::TcpStream::connect(("127.0.0.1", server.port())).is_err(), "port still accepting after exit");

    let contents = vol.contents();
    assert!(contents[..64 * KIB].iter().all(|&b| b == 0x77), "qemu-io FUA write missing");
    assert_same_bytes(&contents[128 * KIB..128 * KIB + 4096], &block, "raw FUA write");
}

#[test]
fn sigterm_stops_reading_from_a_client_that_never_pauses() {
    let vol = Volume::with_data(&random_bytes(MIB, 5));
    let mut server = Server::start(&vol, NAME, &[]);
    let conn = RawConn::connect(&server);
    // One thread sends 512-byte READs without pause, so the server always
    // has another request header buffered; another reads the replies.
    let mut requests = conn.stream();
    let flood = std::thread::spawn(move || {
        let batch = encode_request(wire::REQUEST_MAGIC, 0, wire::CMD_READ, 9, 0, 512).repeat(128);
        while requests.write_all(&batch).is_ok() {}
    });
    let mut replies = conn.stream();
    let drain = std::thread::spawn(move || {
        let mut reply = [0u8; 16 + 512];
        let mut count = 0u64;
        while replies.read_exact(&mut reply).is_ok() {
            assert_eq!(&reply[..8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0], "simple reply, no error");
            count += 1;
        }
        (count, Instant::now())
    });
    std::thread::sleep(Duration::from_secs(1));

    let signalled = Instant::now();
    let stopped = server.terminate(Duration::from_secs(15));
    let (count, closed) = drain.join().unwrap();
    flood.join().unwrap();
    let (status, took) = stopped.expect("serve-file still running 15 s after SIGTERM");
    let closed_after = closed.duration_since(signalled);
    eprintln!("{count} replies; connection closed {closed_after:?}, process exited {took:?} after SIGTERM");
    assert!(count > 0, "no replies before the signal");
    assert!(status.success(), "exit status {status}\n{}", server.log());
    // The server must stop taking requests when told to stop, not serve
    // this client until its shutdown grace period runs out (5 s).
    assert!(closed_after < Duration::from_secs(2), "connection still served {closed_after:?} after SIGTERM");
    assert!(took < Duration::from_secs(3), "exit took {took:?}\n{}", server.log());
}
