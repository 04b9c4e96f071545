//! NBD over TLS with clients nobody here wrote, over 127.0.0.1: libnbd's
//! nbdinfo and nbdsh (`nbds://` URIs with `tls-certificates=DIR`), qemu-io
//! and qemu-img (`--object tls-creds-x509`), each with certificates made
//! in the test (a CA, a server certificate for 127.0.0.1, node client
//! certificates). They read and write through TLS and the bytes are
//! compared; a plaintext client of a TLS-required export, a client with a
//! certificate from another CA, one for a node the export does not admit,
//! and one that only speaks TLS 1.2 are refused.
//!
//! A missing tool fails the test, naming the package: tests/run.sh
//! installs them (qemu-utils, libnbd-bin, python3-libnbd).

mod common;

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::pki::Pki;
use nbd::server::{Allowed, Export, ExportConfig, Server};
use nbd::tls::{HandshakeFailure, TlsMode};

const NAME: &str = "vol";
const SIZE: u64 = 16 << 20;
const PACKAGES: &str = "qemu-utils, libnbd-bin, python3-libnbd";
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// The export server on 127.0.0.1 in a runtime of its own, so the tests
/// can run the tools as plain blocking processes.
struct Served {
    addr: SocketAddr,
    export: Arc<Export>,
    file: File,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Served {
    fn start(tls: TlsMode) -> Self {
        let file = tempfile::tempfile().unwrap();
        file.set_len(SIZE).unwrap();
        let config = ExportConfig { tls, ..ExportConfig::new(NAME) };
        let export = Export::from_file(file.try_clone().unwrap(), config).unwrap();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = Arc::clone(&export);
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            runtime.block_on(async move {
                let server = Server::bind(served, "127.0.0.1:0".parse().unwrap()).await.unwrap();
                addr_tx.send(server.local_addr().unwrap()).unwrap();
                server
                    .run(async move {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(10)).expect("server listening");
        Self { addr, export, file, stop: Some(stop), thread: Some(thread) }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    /// libnbd's URI for the export over TLS with the certificates in `dir`.
    fn nbds_uri(&self, dir: &Path) -> String {
        format!("nbds://127.0.0.1:{}/{NAME}?tls-certificates={}", self.port(), dir.display())
    }

    /// qemu's image options for the export over the TLS credentials `tls0`.
    fn qemu_image(&self) -> String {
        format!("driver=nbd,host=127.0.0.1,port={},export={NAME},tls-creds=tls0", self.port())
    }

    fn contents(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.file.read_exact_at(&mut buf, offset).unwrap();
        buf
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs `cmd` to completion within the tool timeout (output to files, so
/// a chatty tool never blocks on a pipe). A missing program fails the test.
fn run(cmd: &mut Command) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    cmd.stdin(Stdio::null()).stdout(File::create(&out).unwrap()).stderr(File::create(&err).unwrap());
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!(
                "`{program}` is not installed; these tests need the Debian packages {PACKAGES} (tests/run.sh installs them)"
            )
        }
        Err(e) => panic!("spawning {cmd:?}: {e}"),
    };
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > TOOL_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {TOOL_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output { status, stdout: std::fs::read(out).unwrap(), stderr: std::fs::read(err).unwrap() }
}

fn describe(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[track_caller]
fn run_ok(cmd: &mut Command) -> String {
    let output = run(cmd);
    assert!(output.status.success(), "{cmd:?} failed\n{}", describe(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `cmd`, which must fail saying `why` (on stderr).
#[track_caller]
fn run_refused(cmd: &mut Command, why: &str) -> Output {
    let output = run(cmd);
    assert!(!output.status.success(), "{cmd:?} should have been refused\n{}", describe(&output));
    assert!(String::from_utf8_lossy(&output.stderr).contains(why), "{cmd:?}: not for {why:?}\n{}", describe(&output));
    output
}

/// A Python that can `import nbd` (python3-libnbd): Debian installs the
/// module for /usr/bin/python3, which a python3 earlier on PATH (pyenv, a
/// venv) does not see.
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        for candidate in ["/usr/bin/python3", "python3"] {
            let mut probe = Command::new(candidate);
            probe.args(["-I", "-c", "import nbd"]);
            if probe
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                return PathBuf::from(candidate);
            }
        }
        panic!("no python3 can `import nbd`: install python3-libnbd ({PACKAGES}; tests/run.sh installs them)")
    })
}

/// `nbdsh` (it runs `python3 -m nbd` from PATH) with that Python first on
/// PATH, in `cwd` (not this repository, whose `nbd/` would shadow the module).
fn nbdsh(cwd: &Path) -> Command {
    let mut cmd = Command::new("nbdsh");
    if let Some(dir) = python().parent().filter(|d| !d.as_os_str().is_empty()) {
        let mut dirs = vec![dir.to_path_buf()];
        dirs.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
        cmd.env("PATH", std::env::join_paths(dirs).unwrap());
    }
    cmd.current_dir(cwd);
    cmd
}

/// nbdsh connected to `uri` running `script` with `h`. libnbd refuses a
/// URI that names local files (`tls-certificates`) unless allowed, which
/// only the API can do, so the script connects itself.
fn nbdsh_on(cwd: &Path, uri: &str, script: &str) -> Command {
    let mut cmd = nbdsh(cwd);
    let connect = format!("h.set_uri_allow_local_file(True)\nh.connect_uri({uri:?})\n{script}");
    cmd.args(["-c", &connect]);
    cmd
}

/// Polls `cond` until it holds, failing the test after 10 s.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// qemu's x509 client credentials from `dir`, as object `tls0`.
fn tls_object(dir: &Path, extra: &str) -> String {
    format!("tls-creds-x509,id=tls0,dir={},endpoint=client{extra}", dir.display())
}

fn qemu_io(served: &Served, dir: &Path, commands: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["--object", &tls_object(dir, ""), "--image-opts", &served.qemu_image()]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = run_ok(&mut cmd);
    assert!(!out.contains("failed") && !out.contains("Pattern verification"), "qemu-io {commands:?}:\n{out}");
    out
}

#[test]
fn nbdinfo_and_nbdsh_read_and_write_over_tls() {
    let pki = Pki::new("cluster");
    let served = Served::start(TlsMode::Required(pki.server()));
    let dir = pki.client_dir("node-a");
    let uri = served.nbds_uri(&dir);

    let json = run_ok(Command::new("nbdinfo").args(["--json", &uri]));
    assert!(json.contains(&format!("\"export-size\": {SIZE}")), "{json}");
    assert!(json.contains("\"export-name\": \"vol\""), "{json}");
    assert!(run(Command::new("nbdinfo").args(["--can", "multi-conn", &uri])).status.success());

    // nbdsh writes a pattern through TLS and checks libnbd read it back;
    // then the backing file must hold it too.
    let script = "data = bytes((i * 7 + 3) % 251 for i in range(1 << 20))\n\
        h.pwrite(data, 3 << 20)\n\
        h.flush()\n\
        assert h.get_size() == 16 << 20\n\
        assert h.pread(1 << 20, 3 << 20) == data, 'read back differs'\n\
        assert h.pread(4096, 0) == bytes(4096)\n";
    run_ok(&mut nbdsh_on(pki.dir.path(), &uri, script));
    let expected: Vec<u8> = (0..1usize << 20).map(|i| ((i * 7 + 3) % 251) as u8).collect();
    assert!(served.contents(3 << 20, 1 << 20) == expected, "the backing file holds what nbdsh wrote");
    let stats = served.export.stats();
    eventually("no TLS connection is left", || stats.tls_userspace_connections.load(Ordering::Relaxed) == 0);
}

/// Where the kernel has no TLS (this build host: no tls.ko) a TLS
/// connection stays on rustls and says why; where it has, the connection is
/// handed to the kernel and READ data goes out with sendfile(2). Either way
/// libnbd and qemu read exactly what the file holds, in reads below and
/// above the zero-copy threshold, and the counts tell which path served.
#[test]
fn tls_connections_are_served_by_the_kernel_or_fall_back_to_rustls_and_say_so() {
    use nbd::server::kernel_tls::Fallback;
    let pki = Pki::new("cluster");
    let served = Served::start(TlsMode::Required(pki.server()));
    let data: Vec<u8> = (0..8usize << 20).map(|i| ((i * 13 + 5) % 253) as u8).collect();
    served.file.write_all_at(&data, 0).unwrap();
    let dir = pki.client_dir("node-a");
    let uri = served.nbds_uri(&dir);
    let script = "want = bytes((i * 13 + 5) % 253 for i in range(8 << 20))\n\
        for offset, length in [(0, 4096), (12345, 65535), (1 << 20, 65536), (3 << 20, 1 << 20), (0, 4 << 20), (7, 33)]:\n\
        \x20   assert h.pread(length, offset) == want[offset:offset + length], (offset, length)\n";
    for _ in 0..2 {
        run_ok(&mut nbdsh_on(pki.dir.path(), &uri, script));
    }
    qemu_io(&served, &dir, &["read -P 0x05 0 1", "read -v 4194304 16"]);
    let stats = served.export.stats();
    eventually("every TLS connection is closed", || {
        stats.tls_userspace_connections.load(Ordering::Relaxed) == 0
            && stats.tls_kernel_connections.load(Ordering::Relaxed) == 0
    });
    let fallbacks: Vec<u64> = stats.tls_kernel_fallbacks.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let mut want = vec![0; Fallback::ALL.len()];
    if !common::kernel_has_tls() {
        // Three clients, three connections, each refused TCP_ULP "tls".
        want[Fallback::NoKernelTls.index()] = 3;
    }
    assert_eq!(fallbacks, want, "fallbacks by reason ({:?})", Fallback::ALL.map(Fallback::label));
    assert_eq!(stats.tls_handshake_failures_total(), 0);
}

#[test]
fn qemu_io_and_qemu_img_read_and_write_over_tls() {
    let pki = Pki::new("cluster");
    let served = Served::start(TlsMode::Required(pki.server()));
    let dir = pki.client_dir("node-a");
    qemu_io(&served, &dir, &["write -P 0xa5 0 1M", "write -P 0x5a 5M 640k", "write -z 2M 64k"]);
    // qemu-io verifies patterns itself (exit 1 on a mismatch) ...
    qemu_io(&served, &dir, &["read -P 0xa5 0 1M", "read -P 0x5a 5M 640k", "read -P 0 2M 64k"]);
    // ... the file holds them ...
    assert!(served.contents(0, 1 << 20).iter().all(|&b| b == 0xa5));
    assert!(served.contents(5 << 20, 640 << 10).iter().all(|&b| b == 0x5a));
    // ... and qemu-img copies the whole export out over TLS, byte-exact.
    let out = pki.dir.path().join("copy.img");
    run_ok(Command::new("qemu-img").args([
        "convert",
        "--object",
        &tls_object(&dir, ""),
        "--image-opts",
        &served.qemu_image(),
        "-O",
        "raw",
        out.to_str().unwrap(),
    ]));
    let copy = std::fs::read(&out).unwrap();
    assert_eq!(copy.len() as u64, SIZE);
    assert!(copy == served.contents(0, SIZE as usize), "qemu-img's copy of the export differs from the file");
}

#[test]
fn a_plaintext_client_of_a_required_export_learns_nothing() {
    let pki = Pki::new("cluster");
    let served = Served::start(TlsMode::Required(pki.server()));
    let plain = format!("nbd://127.0.0.1:{}/{NAME}", served.port());
    let output = run_refused(Command::new("nbdinfo").args(["--json", &plain]), "opt_go");
    let all = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(!all.contains(&SIZE.to_string()) && !all.contains("export-size"), "the size leaked:\n{all}");
    // qemu without TLS credentials too; it names the refusal.
    let image = format!("driver=nbd,host=127.0.0.1,port={},export={NAME}", served.port());
    run_refused(Command::new("qemu-io").args(["--image-opts", &image, "-c", "read 0 4k"]), "TLS negotiation required");
}

#[test]
fn a_certificate_from_another_ca_is_refused() {
    let pki = Pki::new("cluster");
    let stranger = Pki::new("elsewhere");
    let served = Served::start(TlsMode::Required(pki.server()));
    // The stranger's client certificate, with our CA to trust the server.
    let dir = stranger.client_dir("node-a");
    std::fs::copy(pki.ca_path(), dir.join("ca-cert.pem")).unwrap();
    run_refused(Command::new("nbdinfo").arg(served.nbds_uri(&dir)), "TLS fatal alert");
    let stats = served.export.stats();
    let certificate = &stats.tls_handshake_failures[HandshakeFailure::Certificate.index()];
    eventually("the server's refusal is counted", || certificate.load(Ordering::Relaxed) == 1);
    assert_eq!(stats.tls_handshake_failures_total(), 1, "as a certificate refusal");
    // qemu checks its own credentials first and will not even present a
    // certificate its CA did not sign: refused before our server sees it.
    run_refused(
        Command::new("qemu-io").args([
            "--object",
            &tls_object(&dir, ""),
            "--image-opts",
            &served.qemu_image(),
            "-c",
            "read 0 4k",
        ]),
        "failed validation",
    );
}

#[test]
fn a_node_the_export_does_not_admit_is_refused() {
    let pki = Pki::new("cluster");
    let served = Served::start(TlsMode::Required(pki.server()));
    drop(served.export.access().set_allowed(Allowed::Nodes(["node-a".to_owned()].into())));
    let output = run_refused(Command::new("nbdinfo").arg(served.nbds_uri(&pki.client_dir("node-b"))), "opt_go");
    assert!(!String::from_utf8_lossy(&output.stdout).contains(&SIZE.to_string()));
    run_ok(Command::new("nbdinfo").arg(served.nbds_uri(&pki.client_dir("node-a"))));
}

#[test]
fn a_client_that_only_speaks_tls_1_2_is_refused() {
    let pki = Pki::new("cluster");
    let served = Served::start(TlsMode::Required(pki.server()));
    let dir = pki.client_dir("node-a");
    let tls12 = tls_object(&dir, ",priority=NORMAL:-VERS-ALL:+VERS-TLS1.2");
    let args = ["--object", &tls12, "--image-opts", &served.qemu_image(), "-c", "read 0 4k"];
    run_refused(Command::new("qemu-io").args(args), "TLS handshake failed");
    // The same credentials with qemu's default priorities (TLS 1.3) work.
    qemu_io(&served, &dir, &["read 0 4k"]);
}

#[test]
fn an_export_that_allows_tls_serves_both_kinds_of_client() {
    let pki = Pki::new("cluster");
    let served = Served::start(TlsMode::Allowed(pki.server()));
    let plain = format!("nbd://127.0.0.1:{}/{NAME}", served.port());
    run_ok(&mut nbdsh_on(pki.dir.path(), &plain, "h.pwrite(b'plain' * 100, 0)"));
    let dir = pki.client_dir("node-a");
    let script = "assert h.pread(500, 0) == b'plain' * 100\nassert h.get_tls_negotiated()\n";
    run_ok(&mut nbdsh_on(pki.dir.path(), &served.nbds_uri(&dir), script));
}
