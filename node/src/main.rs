//! `nbd-csi-node`: the node plugin. `serve` is the CSI plugin the chart runs;
//! `probe` (handshake and the connection-count rule), `attach`/`detach`/
//! `status` (the attach code) and `watch` are for debugging and the
//! real-kernel test bed. With `NBD_CSI_VALIDATE_ARGS=1` it only checks its
//! arguments and prints what `serve` would use.

mod attach;
mod blocking;
mod connections;
mod csi;
mod error;
mod events;
mod fsutil;
mod heal;
mod health;
mod io_stat;
mod metrics;
#[cfg(test)]
mod proptests;
mod state;
mod sys;
mod uri;
mod volumes;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use csi_events::tls_secret::{Holder, SecretNames, TlsSecretSync};

use crate::attach::tls::TlsDir;
use crate::attach::{AttachSpec, Attacher, KernelAttacher};
use crate::connections::{connection_count, default_connections};
use crate::uri::NbdUri;

#[derive(Debug, Parser)]
#[command(version, about = "nbd-csi node plugin")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct AttachArgs {
    /// Connections wanted when the server allows several (default: CPUs, at most 8).
    #[arg(long, env = "NBD_CSI_CONNECTIONS")]
    connections: Option<usize>,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Seconds I/O waits for a reconnect once every connection is dead.
    #[arg(long, default_value_t = 120)]
    dead_conn_timeout: u64,
    /// Use the ioctl interface even where netlink exists (testing the fallback).
    #[arg(long)]
    ioctl: bool,
    /// Connect to servers from this address: the node's own (in a pod, its
    /// status.hostIP), the one the controller admits. Default: chosen by route,
    /// which on a route into a pod network is the bridge's or tunnel's address.
    #[arg(long, env = "NBD_CSI_SOURCE_ADDRESS")]
    source_address: Option<IpAddr>,
    /// The node's certificates for exports that require TLS (nbds://): a
    /// directory with ca.crt (the CA the servers' certificates chain to),
    /// tls.crt and tls.key (this node's certificate, its node name as the
    /// DNS name, and key), as a kubernetes.io/tls Secret plus the CA mount
    /// them, or credentials.pem instead of those two (a pod certificate's
    /// credential bundle: key, then chain). Read again at every attach and
    /// reconnect. Without it an nbds:// volume is refused.
    #[arg(long, env = "NBD_CSI_TLS_DIR")]
    tls_dir: Option<std::path::PathBuf>,
}

impl AttachArgs {
    /// The certificates directory, checked (every file readable) when given.
    fn tls_dir(&self) -> anyhow::Result<Option<TlsDir>> {
        let Some(dir) = &self.tls_dir else { return Ok(None) };
        let dir = TlsDir::new(dir);
        dir.check().map_err(|e| anyhow::anyhow!(e.chain()))?;
        Ok(Some(dir))
    }

    /// The kernel attacher these arguments describe.
    fn attacher(&self) -> anyhow::Result<KernelAttacher> {
        Ok(KernelAttacher::open(self.ioctl)?.with_source_address(self.source_address).with_tls_dir(self.tls_dir()?))
    }

