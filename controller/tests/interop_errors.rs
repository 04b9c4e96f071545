//! Interop: error replies. Each error must come back with the spec's errno
//! and leave the connection usable; only a lost framing (bad request magic,
//! a WRITE payload over the 32 MiB maximum) closes a connection, and then
//! only that one.
//!
//! libnbd (python3-libnbd) with strict mode off sends the bad requests; a
//! hand-written blocking client in `common` covers what libnbd cannot send.

mod common;

use common::wire::*;
use common::*;

const NAME: &str = "vol";

/// Shared by both python scripts: `check(what, errno, fn)` runs `fn`,
/// requires an nbd.Error with that errno, then requires a normal pread on
/// the same handle to return `first` (the export's first 4 KiB).
const PRELUDE: &str = r#"
import errno, sys, nbd
h = nbd.NBD()
h.set_strict_mode(0)   # send what libnbd itself would refuse
h.connect_uri(sys.argv[1])
size = h.get_size()
first = h.pread(4096, 0)

def check(what, want, fn):
    try:
        fn()
    except nbd.Error as e:
        if e.errnum != want:
            sys.exit(f"{what}: errno {e.errnum} ({e.errno}) {e.string!r}, want {errno.errorcode[want]}")
    else:
        sys.exit(f"{what}: succeeded, want {errno.errorcode[want]}")
    if h.pread(4096, 0) != first:
        sys.exit(f"after {what}: pread on the same connection returned other data")
    print(f"{what}: {errno.errorcode[want]}, connection still works")
"#;

const OUT_OF_RANGE: &str = r#"
tail = h.pread(512, size - 512)
check("pread past end", errno.EINVAL, lambda: h.pread(4096, size - 512))
check("pread starting at end", errno.EINVAL, lambda: h.pread(512, size))
check("pwrite past end", errno.ENOSPC, lambda: h.pwrite(b"x" * 4096, size - 512))
check("pwrite FUA past end", errno.ENOSPC, lambda: h.pwrite(b"x" * 4096, size - 512, nbd.CMD_FLAG_FUA))
check("trim past end", errno.EINVAL, lambda: h.trim(4096, size - 512))
check("zero past end", errno.ENOSPC, lambda: h.zero(4096, size - 512))
check("zero NO_HOLE past end", errno.ENOSPC, lambda: h.zero(4096, size - 512, nbd.CMD_FLAG_NO_HOLE))
check("cache past end", errno.EINVAL, lambda: h.cache(4096, size - 512))
check("pread with unknown flag bit 7", errno.EINVAL, lambda: h.pread(512, 0, flags=1 << 7))
check("pread with NO_HOLE", errno.EINVAL, lambda: h.pread(512, 0, flags=nbd.CMD_FLAG_NO_HOLE))
check("pwrite with FAST_ZERO", errno.EINVAL, lambda: h.pwrite(b"y" * 512, 0, nbd.CMD_FLAG_FAST_ZERO))
check("trim with NO_HOLE", errno.EINVAL, lambda: h.trim(512, 0, nbd.CMD_FLAG_NO_HOLE))
# Nothing of a refused request was applied.
if h.pread(512, size - 512) != tail:
    sys.exit("a refused write past the end changed the last sector")
# Valid requests right up to the end still work.
h.pwrite(b"z" * 512, size - 512, nbd.CMD_FLAG_FUA)
if h.pread(512, size - 512) != b"z" * 512:
    sys.exit("write of the last sector did not read back")
h.shutdown()
print("done")
"#;

const READ_ONLY: &str = r#"
if not h.is_read_only():
    sys.exit("export should be read-only")
check("pwrite on read-only", errno.EPERM, lambda: h.pwrite(b"y" * 4096, 0))
check("pwrite FUA on read-only", errno.EPERM, lambda: h.pwrite(b"y" * 4096, 0, nbd.CMD_FLAG_FUA))
check("trim on read-only", errno.EPERM, lambda: h.trim(4096, 0))
check("zero on read-only", errno.EPERM, lambda: h.zero(4096, 0))
h.flush()
h.shutdown()
print("done")
"#;

fn run_python(body: &str, server: &Server) -> String {
    let script = format!("{PRELUDE}{body}");
    let out = run_ok(&mut python_script(&script, [server.uri()]), QUICK);
    assert!(out.contains("done"), "{out}");
    out
}

