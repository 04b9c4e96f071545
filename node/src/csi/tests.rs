//! The real CSI server on a Unix socket, on a runtime with one worker: a
//! netlink request that does not come back (a stand-in for the kernel that
//! blocks until released) must not stop Probe and NodeGetCapabilities from
//! answering. Had the request run on the worker, the worker would be stuck
//! in it and nothing else would be served.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use csi_proto::contract::{NbdUri, PublishContext};
use csi_proto::identity_client::IdentityClient;
use csi_proto::node_client::NodeClient;
use csi_proto::volume_capability::access_mode::Mode;
use csi_proto::volume_capability::{AccessMode, AccessType, BlockVolume};
use csi_proto::*;
use nbd::server::{Export, ExportConfig, Server};

use super::NodeInfo;
use crate::attach::devices::Sysfs;
use crate::attach::{KernelAttacher, NbdControl};
use crate::error::{Error, ErrorKind, Result};
use crate::state::StateDir;
use crate::sys::nbd::LinkDeadListener;
use crate::sys::nbd_genl::ConnectParams;
use crate::volumes::{Settings, Volumes};

/// How long Probe and NodeGetCapabilities may take while CONNECT hangs.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);
/// Upper bound on anything the test waits for.
const BOUND: Duration = Duration::from_secs(20);

/// A kernel whose CONNECT blocks until the test releases it (or `BOUND`
/// passes), as a netlink request does until its timeout.
#[derive(Debug)]
struct StuckConnect {
    entered: Mutex<mpsc::Sender<()>>,
    release: Mutex<mpsc::Receiver<()>>,
}

impl NbdControl for StuckConnect {
    fn connect(&self, params: &ConnectParams<'_>) -> Result<u32> {
        assert_eq!(params.sockets.len(), 1, "the handshake is done and the socket open before CONNECT");
        let _ = self.entered.lock().unwrap().send(());
        match self.release.lock().unwrap().recv_timeout(BOUND) {
            Ok(()) => Ok(0),
            Err(_) => Err(Error::new(ErrorKind::Kernel, "nbd CONNECT: test double never released")),
        }
    }
    fn reconfigure(&self, _: u32, _: &str, _: &[BorrowedFd<'_>], _: Option<u64>) -> Result<()> {
        Err(Error::new(ErrorKind::Kernel, "not used"))
    }
    fn disconnect(&self, _: u32) -> Result<()> {
        Ok(())
    }
    fn status(&self, _: Option<u32>) -> Result<Vec<(u32, bool)>> {
        Ok(Vec::new())
    }
    fn link_dead_listener(&self) -> Result<LinkDeadListener> {
        Err(Error::new(ErrorKind::Kernel, "not used"))
    }
}

/// Our NBD server for a 1 MiB file, on a thread and runtime of its own.
fn nbd_server(file: &Path) -> SocketAddr {
    let export = Export::open(file, ExportConfig::new("vol")).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let server = Server::bind(export, "127.0.0.1:0".parse().unwrap()).await.unwrap();
            tx.send(server.local_addr().unwrap()).unwrap();
            server.run(std::future::pending()).await.unwrap();
        });
    });
    rx.recv_timeout(BOUND).unwrap()
}

fn stage_request(addr: SocketAddr, staging: &Path) -> NodeStageVolumeRequest {
    let context = PublishContext { nbd_uri: NbdUri::new(addr, "vol"), read_only: false };
    NodeStageVolumeRequest {
        volume_id: "vol-0123456789abcdef0123456789abcdef".into(),
        staging_target_path: staging.to_string_lossy().into_owned(),
        volume_capability: Some(VolumeCapability {
            access_type: Some(AccessType::Block(BlockVolume {})),
            access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        }),
        publish_context: context.to_map().into_iter().collect::<HashMap<_, _>>(),
        ..Default::default()
    }
}

/// The node plugin's CSI server on a runtime with one worker, attaching
/// through [`StuckConnect`], and our NBD server to attach.
struct Harness {
    tmp: tempfile::TempDir,
    addr: SocketAddr,
    socket: std::path::PathBuf,
    entered: mpsc::Receiver<()>,
    release: mpsc::Sender<()>,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<anyhow::Result<()>>,
    server_rt: tokio::runtime::Runtime,
}

impl Harness {
    fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("image");
        std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
        let addr = nbd_server(&image);

        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let control = StuckConnect { entered: Mutex::new(entered_tx), release: Mutex::new(release_rx) };
        std::fs::create_dir(tmp.path().join("sys")).unwrap();
        let attacher = KernelAttacher::with_control(Arc::new(control), Sysfs::at(tmp.path().join("sys")));
        let settings = Settings {
            node_id: "node-a".into(),
            connections: 1,
            timeout: Duration::from_secs(30),
            dead_conn_timeout: Duration::from_secs(120),
        };
        let volumes = Volumes::new(Arc::new(attacher), StateDir::open(tmp.path().join("state")).unwrap(), settings);
        let info = NodeInfo { driver_name: "nbd.csi.dev".into(), node_id: "worker-1".into(), max_volumes: 4 };