    /// The same, with a `--tls-dir` the node's Secret fills (see
    /// `tls_secret_sync`): its files may not be there yet, and an nbds://
    /// volume staged before they are gets the missing file's error.
    fn attacher_with_synced_tls(&self) -> anyhow::Result<KernelAttacher> {
        let dir = self.tls_dir.as_ref().map(TlsDir::new);
        Ok(KernelAttacher::open(self.ioctl)?.with_source_address(self.source_address).with_tls_dir(dir))
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Handshake with an export and print what attaching it would use:
    /// size, transmission flags and the number of connections.
    Probe {
        /// nbd://HOST:PORT/EXPORT
        uri: String,
        /// Connections wanted when the server allows several.
        #[arg(long, env = "NBD_CSI_CONNECTIONS")]
        connections: Option<usize>,
    },
    /// Attach an export as /dev/nbdX and print the device. With --ioctl the
    /// command stays in the foreground (NBD_DO_IT) until SIGTERM/SIGINT.
    Attach {
        uri: String,
        /// BACKEND_IDENTIFIER (the volume id) the device is found by.
        #[arg(long)]
        backend_id: String,
        /// Record the attachment as a staged block volume in this state
        /// directory, so that `watch` (or the CSI server) heals it.
        #[arg(long)]
        state_dir: Option<std::path::PathBuf>,
        #[command(flatten)]
        args: AttachArgs,
    },
    /// Hand fresh sockets to a device (RECONFIGURE), as healing does.
    Reconnect {
        uri: String,
        #[arg(long)]
        backend_id: String,
        #[command(flatten)]
        args: AttachArgs,
    },
    /// Disconnect the device attached with this backend identifier.
    Detach {
        #[arg(long)]
        backend_id: String,
    },
    /// List NBD devices with a backend identifier.
    Status,
    /// Serve CSI Identity and Node on --endpoint, healing staged volumes.
    Serve(ServeArgs),
    /// Reconcile the state directory, then heal its volumes on LINK_DEAD
    /// and on a periodic check, until SIGTERM.
    Watch {
        #[arg(long, default_value_os_t = default_state_dir(DEFAULT_DRIVER_NAME))]
        state_dir: std::path::PathBuf,
        /// Seconds between checks that every staged volume has its device.
        #[arg(long, default_value_t = 10)]
        check_interval: u64,
        /// The node's certificates for nbds:// volumes (as for `attach`).
        #[arg(long, env = "NBD_CSI_TLS_DIR")]
        tls_dir: Option<std::path::PathBuf>,
    },
}

const DEFAULT_DRIVER_NAME: &str = "nbd.csi.dev";

/// Where a driver's staging state lives by default: on the host, in the
/// kubelet's directory for the plugin, so that it outlives the container.
fn default_state_dir(driver_name: &str) -> std::path::PathBuf {
    std::path::Path::new("/var/lib/kubelet/plugins").join(driver_name).join("state")
}

/// Set to `1`: parse and check the command line and environment exactly as
/// a start would, print what would run, and exit without touching anything.
const VALIDATE_ENV: &str = "NBD_CSI_VALIDATE_ARGS";

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// unix:///path/to/csi.sock (or /path/to/csi.sock); the kubelet dials
    /// the plugin on the node, so there is no TCP endpoint.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    #[arg(long, env = "NODE_NAME")]
    node_id: String,
    #[arg(long, env = "NBD_CSI_DRIVER_NAME", default_value = DEFAULT_DRIVER_NAME)]
    driver_name: String,
    /// Per-volume staging state. It must outlive the plugin (in a pod: a
    /// hostPath), or a restarted plugin forgets every staged volume
    /// [default: /var/lib/kubelet/plugins/<driver-name>/state].
    #[allow(rustdoc::invalid_html_tags)] // `<driver-name>` is --help text, not HTML
    #[arg(long, env = "NBD_CSI_STATE_DIR")]
    state_dir: Option<std::path::PathBuf>,
    /// Volumes staged on this node at once, reported to Kubernetes
    /// (NodeGetInfo) so that the scheduler does not place more; lowered to
    /// the number of /dev/nbdX when the kernel has no NBD netlink interface
    /// (the ioctls cannot add devices).
    #[arg(long, env = "NBD_CSI_MAX_VOLUMES", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    max_volumes: u32,
    /// Seconds between checks that every staged volume has its device.
    #[arg(long, default_value_t = 10)]
    check_interval: u64,
    /// Kubeconfig for recording Events (default: in-cluster config when in a pod).
    #[arg(long, env = "NBD_CSI_KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics of the staged volumes over HTTP here (e.g.
    /// 0.0.0.0:9813); off when unset.
    #[arg(long, env = "NBD_CSI_NODE_METRICS_ADDRESS")]
    metrics_address: Option<std::net::SocketAddr>,
    /// Keep --tls-dir filled from this node's certificate Secret,
    /// <prefix>-node-<node-id> in --tls-secret-namespace, which the
    /// controller (or cert-manager) issues and renews; a renewal is
    /// written there and the next connection uses it.
    #[allow(rustdoc::invalid_html_tags)] // --help text, not HTML
    #[arg(long, env = "NBD_CSI_TLS_SECRET_PREFIX", requires = "tls_dir")]
    tls_secret_prefix: Option<String>,
    /// Namespace of the certificate Secret [default: the pod's, else the kubeconfig's].
    #[arg(long, env = "POD_NAMESPACE")]
    tls_secret_namespace: Option<String>,
    #[command(flatten)]
    attach: AttachArgs,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let command = Cli::parse().command;
    let validate = std::env::var_os(VALIDATE_ENV).is_some_and(|v| v == "1");
    if validate && !matches!(command, Command::Serve(_)) {
        println!("would_run={command:?}");
        return Ok(());
    }
    match command {
        Command::Probe { uri, connections } => runtime.block_on(probe(&uri, connections)),
        Command::Attach { uri, backend_id, state_dir, args } => {
            runtime.block_on(attach_cmd(&uri, backend_id, state_dir.as_deref(), &args))
        }
        Command::Reconnect { uri, backend_id, args } => runtime.block_on(reconnect_cmd(&uri, backend_id, &args)),
        Command::Detach { backend_id } => runtime.block_on(detach_cmd(&backend_id)),
        Command::Serve(args) if validate => print_serve_plan(&args),
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Watch { state_dir, check_interval, tls_dir } => {
            runtime.block_on(watch(state_dir, check_interval, tls_dir))
        }
        Command::Status => runtime.block_on(status_cmd()),
    }
}

