//! `nbd-csi-controller agent`: the storage role as a process, one per
//! storage node. It opens an [`Agent`] on `--data-dir`, serves every volume
//! from `--listen-address`, and drives it from the NbdVolume and NbdSnapshot
//! objects of its node through a [`Reconciler`], which also writes the
//! node's NbdStorageNode and renews its Lease. It needs Kubernetes (a
//! kubeconfig or the in-cluster config) and the cluster's export-name key:
//! no object carries an export name, so the agent derives each one.
//!
//! SIGTERM or SIGINT stops the watches first, so nothing changes a volume
//! during shutdown, then every volume's server (flushing its file). A
//! restarted agent serves each volume again on the port its record keeps.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;

use agent::resources::{ExportKey, NodeDirectory, Reconciler, is_node_name};
use agent::{Agent, ConnectionCaps};
use anyhow::{Context, anyhow, bail};
use csi_events::tls_secret::{Holder, SecretNames, TlsSecretSync};

use crate::agent_events::AgentEvents;
use crate::metrics::Metrics;
use crate::service::parse_port_range;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// This storage node's name: the name of its Node, and of the
    /// NbdStorageNode and Lease the agent writes.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Directory holding this node's volume and snapshot images and their
    /// records (a hostPath or a local disk).
    #[arg(long, env = "NBD_CSI_AGENT_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Address the NBD servers bind and nodes dial (written into the
    /// NbdStorageNode); in a pod on the host network, the node's IP.
    #[arg(long, env = "NBD_CSI_AGENT_ADDRESS")]
    pub listen_address: IpAddr,
    /// Ports for this node's NBD servers, FIRST-LAST: one per attached volume.
    #[arg(long, env = "NBD_CSI_AGENT_PORT_RANGE", default_value = "10900-10999", value_parser = parse_port_range)]
    pub nbd_port_range: RangeInclusive<u16>,
    /// Connections one volume's NBD server holds at once, from all nodes;
    /// more are closed right after accept.
    #[arg(long, env = "NBD_CSI_AGENT_MAX_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..),
        default_value_t = nbd::server::DEFAULT_MAX_CONNECTIONS as u32)]
    pub nbd_max_connections: u32,
    /// Connections one address (node) holds to one volume's NBD server at
    /// once (the node plugin opens at most 8; the rest is room for healing).
    #[arg(long, env = "NBD_CSI_AGENT_MAX_CONNECTIONS_PER_PEER", value_parser = clap::value_parser!(u32).range(1..),
        default_value_t = nbd::server::DEFAULT_MAX_CONNECTIONS_PER_PEER as u32)]
    pub nbd_max_connections_per_peer: u32,
    /// File holding the cluster's export-name key (a Secret's key mounted
    /// read-only): every volume's export name is derived from it.
    #[arg(long, env = "NBD_CSI_EXPORT_KEY_FILE")]
    pub export_key_file: PathBuf,
    /// Namespace of the agent's Lease [default: the kubeconfig's, or the
    /// pod's in a cluster].
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: Option<String>,
    /// Kubernetes access from this kubeconfig; in a pod the in-cluster
    /// config is used without it.
    #[arg(long, env = "NBD_CSI_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The NBD servers' TLS certificates: ca.crt (the CA node
    /// certificates chain to), tls.crt (naming --listen-address) and
    /// tls.key, read again when they change. Without it (or while they do
    /// not load) no volume that speaks TLS is placed here.
    #[arg(long, env = "NBD_CSI_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Serve Prometheus metrics of the volumes (their NBD counters and
    /// allocated bytes) and of the store's free space over HTTP here (e.g.
    /// 0.0.0.0:9812); off when unset.
    #[arg(long, env = "NBD_CSI_AGENT_METRICS_ADDRESS")]
    pub metrics_address: Option<SocketAddr>,
    /// Keep --tls-dir filled from this storage node's certificate Secret,
    /// <prefix>-storage-<node-name> in --namespace, which the controller
    /// (or cert-manager) issues for its address and renews.
    #[allow(rustdoc::invalid_html_tags)] // --help text, not HTML
    #[arg(long, env = "NBD_CSI_TLS_SECRET_PREFIX", requires = "tls_dir")]
    pub tls_secret_prefix: Option<String>,
}

/// The flags after every check that touches nothing: `--data-dir` made
/// absolute, the node name and the address checked.
fn resolve(mut args: Args) -> anyhow::Result<Args> {
    if !is_node_name(&args.node_name) {
        bail!(
            "--node-name {:?} is not a Node name (lowercase letters, digits, '-' and '.', at most 253)",
            args.node_name
        );
    }
    let address = args.listen_address;
    if address.is_unspecified() || address.is_multicast() {
        bail!("--listen-address {address} is not one address nodes can dial: give this node's IP");
    }
    // A namespace name is one DNS label.
    if args.namespace.as_deref().is_some_and(|n| n.len() > 63 || n.contains('.') || !is_node_name(n)) {
        bail!("--namespace {:?} is not a namespace name", args.namespace.unwrap_or_default());
    }
    args.data_dir = std::path::absolute(&args.data_dir).context("resolving --data-dir")?;
    tls_secret_name(&args)?;
    Ok(args)
}