#[test]
fn libnbd_errors_return_errno_and_keep_the_connection() {
    let data = random_bytes(8 * MIB, 10);
    let vol = Volume::with_data(&data);
    let server = Server::start(&vol, NAME, &[]);
    let out = run_python(OUT_OF_RANGE, &server);
    eprintln!("{out}");
    let mut expected = data;
    let end = expected.len();
    expected[end - 512..].fill(b'z');
    assert_same_bytes(&vol.contents(), &expected, "backing file after refused requests");
}

#[test]
fn libnbd_writes_on_read_only_export_get_eperm() {
    let data = random_bytes(4 * MIB, 11);
    let vol = Volume::with_data(&data);
    let server = Server::start(&vol, NAME, &["--read-only"]);
    let out = run_python(READ_ONLY, &server);
    eprintln!("{out}");
    assert_same_bytes(&vol.contents(), &data, "read-only backing file");
}

#[test]
fn raw_unknown_command_and_flags_get_einval_and_keep_the_connection() {
    let data = random_bytes(40 * MIB, 12);
    let vol = Volume::with_data(&data);
    let server = Server::start(&vol, NAME, &[]);
    let mut conn = RawConn::connect(&server);
    assert_eq!(conn.size, data.len() as u64);

    // An unknown command: EINVAL, cookie echoed.
    conn.request(0, 0x42, 77, 0, 4096, &[]);
    assert_eq!(conn.reply(), (EINVAL, 77));
    assert_eq!(conn.read(0, 4096).as_deref(), Ok(&data[..4096]));

    // A WRITE with an unknown flag: EINVAL, its payload consumed and not
    // applied, the next request parsed correctly.
    assert_eq!(conn.write(0, &[0xee; 4096], 1 << 9), EINVAL);
    assert_eq!(conn.read(0, 4096).as_deref(), Ok(&data[..4096]));

    // A READ over the maximum payload has nothing to skip: EINVAL, kept.
    assert_eq!(conn.read(0, (32 << 20) + 1), Err(EINVAL));
    // Exactly the maximum is fine, for READ and WRITE.
    let big = random_bytes(32 * MIB, 13);
    assert_eq!(conn.write(MIB as u64, &big, 0), 0);
    let back = conn.read(MIB as u64, 32 << 20).expect("32 MiB read");
    assert_same_bytes(&back, &big, "32 MiB read back");
    conn.disconnect();
}

#[test]
fn raw_bad_magic_closes_only_that_connection() {
    let data = random_bytes(MIB, 14);
    let vol = Volume::with_data(&data);
    let server = Server::start(&vol, NAME, &[]);
    let mut victim = RawConn::connect(&server);
    let mut bystander = RawConn::connect(&server);
    assert_eq!(victim.read(0, 512).as_deref(), Ok(&data[..512]));
    assert_eq!(bystander.read(0, 512).as_deref(), Ok(&data[..512]));

    victim.send(REQUEST_MAGIC ^ 1, 0, CMD_READ, 1, 0, 512, &[]);
    victim.assert_closed();

    // The other connection, opened before, still reads and writes.
    assert_eq!(bystander.read(4096, 4096).as_deref(), Ok(&data[4096..8192]));
    assert_eq!(bystander.write(8192, &[0x5a; 4096], 0), 0);
    assert_eq!(bystander.read(8192, 4096), Ok(vec![0x5a; 4096]));
    // And the server still accepts new ones.
    let mut newcomer = RawConn::connect(&server);
    assert_eq!(newcomer.read(8192, 4096), Ok(vec![0x5a; 4096]));
    bystander.disconnect();
    newcomer.disconnect();
}

#[test]
fn raw_oversized_write_closes_only_that_connection() {
    let data = random_bytes(MIB, 15);
    let vol = Volume::with_data(&data);
    let server = Server::start(&vol, NAME, &[]);
    let mut victim = RawConn::connect(&server);
    let mut bystander = RawConn::connect(&server);
    assert_eq!(victim.read(0, 512).as_deref(), Ok(&data[..512]));

    // 64 MiB announced, twice the maximum: the server cannot skip it safely.
    victim.request(0, CMD_WRITE, 2, 0, 64 << 20, &[]);
    victim.assert_closed();

    assert_eq!(bystander.read(0, 4096).as_deref(), Ok(&data[..4096]));
    assert_eq!(bystander.write(0, &[0xc3; 512], CMD_FLAG_FUA), 0);
    assert_eq!(bystander.read(0, 512), Ok(vec![0xc3; 512]));
    let mut newcomer = RawConn::connect(&server);
    assert_eq!(newcomer.read(0, 512), Ok(vec![0xc3; 512]));
    bystander.disconnect();
    newcomer.disconnect();
    assert_eq!(&vol.contents()[..512], &[0xc3; 512]);
}