fn spec(uri: &str, backend_id: String, args: &AttachArgs) -> anyhow::Result<AttachSpec> {
    Ok(AttachSpec {
        uri: NbdUri::parse(uri)?,
        backend_id,
        connections: args.connections.unwrap_or_else(default_connections),
        timeout: Duration::from_secs(args.timeout),
        dead_conn_timeout: Duration::from_secs(args.dead_conn_timeout),
    })
}

async fn attach_cmd(
    uri: &str,
    backend_id: String,
    state_dir: Option<&std::path::Path>,
    args: &AttachArgs,
) -> anyhow::Result<()> {
    let spec = spec(uri, backend_id, args)?;
    let attacher = args.attacher()?;
    let attached = attacher.attach(&spec).await.map_err(|e| anyhow::anyhow!(e.chain()))?;
    println!("device={}", attached.device().display());
    println!("size={}", attached.size);
    println!("transmission_flags={:#06x}", attached.transmission_flags);
    println!("connections={}", attached.connections);
    println!("netlink={}", attacher.is_netlink());
    if let Some(dir) = state_dir {
        let states = state::StateDir::open(dir)?;
        let state = state::VolumeState {
            volume_id: spec.backend_id.clone(),
            phase: state::Phase::Staged,
            uri: uri.to_owned(),
            connections: spec.connections,
            timeout_secs: args.timeout,
            dead_conn_timeout_secs: args.dead_conn_timeout,
            staging_path: std::path::PathBuf::new(),
            access: state::Access::Block,
            read_only: false,
            index: Some(attached.index),
            backend_id: Some(spec.backend_id.clone()),
        };
        volumes::save(&states, &state).await?;
    }
    if !attacher.is_netlink() {
        csi_proto::shutdown::shutdown_signal()?.await;
        attacher.detach(attached.index).await.map_err(|e| anyhow::anyhow!(e.chain()))?;
    }
    Ok(())
}

async fn detach_cmd(backend_id: &str) -> anyhow::Result<()> {
    let attacher = KernelAttacher::open(false)?;
    match attacher.find(backend_id)? {
        Some(index) => {
            attacher.detach(index).await.map_err(|e| anyhow::anyhow!(e.chain()))?;
            println!("detached=/dev/nbd{index}");
        }
        None => println!("detached=none"),
    }
    Ok(())
}

async fn status_cmd() -> anyhow::Result<()> {
    let attacher = KernelAttacher::open(false)?;
    for (index, backend) in attacher.list()? {
        let connected = attacher.connected(index).await?;
        let queues = attacher.sysfs().hw_queues(index);
        println!("nbd{index} backend={backend} connected={connected} hw_queues={queues}");
    }
    Ok(())
}

async fn reconnect_cmd(uri: &str, backend_id: String, args: &AttachArgs) -> anyhow::Result<()> {
    let spec = spec(uri, backend_id, args)?;
    let attacher = args.attacher()?;
    let index = attacher.find(&spec.backend_id)?.context("no device with that backend identifier")?;
    let n = attacher.reconnect(index, &spec).await.map_err(|e| anyhow::anyhow!(e.chain()))?;
    println!("offered={n}");
    Ok(())
}

async fn watch(
    state_dir: std::path::PathBuf,
    check_interval: u64,
    tls_dir: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let tls_dir = tls_dir.map(TlsDir::new);
    if let Some(dir) = &tls_dir {
        dir.check().map_err(|e| anyhow::anyhow!(e.chain()))?;
    }
    let attacher = std::sync::Arc::new(KernelAttacher::open(false)?.with_tls_dir(tls_dir));
    let listener = attacher.link_dead_listener()?.context("healing needs the netlink interface")?;
    let dead = heal::spawn_link_dead_thread(listener);
    let healer = std::sync::Arc::new(heal::Healer::new(attacher, state::StateDir::open(state_dir)?));
    healer.reconcile().await.map_err(|e| anyhow::anyhow!(e.chain()))?;
    eprintln!("watching");
    let run = tokio::spawn(std::sync::Arc::clone(&healer).run(dead, Duration::from_secs(check_interval)));
    csi_proto::shutdown::shutdown_signal()?.await;
    run.abort();
    Ok(())
}

