//! `nbd-csi-node probe` against real servers: ours in-process, and nbdkit
//! with its multi-conn filter, to check the connection-count rule end to end.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use nbd::server::{Export, ExportConfig, Server};

fn probe(uri: &str, connections: usize) -> String {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_nbd-csi-node"))
        .args(["probe", uri, "--connections", &connections.to_string()])
        .output()
        .expect("run nbd-csi-node");
    assert!(out.status.success(), "probe failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key} in {out}"))
}

/// Serves a 1 MiB file with our server on a thread of its own.
fn our_server(multi_conn: bool) -> (SocketAddr, tempfile::NamedTempFile) {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(1 << 20).unwrap();
    let mut config = ExportConfig::new("vol");
    config.multi_conn = multi_conn;
    let export = Export::open(file.path(), config).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let server = Server::bind(export, "127.0.0.1:0".parse().unwrap()).await.unwrap();
            tx.send(server.local_addr().unwrap()).unwrap();
            server.run(std::future::pending()).await.unwrap();
        });
    });
    (rx.recv().unwrap(), file)
}

#[test]
fn our_server_with_multi_conn_gets_several_connections() {
    let (addr, _file) = our_server(true);
    let out = probe(&format!("nbd://{addr}/vol"), 4);
    assert_eq!(field(&out, "can_multi_conn"), "true");
    assert_eq!(field(&out, "connections"), "4");
    assert_eq!(field(&out, "size"), "1048576");
    assert_eq!(field(&out, "block_size"), "1/4096/33554432");
}

#[test]
fn our_server_without_multi_conn_gets_one() {
    let (addr, _file) = our_server(false);
    let out = probe(&format!("nbd://{addr}/vol"), 4);
    assert_eq!(field(&out, "can_multi_conn"), "false");
    assert_eq!(field(&out, "connections"), "1");
    // SEND_CACHE (bit 10) is still advertised: it must not count.
    let flags = u16::from_str_radix(field(&out, "transmission_flags").trim_start_matches("0x"), 16).unwrap();
    assert_ne!(flags & (1 << 10), 0);
}

/// One nbdkit at a time: two tests picking a free port at once can be given
/// the same one, and the loser's probe would reach the winner's nbdkit.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Nbdkit {
    child: Child,
    /// Released after the child is gone (fields drop after `drop`).
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn nbdkit(extra: &[&str]) -> (Nbdkit, u16) {
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let port = free_port();
    let mut child = Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "-i", "127.0.0.1", "-p", &port.to_string()])
        .args(extra)
        .spawn()
        .expect("nbdkit must be installed (tests/run.sh installs it)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nbdkit did not start");
        assert!(child.try_wait().unwrap().is_none(), "nbdkit exited (port {port} taken?)");
        std::thread::sleep(Duration::from_millis(50));
    }
    (Nbdkit { child, _one_at_a_time: guard }, port)
}

#[test]
fn nbdkit_with_multi_conn_disabled_gets_one() {
    let (_kit, port) = nbdkit(&["--filter=multi-conn", "memory", "1M", "multi-conn-mode=disable"]);
    let out = probe(&format!("nbd://127.0.0.1:{port}/"), 4);
    assert_eq!(field(&out, "can_multi_conn"), "false");
    assert_eq!(field(&out, "connections"), "1");
}

#[test]
fn nbdkit_with_multi_conn_enabled_gets_several() {
    let (_kit, port) = nbdkit(&["--filter=multi-conn", "memory", "1M", "multi-conn-mode=plugin"]);
    let out = probe(&format!("nbd://127.0.0.1:{port}/"), 3);
    assert_eq!(field(&out, "can_multi_conn"), "true");
    assert_eq!(field(&out, "connections"), "3");
}
