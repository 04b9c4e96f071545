//! Helpers shared by the interop tests: a `serve-file` child process per
//! test on its own port and file, external NBD tools run with a deadline,
//! a hand-written raw NBD client, and byte utilities.
//!
//! Every external tool is required: a missing one fails the test with the
//! package to install (`tests/run.sh` installs them), it never skips.

#![allow(dead_code)] // each test binary uses a different subset

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

pub const KIB: usize = 1 << 10;
pub const MIB: usize = 1 << 20;

/// Deadline for one quick tool run (nbdinfo, qemu-io, a python script).
pub const QUICK: Duration = Duration::from_secs(60);

const PACKAGES: &str = "qemu-utils nbdkit libnbd-bin python3-libnbd nbd-server fio";

// ---------------------------------------------------------------- files

/// A temporary directory holding one backing file, plus room for the
/// local files a test copies in and out.
pub struct Volume {
    dir: TempDir,
    pub path: PathBuf,
}

impl Volume {
    /// A sparse backing file of `size` bytes, all zeroes.
    pub fn sparse(size: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("volume.img");
        File::create(&path).and_then(|f| f.set_len(size as u64)).expect("create backing file");
        Self { dir, path }
    }

    /// A backing file holding exactly `data`.
    pub fn with_data(data: &[u8]) -> Self {
        let vol = Self::sparse(0);
        std::fs::write(&vol.path, data).expect("write backing file");
        vol
    }

    /// Another path in the same temporary directory.
    pub fn local(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).expect("read backing file")
    }
}

/// Pseudo-random test data, different per seed. A 64 KiB xorshift64*
/// tile repeated, with every 4 KiB block stamped with its index, so no two
/// blocks are equal (data landing at the wrong offset is caught) while
/// megabytes are cheap to make in a debug build.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut tile = Vec::with_capacity(64 * KIB);
    while tile.len() < 64 * KIB {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        tile.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = (len - out.len()).min(tile.len());
        out.extend_from_slice(&tile[..n]);
    }
    for (index, block) in out.chunks_mut(4 * KIB).enumerate() {
        let stamp = (index as u64 + 1).to_le_bytes();
        let n = block.len().min(stamp.len());
        block[..n].copy_from_slice(&stamp[..n]);
    }
    out
}

/// Byte-exact comparison that reports the first difference instead of
/// printing megabytes.
#[track_caller]
pub fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length differs");
    if actual == expected {
        return;
    }
    if let Some(at) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {at}: got {:#04x}, expected {:#04x}", actual[at], expected[at]);
    }
}

// ---------------------------------------------------------------- server

/// `nbd-csi-controller serve-file` as a child process on 127.0.0.1. It is
/// stopped with SIGTERM on drop; its log is printed if the test panicked.
pub struct Server {
    child: Option<Child>,
    port: u16,
    files: u16,
    name: String,
    log: tempfile::NamedTempFile,
}

impl Server {
    /// Serves `vol` under export name `name`; `extra` are further flags
    /// (`--read-only`, `--no-multi-conn`). Returns once the port accepts.
    pub fn start(vol: &Volume, name: &str, extra: &[&str]) -> Self {
        Self::start_many(&[vol], name, extra)
    }

    /// Serves each of `vols` on its own port (the first's, then the ports
    /// after it) from one process. Returns once every port accepts.
    pub fn start_many(vols: &[&Volume], name: &str, extra: &[&str]) -> Self {
        let files = u16::try_from(vols.len()).expect("a few files");
        let mut last_log = String::new();
        // The ports are free when we look; another process may take one
        // before the server binds, so try a few times.
        for _ in 0..5 {
            let port = free_port();
            let log = tempfile::NamedTempFile::new().expect("log file");
            let stderr = log.reopen().expect("reopen log file");
            let child = Command::new(env!("CARGO_BIN_EXE_nbd-csi-controller"))
                .arg("serve-file")
                .args(vols.iter().map(|vol| &vol.path))
                .args(["--listen", &format!("127.0.0.1:{port}"), "--export-name", name])
                .args(extra)
                .env("NO_COLOR", "1")
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("spawn nbd-csi-controller serve-file");
            let mut server = Self { child: Some(child), port, files, name: name.to_owned(), log };
            if server.wait_ready() {
                return server;
            }
            last_log = server.log();
            server.kill();
        }
        panic!("serve-file did not start; last log:\n{last_log}");
    }