/// The checks `serve` makes before touching the system; returns the
/// state directory.
fn check_serve_args(args: &ServeArgs) -> anyhow::Result<std::path::PathBuf> {
    check_endpoint(&args.endpoint)?;
    anyhow::ensure!(!args.node_id.is_empty(), "--node-id (NODE_NAME) is empty");
    anyhow::ensure!(!args.driver_name.is_empty(), "--driver-name (NBD_CSI_DRIVER_NAME) is empty");
    anyhow::ensure!(args.attach.connections != Some(0), "--connections must be at least 1");
    let state_dir = args.state_dir.clone().unwrap_or_else(|| default_state_dir(&args.driver_name));
    anyhow::ensure!(state_dir.is_absolute(), "--state-dir {} is not an absolute path", state_dir.display());
    tls_secret_name(args)?;
    Ok(state_dir)
}

/// This node's certificate Secret, when `--tls-secret-prefix` is given:
/// named from `--node-id` alone, so the plugin never asks for another
/// node's.
fn tls_secret_name(args: &ServeArgs) -> anyhow::Result<Option<String>> {
    let Some(prefix) = &args.tls_secret_prefix else { return Ok(None) };
    let names = SecretNames::new(prefix).map_err(|e| anyhow::anyhow!("--tls-secret-prefix: {e}"))?;
    let name = names.of(Holder::Node(&args.node_id)).map_err(|e| anyhow::anyhow!("--node-id: {e}"))?;
    Ok(Some(name))
}

/// Follows this node's certificate Secret into `--tls-dir` (kept running
/// for as long as the handle lives).
async fn tls_secret_sync(args: &ServeArgs) -> anyhow::Result<Option<TlsSecretSync>> {
    let (Some(name), Some(dir)) = (tls_secret_name(args)?, args.attach.tls_dir.clone()) else { return Ok(None) };
    let client = csi_events::client(args.kubeconfig.as_deref())
        .await
        .map_err(|e| anyhow::anyhow!("Kubernetes access for --tls-secret-prefix: {e}"))?
        .context("--tls-secret-prefix reads a Secret: run in a pod or give --kubeconfig")?;
    let namespace = args.tls_secret_namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
    tracing::info!(secret = %format!("{namespace}/{name}"), dir = %dir.display(), "following the node's TLS Secret");
    Ok(Some(TlsSecretSync::spawn(client, &namespace, name, dir)))
}

/// The node plugin serves CSI on a Unix socket only: `unix:///path` or
/// `/path`. A `tcp://` endpoint is refused rather than taken for a file name.
fn check_endpoint(endpoint: &str) -> anyhow::Result<()> {
    let path = match endpoint.strip_prefix("unix://") {
        Some(path) => path,
        None if endpoint.contains("://") => anyhow::bail!(
            "endpoint {endpoint:?}: the node plugin serves CSI only on a Unix socket (unix:///path/csi.sock), \
             which the kubelet dials on the node; a TCP endpoint would open NodeStageVolume and \
             NodePublishVolume to anyone who reaches it"
        ),
        None => endpoint,
    };
    anyhow::ensure!(path.starts_with('/'), "endpoint {endpoint:?} is neither unix:///path nor /path");
    Ok(())
}

/// `NBD_CSI_VALIDATE_ARGS=1 nbd-csi-node serve ...`: what `serve` would use,
/// one `key=value` per line on stdout.
fn print_serve_plan(args: &ServeArgs) -> anyhow::Result<()> {
    let state_dir = check_serve_args(args)?;
    println!("would_run=serve");
    println!("endpoint={}", args.endpoint);
    println!("node_id={}", args.node_id);
    println!("driver_name={}", args.driver_name);
    println!("state_dir={}", state_dir.display());
    let connections = args.attach.connections.map_or_else(|| "default".to_owned(), |n| n.to_string());
    println!("connections={connections}");
    println!("timeout={}", args.attach.timeout);
    println!("dead_conn_timeout={}", args.attach.dead_conn_timeout);
    let source = args.attach.source_address.map_or_else(|| "by route".to_owned(), |a| a.to_string());
    println!("source_address={source}");
    println!("tls_dir={}", args.attach.tls_dir.as_ref().map(|d| d.display().to_string()).unwrap_or_default());
    println!("tls_secret={}", tls_secret_name(args)?.unwrap_or_default());
    println!("max_volumes={}", args.max_volumes);
    println!("check_interval={}", args.check_interval);
    println!("metrics_address={}", args.metrics_address.map(|a| a.to_string()).unwrap_or_default());
    Ok(())
}

