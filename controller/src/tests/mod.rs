//! In-process tests: the real gRPC services on a Unix socket in a temp dir,
//! driven by the generated tonic clients, and the volumes' NBD servers
//! driven over loopback TCP.

mod cluster;
mod full_disk;
mod grpc_snapshots;
mod grpc_volumes;
mod missing_image;
mod pki;
mod tls;

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
        Self::start_with_ports(dir, Self::ports()).await
    }

    pub async fn start_with_ports(dir: &Path, ports: std::ops::RangeInclusive<u16>) -> Self {
        Self::start_with_args(Self::args(dir, ports)).await
    }

    /// The flags of a controller with its socket and data in `dir` and
    /// its NBD servers on `ports`, for a test to change.
    pub fn args(dir: &Path, ports: std::ops::RangeInclusive<u16>) -> service::Args {
        service::Args {
            endpoint: Some(Endpoint::Unix(dir.join("csi.sock"))),
            allow_insecure_tcp_endpoint: false,
            data_dir: dir.join("data"),
            driver_name: service::DEFAULT_DRIVER_NAME.into(),
            advertise_address: None,
            nbd_listen_address: "127.0.0.1".parse().unwrap(),
            nbd_port_range: ports,
            nbd_max_connections: nbd::server::DEFAULT_MAX_CONNECTIONS as u32,
            nbd_max_connections_per_peer: nbd::server::DEFAULT_MAX_CONNECTIONS_PER_PEER as u32,
            default_tls: Default::default(),
            tls_dir: None,
            metrics_address: None,
            kubeconfig: None,
            known_nodes: vec![NODE_A.into(), NODE_B.into()],
            storage_mode: service::StorageMode::Embedded,
            export_key_secret: None,
            namespace: None,
            storage_timeout: 30,
            tls: Default::default(),
        }
    }

    /// Fresh ports for one more harness.
    pub fn ports() -> std::ops::RangeInclusive<u16> {
        let first = NEXT_PORT.fetch_add(32, Ordering::Relaxed);
        first..=first + 31
    }

    /// The controller as `args` say, serving CSI on their Unix endpoint.
    pub async fn start_with_args(args: service::Args) -> Self {
        let Some(Endpoint::Unix(socket)) = args.endpoint.clone() else { panic!("tests serve on a Unix socket") };
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
