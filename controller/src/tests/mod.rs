//! In-process tests: the real gRPC services on a Unix socket in a temp dir,
//! driven by the generated tonic clients, and the volumes' NBD servers
//! driven over loopback TCP.

mod full_disk;
mod grpc_snapshots;
mod grpc_volumes;
mod missing_image;
mod nbd_client;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use csi_proto::contract::PublishContext;
use csi_proto::controller_client::ControllerClient;
use csi_proto::identity_client::IdentityClient;
use csi_proto::volume_capability::access_mode::Mode;
use csi_proto::*;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::cli;
use crate::driver::Driver;
use crate::service::{self, Endpoint};

pub const NODE_A: &str = "node-a";
pub const NODE_B: &str = "node-b";
/// Generous: a test that hangs fails here instead of blocking the run.
const RPC_TIMEOUT: Duration = Duration::from_secs(120);

/// Each harness gets its own ports so parallel tests do not collide.
static NEXT_PORT: AtomicU16 = AtomicU16::new(27100);

pub struct Harness {
    pub driver: Arc<Driver>,
    pub data_dir: PathBuf,
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Harness {
    pub async fn start(dir: &Path) -> Self {
        let first = NEXT_PORT.fetch_add(32, Ordering::Relaxed);
        Self::start_with_ports(dir, first..=first + 31).await
    }

    pub async fn start_with_ports(dir: &Path, ports: std::ops::RangeInclusive<u16>) -> Self {
        let socket = dir.join("csi.sock");
        let args = service::Args {
            endpoint: Some(Endpoint::Unix(socket.clone())),
            allow_insecure_tcp_endpoint: false,
            data_dir: dir.join("data"),
            driver_name: service::DEFAULT_DRIVER_NAME.into(),
            advertise_address: None,
            nbd_listen_address: "127.0.0.1".parse().unwrap(),
            nbd_port_range: ports.clone(),
            nbd_max_connections: nbd::server::DEFAULT_MAX_CONNECTIONS as u32,
            nbd_max_connections_per_peer: nbd::server::DEFAULT_MAX_CONNECTIONS_PER_PEER as u32,
            metrics_address: None,
            kubeconfig: None,
            known_nodes: vec![NODE_A.into(), NODE_B.into()],
        };
        let driver = service::build(&args).await.expect("driver starts");
        let (stop, stopped) = oneshot::channel::<()>();
        let endpoint = args.endpoint.clone().unwrap();
        let task = tokio::spawn(service::serve(Arc::clone(&driver), endpoint, async move {
            let _ = stopped.await;
        }));
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Self { driver, data_dir: args.data_dir, socket, stop: Some(stop), task: Some(task) }
    }

    pub async fn channel(&self) -> Channel {
        cli::connect(&Endpoint::Unix(self.socket.clone()), RPC_TIMEOUT).await.expect("connect to the CSI socket")
    }

    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await)
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel().await)
    }

    /// Stops the gRPC server and every volume server, as SIGTERM does.
    pub async fn stop(mut self) {
        drop(self.stop.take());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

pub fn cap(block: bool, mode: Mode) -> VolumeCapability {
    cli::capability(block, "ext4", mode)
}

pub fn create_req(name: &str, bytes: i64, block: bool, mode: Mode) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        volume_capabilities: vec![cap(block, mode)],
        ..Default::default()
    }
}

pub fn publish_req(
    volume_id: &str,
    node: &str,
    block: bool,
    mode: Mode,
    readonly: bool,
) -> ControllerPublishVolumeRequest {
    ControllerPublishVolumeRequest {
        volume_id: volume_id.into(),
        node_id: node.into(),
        volume_capability: Some(cap(block, mode)),
        readonly,
        ..Default::default()
    }
}

/// A ControllerPublishVolume answer read as the node plugin reads it.
pub fn published(context: &HashMap<String, String>) -> PublishContext {
    PublishContext::try_from(context).unwrap_or_else(|e| panic!("a publish_context the node refuses: {e}"))
}

/// `(host:port, export name)` a node connects to for a publish_context.
pub fn export_of(context: &HashMap<String, String>) -> (String, String) {
    let uri = published(context).nbd_uri;
    (uri.authority(), uri.export)
}

pub fn code<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> tonic::Code {
    match result {
        Ok(r) => panic!("expected an error, got {r:?}"),
        Err(status) => status.code(),
    }
}

/// A tmpfs of `bytes` mounted on a fresh temp dir (the tests run as root),
/// for tests that need a filesystem they can fill; unmounted on drop. A
/// mount that fails fails the test: it is never skipped.
pub struct Tmpfs {
    dir: Option<tempfile::TempDir>,
}

impl Tmpfs {
    pub fn mount(bytes: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes},mode=0755"), "nbd-csi-test"])
            .arg(dir.path())
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mounting a {bytes}-byte tmpfs on {} failed (this test needs root): {}",
            dir.path().display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let dir = self.dir.take().unwrap();
        let unmounted = std::process::Command::new("umount").arg(dir.path()).status().is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a test that failed half-way): detach it anyway.
            let _ = std::process::Command::new("umount").arg("-l").arg(dir.path()).status();
        }
    }
}

/// Writes `path` until the filesystem is full (ENOSPC), 64 KiB and then
/// 4 KiB at a time, at most `limit` bytes; returns the bytes written.
pub fn fill(path: &Path, limit: u64) -> u64 {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let mut written = 0u64;
    for chunk in [64usize << 10, 4 << 10] {
        let buf = vec![0x5au8; chunk];
        while written < limit {
            match file.write(&buf) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    assert!(written < limit, "{} did not fill up within {limit} bytes", path.display());
    written
}

/// Every `*.tmp` file left under `dir`, at any depth.
pub fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(temp_files(&path));
        } else if path.extension().is_some_and(|e| e == "tmp") {
            found.push(path);
        }
    }
    found
}