    /// True once a TCP connect succeeds, false if the process exited.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait")) {
                eprintln!("serve-file exited early with {status}");
                return false;
            }
            let ready = (0..self.files)
                .all(|index| TcpStream::connect(("127.0.0.1", self.port + index)).is_ok_and(greet_and_abort));
            if ready {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `nbd://127.0.0.1:PORT/NAME`
    pub fn uri(&self) -> String {
        self.uri_of(0)
    }

    /// The URI of the `index`th file of [`Server::start_many`].
    pub fn uri_of(&self, index: u16) -> String {
        assert!(index < self.files, "file {index} of {}", self.files);
        format!("nbd://127.0.0.1:{}/{}", self.port + index, self.name)
    }

    /// Everything the server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit.
    /// Returns its status and how long it took; None if it did not exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<(ExitStatus, Duration)> {
        let child = self.child.as_mut()?;
        let started = Instant::now();
        // The shell's builtin kill: no extra crate, no procps needed. If
        // the process is already gone, try_wait reports it below.
        let _ = Command::new("/bin/sh")
            .args(["-c", "kill -TERM \"$1\"", "sh", &child.id().to_string()])
            .stdin(Stdio::null())
            .status();
        while started.elapsed() < timeout {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some((status, started.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() && self.terminate(Duration::from_secs(10)).is_none() {
            eprintln!("serve-file ignored SIGTERM for 10 s, killing it");
            self.kill();
        }
        if std::thread::panicking() {
            eprintln!("---- serve-file log (port {}) ----\n{}", self.port, self.log());
        }
    }
}

/// True if an NBD server greets on `stream`; leaves with NBD_OPT_ABORT so
/// the probe does not show up in the server log as a broken connection.
fn greet_and_abort(mut stream: TcpStream) -> bool {
    use wire::*;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut greeting = [0u8; 18];
    if stream.read_exact(&mut greeting).is_err() || greeting[..8] != NBDMAGIC.to_be_bytes() {
        return false;
    }
    let mut msg = u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes().to_vec();
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&OPT_ABORT.to_be_bytes());
    msg.extend_from_slice(&0u32.to_be_bytes());
    let _ = stream.write_all(&msg);
    // The ACK (or just the close) is enough; its content is not our test.
    let _ = stream.read(&mut [0u8; 20]);
    true
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

// ---------------------------------------------------------------- tools

/// An external tool's command, stdin closed; run it with [`run`] and friends.
pub fn tool(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs `cmd` to completion within `timeout`, its stdout and stderr going
/// to files (a chatty tool cannot block on a full pipe). Panics when the
/// program is missing (naming the packages to install) or when it overruns.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    cmd.stdout(File::create(&out_path).expect("stdout file"));
    cmd.stderr(File::create(&err_path).expect("stderr file"));
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
            "`{program}` is not installed; the interop tests need the Debian packages {PACKAGES} \
             (tests/run.sh installs them)"
        ),
        Err(e) => panic!("spawning {cmd:?}: {e}"),
    };
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let status = child.wait().expect("wait");
            let output = collect(status, &out_path, &err_path);
            panic!("{cmd:?} did not finish within {timeout:?}\n{}", describe(&output));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    collect(status, &out_path, &err_path)
}

fn collect(status: ExitStatus, out: &Path, err: &Path) -> Output {
    Output { status, stdout: std::fs::read(out).unwrap_or_default(), stderr: std::fs::read(err).unwrap_or_default() }
}