        // One worker, so one blocked worker would starve everything.
        let server_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let socket = tmp.path().join("csi.sock");
        let endpoint = format!("unix://{}", socket.display());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = server_rt.spawn(async move {
            super::serve(Arc::new(volumes), info, &endpoint, async move { drop(stopped.await) }).await
        });
        Self { tmp, addr, socket, entered, release, stop, serving, server_rt }
    }

    /// A channel to the CSI socket, once it is there.
    async fn channel(&self) -> tonic::transport::Channel {
        let start = Instant::now();
        while !self.socket.exists() && start.elapsed() < BOUND {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let endpoint = format!("unix://{}", self.socket.display());
        tonic::transport::Endpoint::from_shared(endpoint).unwrap().connect().await.unwrap()
    }

    /// Waits (bounded) until the stage request is stuck in CONNECT.
    async fn wait_for_connect<T: std::fmt::Debug>(&self, stage: &tokio::task::JoinHandle<T>) {
        let start = Instant::now();
        while self.entered.try_recv().is_err() {
            assert!(start.elapsed() < BOUND, "NodeStageVolume never reached CONNECT");
            assert!(!stage.is_finished(), "NodeStageVolume ended before CONNECT");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the server (the clients must be gone) and waits for it.
    fn stop(self) -> tempfile::TempDir {
        let _ = self.stop.send(());
        let served = self.server_rt.block_on(async { tokio::time::timeout(BOUND, self.serving).await });
        self.server_rt.shutdown_timeout(BOUND);
        served.unwrap().unwrap().unwrap();
        self.tmp
    }
}

#[test]
fn a_stuck_netlink_request_does_not_stop_probe_or_capabilities() {
    let harness = Harness::start();
    // The client: a runtime of its own, whose timers run whatever the
    // server's worker does.
    let client_rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (probe, capabilities, stage) = client_rt.block_on(async {
        let channel = harness.channel().await;
        let mut node = NodeClient::new(channel.clone());
        let mut identity = IdentityClient::new(channel);
        let stage = tokio::spawn({
            let mut node = node.clone();
            let request = stage_request(harness.addr, &harness.tmp.path().join("staging"));
            async move { node.node_stage_volume(request).await }
        });
        harness.wait_for_connect(&stage).await;
        // CONNECT is now stuck in the kernel stand-in.
        let start = Instant::now();
        let probe = tokio::time::timeout(ANSWER_WITHIN, identity.probe(ProbeRequest {})).await;
        let probe = probe.map(|r| (r.map(|r| r.into_inner().ready), start.elapsed()));
        let start = Instant::now();
        let capabilities =
            tokio::time::timeout(ANSWER_WITHIN, node.node_get_capabilities(NodeGetCapabilitiesRequest {})).await;
        let capabilities = capabilities.map(|r| (r.map(|r| r.into_inner().capabilities.len()), start.elapsed()));
        harness.release.send(()).unwrap();
        let stage = tokio::time::timeout(BOUND, stage).await;
        (probe, capabilities, stage)
    });
    // The client's connection goes with its runtime; then the server stops.
    drop(client_rt);
    harness.stop();

    let (ready, took) = probe.expect("Probe did not answer while CONNECT was stuck");
    assert_eq!(ready.unwrap(), Some(true));
    eprintln!("Probe answered in {took:?} while CONNECT was stuck");
    let (count, took) = capabilities.expect("NodeGetCapabilities did not answer while CONNECT was stuck");
    assert_eq!(count.unwrap(), 5);
    eprintln!("NodeGetCapabilities answered in {took:?} while CONNECT was stuck");
    // Released, the stage completes on the device the stand-in "picked".
    stage.expect("NodeStageVolume did not finish once released").unwrap().unwrap();
}

/// A kubelet that gives up on NodeStageVolume (its deadline, a restart)
/// while CONNECT is in flight must not leave the volume half staged: the
/// request runs to its end, and the state says Staged.
#[test]
fn a_stage_whose_caller_goes_away_still_completes() {
    let harness = Harness::start();
    let client_rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    client_rt.block_on(async {
        let mut node = NodeClient::new(harness.channel().await);
        let request = stage_request(harness.addr, &harness.tmp.path().join("staging"));
        let volume_id = request.volume_id.clone();
        let stage = tokio::spawn(async move { node.node_stage_volume(request).await });
        harness.wait_for_connect(&stage).await;
        stage.abort();
        let _ = stage.await;
        // Time for the reset to reach the server before CONNECT returns
        // (were it late, the stage would finish as usual: the run would
        // prove less, but could not fail for it).
        tokio::time::sleep(Duration::from_millis(200)).await;
        harness.release.send(()).unwrap();
        let states = StateDir::open(harness.tmp.path().join("state")).unwrap();
        let start = Instant::now();
        loop {
            let phase = states.load(&volume_id).unwrap().map(|s| s.phase);
            if phase == Some(crate::state::Phase::Staged) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "the abandoned stage stopped at {phase:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    drop(client_rt);
    harness.stop();
}