/// The volumes this node can stage at once: `asked`, or fewer when the
/// kernel offers only `devices` (the ioctl interface).
fn effective_max_volumes(asked: u32, devices: Option<usize>) -> usize {
    devices.map_or(asked as usize, |devices| devices.min(asked as usize))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let state_dir = check_serve_args(&args)?;
    // Kept for the life of the process: dropping it stops the sync.
    let tls_sync = tls_secret_sync(&args).await?;
    let attacher = match &tls_sync {
        Some(_) => args.attach.attacher_with_synced_tls()?,
        None => args.attach.attacher()?,
    };
    let attacher = std::sync::Arc::new(attacher);
    let states = state::StateDir::open(&state_dir)?;
    let events = events::Events::connect(args.kubeconfig.as_deref(), &args.driver_name, &args.node_id).await;
    let health = std::sync::Arc::new(health::Health::default());
    let healer = heal::Healer::new(std::sync::Arc::clone(&attacher), states.clone())
        .with_node_id(&args.node_id)
        .with_events(events.clone())
        .with_health(std::sync::Arc::clone(&health));
    let healer = std::sync::Arc::new(healer);
    healer.reconcile().await.map_err(|e| anyhow::anyhow!(e.chain()))?;
    if let Some(listener) = attacher.link_dead_listener()? {
        let dead = heal::spawn_link_dead_thread(listener);
        tokio::spawn(std::sync::Arc::clone(&healer).run(dead, Duration::from_secs(args.check_interval)));
    }
    let settings = volumes::Settings {
        node_id: args.node_id.clone(),
        connections: args.attach.connections.unwrap_or_else(default_connections),
        timeout: Duration::from_secs(args.attach.timeout),
        dead_conn_timeout: Duration::from_secs(args.attach.dead_conn_timeout),
    };
    let max_volumes = effective_max_volumes(args.max_volumes, attacher.device_limit());
    if max_volumes < args.max_volumes as usize {
        tracing::warn!(
            max_volumes,
            asked = args.max_volumes,
            "no NBD netlink interface: only as many volumes as /dev/nbdX"
        );
    }
    if let Some(addr) = args.metrics_address {
        let collector =
            metrics::VolumeCollector::new(states.clone(), attacher.sysfs().clone(), Arc::clone(&health), max_volumes);
        let metrics = Arc::new(metrics::Metrics::new(collector));
        let local = metrics::spawn(addr, metrics).await.with_context(|| format!("metrics on {addr}"))?;
        tracing::info!(address = %local, "metrics listening");
    }
    let volumes = volumes::Volumes::new(attacher, states, settings)
        .with_events(events)
        .with_health(health)
        .with_max_volumes(max_volumes);
    let volumes = std::sync::Arc::new(volumes);
    let info = csi::NodeInfo { driver_name: args.driver_name, node_id: args.node_id, max_volumes: max_volumes as i64 };
    let shutdown = csi_proto::shutdown::shutdown_signal()?;
    tracing::info!(endpoint = %args.endpoint, state_dir = %state_dir.display(), "serving CSI Identity and Node");
    csi::serve(volumes, info, &args.endpoint, shutdown).await
}

async fn probe(uri: &str, connections: Option<usize>) -> anyhow::Result<()> {
    let uri = NbdUri::parse(uri)?;
    anyhow::ensure!(!uri.tls, "probe speaks plaintext only; attach an nbds:// export with --tls-dir");
    let mut stream = attach::sockets::connect(&uri, None).await?;
    let opts = nbd::client::HandshakeOptions { export_name: uri.export.clone(), structured_replies: false };
    let export = nbd::client::handshake(&mut stream, &opts).await.with_context(|| format!("handshake with {uri}"))?;
    let count = connection_count(export.transmission_flags, connections.unwrap_or_else(default_connections));
    println!("size={}", export.size);
    println!("transmission_flags={:#06x}", export.transmission_flags);
    println!("can_multi_conn={}", export.can_multi_conn());
    println!("read_only={}", export.read_only());
    if let Some((min, preferred, max)) = export.block_size {
        println!("block_size={min}/{preferred}/{max}");
    }
    println!("connections={count}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_volume_limit_is_what_the_kernel_can_give() {
        assert_eq!(effective_max_volumes(64, None), 64, "netlink adds devices as needed");
        assert_eq!(effective_max_volumes(64, Some(16)), 16, "the ioctls only have nbds_max devices");
        assert_eq!(effective_max_volumes(8, Some(16)), 8);
    }
}