/// This storage node's certificate Secret, named from `--node-name` alone.
fn tls_secret_name(args: &Args) -> anyhow::Result<Option<String>> {
    let Some(prefix) = &args.tls_secret_prefix else { return Ok(None) };
    let names = SecretNames::new(prefix).map_err(|e| anyhow!("--tls-secret-prefix: {e}"))?;
    Ok(Some(names.of(Holder::Storage(&args.node_name)).map_err(|e| anyhow!("--node-name: {e}"))?))
}

fn agent_config(args: &Args) -> agent::Config {
    agent::Config {
        listen: args.listen_address,
        ports: args.nbd_port_range.clone(),
        connection_caps: ConnectionCaps {
            per_volume: args.nbd_max_connections as usize,
            per_peer: args.nbd_max_connections_per_peer as usize,
        },
        tls_dir: args.tls_dir.clone(),
    }
}

/// `NBD_CSI_VALIDATE_ARGS=1 nbd-csi-controller agent ...`: the checks a
/// start makes before touching anything, then the settings, one
/// `key=value` per line. The key file is not read: in a pod it is a Secret
/// that may not be mounted where the chart's tests run this.
pub fn validate(args: Args) -> anyhow::Result<()> {
    let args = resolve(args)?;
    let config = agent_config(&args);
    let optional = |v: Option<String>| v.unwrap_or_default();
    println!("would_run=agent");
    println!("node_name={}", args.node_name);
    println!("data_dir={}", args.data_dir.display());
    println!("listen_address={}", config.listen);
    println!("nbd_port_range={}-{}", config.ports.start(), config.ports.end());
    println!("nbd_max_connections={}", config.connection_caps.per_volume);
    println!("nbd_max_connections_per_peer={}", config.connection_caps.per_peer);
    println!("export_key_file={}", args.export_key_file.display());
    println!("tls_dir={}", optional(config.tls_dir.as_ref().map(|p| p.display().to_string())));
    println!("namespace={}", optional(args.namespace.clone()));
    println!("kubeconfig={}", optional(args.kubeconfig.as_ref().map(|p| p.display().to_string())));
    println!("metrics_address={}", optional(args.metrics_address.map(|a| a.to_string())));
    println!("tls_secret={}", optional(tls_secret_name(&args)?));
    Ok(())
}

/// Runs the agent until SIGTERM or SIGINT, then stops it cleanly.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let args = resolve(args)?;
    let shutdown = csi_proto::shutdown::shutdown_signal()?;
    // Everything that can be wrong with the setup is found before the
    // store is opened.
    let export_key = ExportKey::from_file(&args.export_key_file)?;
    let Some(client) =
        csi_events::client(args.kubeconfig.as_deref()).await.map_err(|e| anyhow!("Kubernetes access: {e}"))?
    else {
        bail!("the agent takes its volumes from Kubernetes: give --kubeconfig, or run it in a pod");
    };
    let namespace = args.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
    // Follows its certificate Secret for as long as it lives.
    let tls_sync = match (tls_secret_name(&args)?, &args.tls_dir) {
        (Some(name), Some(dir)) => {
            tracing::info!(secret = %format!("{namespace}/{name}"), dir = %dir.display(), "following the agent's TLS Secret");
            Some(TlsSecretSync::spawn(client.clone(), &namespace, name, dir.clone()))
        }
        _ => None,
    };
    let events = AgentEvents::new(client.clone(), &args.node_name);
    let agent = Agent::open(agent_config(&args), &args.data_dir, Arc::new(events))
        .await
        .with_context(|| format!("loading the store in {}", args.data_dir.display()))?;
    if let Some(addr) = args.metrics_address {
        let metrics = Arc::new(Metrics::for_agent(&agent));
        let local = crate::metrics::spawn(addr, metrics).await.with_context(|| format!("metrics on {addr}"))?;
        tracing::info!(address = %local, "metrics listening");
    }
    let nodes = NodeDirectory::watched(client.clone());
    let reconciler = Arc::new(Reconciler::new(client, Arc::clone(&agent), args.node_name.clone(), export_key, nodes));
    let mut watching = tokio::spawn(Arc::clone(&reconciler).run());
    let presence = tokio::spawn(Arc::clone(&reconciler).keep_present(args.listen_address, namespace.clone()));
    tracing::info!(
        node = %args.node_name,
        address = %args.listen_address,
        ports = %format!("{}-{}", args.nbd_port_range.start(), args.nbd_port_range.end()),
        data_dir = %args.data_dir.display(),
        namespace = %namespace,
        "storage agent running"
    );
    let outcome = tokio::select! {
        () = shutdown => Ok(()),
        // The watches retry on their own; ending means the agent no longer
        // follows its objects, which a restart mends.
        ended = &mut watching => Err(anyhow!("the watches of this node's objects ended: {ended:?}")),
    };
    watching.abort();
    presence.abort();
    // Aborted at an await, an operation leaves the store as a crash
    // would, which it survives; what matters is that none starts now.
    let _ = watching.await;
    let _ = presence.await;
    agent.shutdown().await;
    drop(tls_sync);
    tracing::info!("stopped");
    outcome
}