/// Exit status, stdout and stderr, for failure messages.
pub fn describe(output: &Output) -> String {
    format!(
        "status: {:?} (signal {:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status.code(),
        output.status.signal(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `cmd` and asserts it exits 0; returns its stdout as text.
#[track_caller]
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> String {
    let output = run(cmd, timeout);
    assert!(output.status.success(), "{cmd:?} failed\n{}", describe(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `cmd` and returns its exit code (panics if killed by a signal).
#[track_caller]
pub fn exit_code(cmd: &mut Command, timeout: Duration) -> i32 {
    let output = run(cmd, timeout);
    output.status.code().unwrap_or_else(|| panic!("{cmd:?} was killed\n{}", describe(&output)))
}

/// A Python interpreter that can `import nbd` (python3-libnbd). Debian
/// installs the module for /usr/bin/python3, which a python3 earlier on
/// PATH (pyenv, a venv) does not see, so that one is tried first.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        for candidate in ["/usr/bin/python3", "python3"] {
            let ok = Command::new(candidate)
                .args(["-I", "-c", "import nbd"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return PathBuf::from(candidate);
            }
        }
        panic!(
            "no python3 can `import nbd`: install python3-libnbd (the interop tests need {PACKAGES}; \
             tests/run.sh installs them)"
        )
    })
}

/// `python3 -I -c SCRIPT ARGS...` (isolated: the working directory, which
/// may hold this repository's `nbd/` crate, is not on sys.path).
pub fn python_script<I, S>(script: &str, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = tool(python().to_str().expect("utf-8 path"));
    cmd.args(["-I", "-c", script]).args(args);
    cmd
}

/// `nbdsh`, with the Python that has the nbd module first on PATH (nbdsh
/// runs `python3 -mnbd` from PATH).
pub fn nbdsh(cwd: &Path) -> Command {
    let mut cmd = tool("nbdsh");
    if let Some(dir) = python().parent().filter(|d| !d.as_os_str().is_empty()) {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![dir.to_path_buf()];
        dirs.extend(std::env::split_paths(&path));
        cmd.env("PATH", std::env::join_paths(dirs).expect("PATH"));
    }
    cmd.current_dir(cwd);
    cmd
}

// ---------------------------------------------------------------- raw NBD

/// Wire constants, written out here from the NBD spec (not taken from the
/// crate under test).
pub mod wire {
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
    pub const FLAG_NO_ZEROES: u16 = 2;
    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_FLAG_FUA: u16 = 1;
    pub const EPERM: u32 = 1;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
}

/// A 28-byte request header.
pub fn encode_request(magic: u32, flags: u16, command: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut msg = Vec::with_capacity(28);
    msg.extend_from_slice(&magic.to_be_bytes());
    msg.extend_from_slice(&flags.to_be_bytes());
    msg.extend_from_slice(&command.to_be_bytes());
    msg.extend_from_slice(&cookie.to_be_bytes());
    msg.extend_from_slice(&offset.to_be_bytes());
    msg.extend_from_slice(&length.to_be_bytes());
    msg
}

/// A blocking NBD client written by hand from the spec: fixed newstyle,
/// NBD_OPT_EXPORT_NAME, simple replies only.
pub struct RawConn {
    stream: TcpStream,
    pub size: u64,
    pub transmission_flags: u16,
}

impl RawConn {
    pub fn connect(server: &Server) -> Self {
        use wire::*;
        let mut stream = TcpStream::connect(("127.0.0.1", server.port())).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(20))).expect("read timeout");
        stream.set_nodelay(true).expect("nodelay");
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).expect("greeting");
        assert_eq!(u64::from_be_bytes(greeting[0..8].try_into().unwrap()), NBDMAGIC);
        assert_eq!(u64::from_be_bytes(greeting[8..16].try_into().unwrap()), IHAVEOPT);
        let handshake_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        assert_ne!(handshake_flags & FLAG_FIXED_NEWSTYLE, 0, "fixed newstyle");
        let no_zeroes = handshake_flags & FLAG_NO_ZEROES != 0;
        let client_flags = u32::from(handshake_flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        let mut msg = client_flags.to_be_bytes().to_vec();
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        msg.extend_from_slice(&(server.name().len() as u32).to_be_bytes());
        msg.extend_from_slice(server.name().as_bytes());
        stream.write_all(&msg).expect("send EXPORT_NAME");
        let mut reply = [0u8; 10];
        stream.read_exact(&mut reply).expect("export reply");
        if !no_zeroes {
            stream.read_exact(&mut [0u8; 124]).expect("zero padding");
        }
        Self {
            stream,
            size: u64::from_be_bytes(reply[0..8].try_into().unwrap()),
            transmission_flags: u16::from_be_bytes([reply[8], reply[9]]),
        }
    }

    /// Sends one request header with `magic`, then `payload`.
    #[allow(clippy::too_many_arguments)]
    pub fn send(
        &mut self,
        magic: u32,
        flags: u16,
        command: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut msg = encode_request(magic, flags, command, cookie, offset, length);
        msg.extend_from_slice(payload);
        self.stream.write_all(&msg).expect("send request");
    }

    pub fn request(&mut self, flags: u16, command: u16, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
        self.send(wire::REQUEST_MAGIC, flags, command, cookie, offset, length, payload);
    }

    /// Reads one simple reply header: (error, cookie).
    pub fn reply(&mut self) -> (u32, u64) {
        let mut header = [0u8; 16];
        self.stream.read_exact(&mut header).expect("reply header");
        let magic = u32::from_be_bytes(header[0..4].try_into().unwrap());
        assert_eq!(magic, wire::SIMPLE_REPLY_MAGIC, "simple reply magic");
        let error = u32::from_be_bytes(header[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(header[8..16].try_into().unwrap());
        (error, cookie)
    }

    /// READ: the data, or the NBD error number.
    pub fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>, u32> {
        self.request(0, wire::CMD_READ, 0x5245_4144, offset, length, &[]);
        let (error, cookie) = self.reply();
        assert_eq!(cookie, 0x5245_4144, "cookie echoed");
        if error != 0 {
            return Err(error);
        }
        let mut data = vec![0u8; length as usize];
        self.stream.read_exact(&mut data).expect("read data");
        Ok(data)
    }

    /// WRITE with `flags`: the NBD error number, 0 on success.
    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.request(flags, wire::CMD_WRITE, 0x5752_4954, offset, data.len() as u32, data);
        let (error, cookie) = self.reply();
        assert_eq!(cookie, 0x5752_4954, "cookie echoed");
        error
    }

    /// Asserts the server closes this connection: a read sees EOF or a
    /// reset (not a timeout, and no further reply).
    #[track_caller]
    pub fn assert_closed(&mut self) {
        self.stream.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
        let mut buf = [0u8; 64];
        match self.stream.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("expected the connection closed, got {n} more bytes: {:02x?}", &buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) => {}
            Err(e) => panic!("expected the connection closed, got {e} ({:?})", e.kind()),
        }
    }

    /// The socket, for a second thread.
    pub fn stream(&self) -> TcpStream {
        self.stream.try_clone().expect("clone socket")
    }

    /// Polite NBD_CMD_DISC.
    pub fn disconnect(mut self) {
        self.request(0, wire::CMD_DISC, 0, 0, 0, &[]);
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

// ---------------------------------------------------------------- parsing

/// Parses a tool's JSON output, skipping anything printed before it.
#[track_caller]
pub fn parse_json(text: &str) -> Value {
    let start = text.find('{').unwrap_or_else(|| panic!("no JSON in\n{text}"));
    serde_json::from_str(&text[start..]).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{text}"))
}

/// `value[key]` as a bool, u64 or str, panicking with the document if it
/// is missing or of another type.
#[track_caller]
pub fn json_bool(value: &Value, key: &str) -> bool {
    value[key].as_bool().unwrap_or_else(|| panic!("{key}: no boolean in\n{value:#}"))
}

#[track_caller]
pub fn json_u64(value: &Value, key: &str) -> u64 {
    value[key].as_u64().unwrap_or_else(|| panic!("{key}: no integer in\n{value:#}"))
}

#[track_caller]
pub fn json_str<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or_else(|| panic!("{key}: no string in\n{value:#}"))
}
