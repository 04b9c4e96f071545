//! The controller's main job: CSI Identity + Controller on `--endpoint`,
//! one NBD server per volume (or, with `--storage-mode cluster`, the
//! storage nodes' agents driven through objects), metrics. A TCP endpoint
//! that is not loopback is refused unless `--allow-insecure-tcp-endpoint`
//! accepts the risk.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use csi_events::tls_secret::{Holder, SecretNames, TlsSecretSync};
use csi_proto::contract::VolumeTls;
use csi_proto::controller_server::ControllerServer;
use csi_proto::identity_server::IdentityServer;

use crate::csi::{ControllerService, IdentityService};
use crate::driver::{Config, Driver};
use crate::nodes::Nodes;
pub use crate::storage::StorageMode;
use crate::storage::{self, Cluster};

/// The CSI driver name without `--driver-name` (the chart's default too).
pub const DEFAULT_DRIVER_NAME: &str = "nbd.csi.dev";

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// CSI endpoint: unix:///path/csi.sock or tcp://host:port
    /// [default: unix://<data-dir>/csi.sock]
    #[allow(rustdoc::invalid_html_tags)] // `<data-dir>` is --help text, not HTML
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: Option<Endpoint>,
    /// Serve CSI on a TCP endpoint that is not loopback. Nothing
    /// authenticates CSI callers: whoever reaches the port can create,
    /// delete and publish volumes and learn their export names.
    #[arg(long, env = "NBD_CSI_ALLOW_INSECURE_TCP_ENDPOINT")]
    pub allow_insecure_tcp_endpoint: bool,
    /// Directory holding volume and snapshot images and their records.
    #[arg(long, env = "NBD_CSI_DATA_DIR", default_value = "nbd-csi-data")]
    pub data_dir: PathBuf,
    /// CSI driver name reported by GetPluginInfo.
    #[arg(long, env = "NBD_CSI_DRIVER_NAME", default_value = DEFAULT_DRIVER_NAME)]
    pub driver_name: String,
    /// Address nodes use to reach the NBD servers (put in nbdUri)
    /// [default: --nbd-listen-address, which must then not be unspecified].
    #[arg(long, env = "NBD_CSI_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<IpAddr>,
    /// Address every volume's NBD server binds.
    #[arg(long, env = "NBD_CSI_NBD_LISTEN_ADDRESS", default_value = "127.0.0.1")]
    pub nbd_listen_address: IpAddr,
    /// Ports for the NBD servers, FIRST-LAST: one per attached volume, taken
    /// at ControllerPublishVolume and given back when it is attached nowhere.
    /// The chart's default too.
    #[arg(long, env = "NBD_CSI_NBD_PORT_RANGE", default_value = "10900-10999", value_parser = parse_port_range)]
    pub nbd_port_range: RangeInclusive<u16>,
    /// Connections one volume's NBD server holds at once, from all nodes;
    /// more are closed right after accept.
    #[arg(long, env = "NBD_CSI_NBD_MAX_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..),
        default_value_t = nbd::server::DEFAULT_MAX_CONNECTIONS as u32)]
    pub nbd_max_connections: u32,
    /// Connections one address (node) holds to one volume's NBD server at
    /// once. The node plugin opens at most 8; the rest is room for healing
    /// reconnects that overlap connections the server has not yet seen die.
    #[arg(long, env = "NBD_CSI_NBD_MAX_CONNECTIONS_PER_PEER", value_parser = clap::value_parser!(u32).range(1..),
        default_value_t = nbd::server::DEFAULT_MAX_CONNECTIONS_PER_PEER as u32)]
    pub nbd_max_connections_per_peer: u32,
    /// Whether the exports of new volumes speak TLS when their
    /// StorageClass has no `tls` parameter: off, allowed or required.
    #[arg(long, env = "NBD_CSI_DEFAULT_TLS", default_value = "off", value_parser = parse_tls)]
    pub default_tls: VolumeTls,
    /// Embedded mode: the NBD servers' TLS certificates, ca.crt (the CA
    /// node certificates chain to), tls.crt (naming --advertise-address)
    /// and tls.key, read again when they change; volumes that speak TLS
    /// need them.
    #[arg(long, env = "NBD_CSI_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP here (e.g. 0.0.0.0:9810); off when unset.
    #[arg(long, env = "NBD_CSI_METRICS_ADDRESS")]
    pub metrics_address: Option<SocketAddr>,
    /// Kubernetes access from this kubeconfig; in a pod the in-cluster
    /// config is used without it. With Kubernetes, node ids are Node names
    /// and an export admits only its nodes' addresses.
    #[arg(long, env = "NBD_CSI_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Without Kubernetes: the node ids that exist (comma-separated);
    /// publishing to any other is NOT_FOUND. Empty: any node id.
    #[arg(long, env = "NBD_CSI_KNOWN_NODES", value_delimiter = ',')]
    pub known_nodes: Vec<String>,
    /// Where volumes live: embedded (one in-process agent on --data-dir,
    /// no Kubernetes needed) or cluster (the storage nodes' agents, driven
    /// through nbd.csi.dev objects; needs Kubernetes).
    #[arg(long, env = "NBD_CSI_STORAGE_MODE", value_enum, default_value_t = StorageMode::Embedded)]
    pub storage_mode: StorageMode,
    /// Cluster mode: the Secret in --namespace holding the export-name key
    /// (data key `key`) the agents mount; created with 32 random bytes if
    /// it does not exist.
    #[arg(long, env = "NBD_CSI_EXPORT_KEY_SECRET")]
    pub export_key_secret: Option<String>,
    /// Cluster mode: the namespace of the agents' Leases and of the
    /// export-key Secret [default: the pod's, else the kubeconfig's].
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: Option<String>,
    /// Cluster mode: seconds a call waits for a storage node's agent to
    /// report the change in effect; then UNAVAILABLE, and the retry waits
    /// again.
    #[arg(long, env = "NBD_CSI_STORAGE_TIMEOUT", default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub storage_timeout: u64,
    /// Who issues the nodes' and servers' TLS certificates (certs).
    #[command(flatten)]
    pub tls: crate::certs::IssuerArgs,
}

/// A Kubernetes object name (a DNS subdomain), for the Secret's.
fn validate_object_name(what: &str, name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if !ok {
        bail!("{what} {name:?} must be at most 253 characters of [a-z0-9.-], starting and ending alphanumeric");
    }
    Ok(())
}

/// Cluster mode's own flags, checked: the export-key Secret is required.
fn check_storage_mode(args: &Args) -> anyhow::Result<()> {
    match args.storage_mode {
        StorageMode::Embedded => Ok(()),
        StorageMode::Cluster => {
            let secret = args
                .export_key_secret
                .as_deref()
                .context("--storage-mode cluster needs --export-key-secret (NBD_CSI_EXPORT_KEY_SECRET)")?;
            validate_object_name("--export-key-secret", secret)?;
            if let Some(namespace) = &args.namespace {
                validate_object_name("--namespace", namespace)?;
            }
            Ok(())
        }
    }
}

/// A `--default-tls` value: the StorageClass parameter's spellings.
pub(crate) fn parse_tls(s: &str) -> Result<VolumeTls, String> {
    VolumeTls::parse(s)
        .ok_or_else(|| format!("{s:?} is not a TLS mode: one of {}", VolumeTls::ALL.map(VolumeTls::as_str).join(", ")))
}

pub(crate) fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let first: u16 = a.trim().parse().map_err(|e| format!("bad port {a:?}: {e}"))?;
    let last: u16 = b.trim().parse().map_err(|e| format!("bad port {b:?}: {e}"))?;
    if first == 0 || first > last {
        return Err(format!("port range {s:?} must be FIRST-LAST with 0 < FIRST <= LAST"));
    }
    Ok(first..=last)
}

/// Where the CSI gRPC server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix://") {
            if path.is_empty() {
                return Err("unix:// endpoint without a path".into());
            }
            Ok(Self::Unix(PathBuf::from(path)))
        } else if let Some(addr) = s.strip_prefix("tcp://") {
            Ok(Self::Tcp(addr.to_string()))
        } else if s.starts_with('/') {
            Ok(Self::Unix(PathBuf::from(s)))
        } else {
            Err(format!("endpoint {s:?} is neither unix:///path nor tcp://host:port"))
        }
    }
}

impl Endpoint {
    /// Whether only this host can connect: a Unix socket, or TCP on a
    /// loopback address. A host name other than `localhost` may resolve
    /// to anything, so it counts as reachable from elsewhere.
    pub fn is_local(&self) -> bool {
        match self {
            Self::Unix(_) => true,
            Self::Tcp(addr) => match addr.parse::<SocketAddr>() {
                Ok(addr) => addr.ip().is_loopback(),
                Err(_) => addr.rsplit_once(':').is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost")),
            },
        }
    }
}

/// Refuses to serve CSI where other hosts can reach it unless `allow`
/// accepts the risk, and then says so in the log: the CSI API has no
/// authentication, and ControllerPublishVolume hands out the export name,
/// the only guard of a published volume without Kubernetes.
pub(crate) fn check_endpoint(endpoint: &Endpoint, allow: bool) -> anyhow::Result<()> {
    if endpoint.is_local() {
        return Ok(());
    }
    if !allow {
        bail!(
            "refusing to serve CSI on {endpoint}: it is not a loopback address, and anyone who reaches it can call \
             every RPC, including ControllerPublishVolume, which reveals a volume's export name. Use a unix:// \
             socket or tcp://127.0.0.1:PORT, or accept the risk with --allow-insecure-tcp-endpoint \
             (NBD_CSI_ALLOW_INSECURE_TCP_ENDPOINT=true)"
        );
    }
    tracing::warn!(
        endpoint = %endpoint,
        "serving CSI on a TCP endpoint that is not loopback (--allow-insecure-tcp-endpoint): every RPC, \
         including ControllerPublishVolume and the export names it returns, is open to anyone who reaches it"
    );
    Ok(())
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
            Self::Tcp(addr) => write!(f, "tcp://{addr}"),
        }
    }
}

fn validate_driver_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if !ok {
        bail!("driver name {name:?} must be at most 63 characters of [a-z0-9.-], starting and ending alphanumeric");
    }
    Ok(())
}

/// The driver's configuration from the flags, checked; touches nothing.
fn config(args: &Args) -> anyhow::Result<Config> {
    validate_driver_name(&args.driver_name)?;
    check_storage_mode(args)?;
    args.tls.checked()?;
    let advertise = match args.advertise_address {
        Some(a) => a,
        None if args.nbd_listen_address.is_unspecified() => {
            bail!("--advertise-address is required when --nbd-listen-address is {}", args.nbd_listen_address)
        }
        None => args.nbd_listen_address,
    };
    Ok(Config {
        driver_name: args.driver_name.clone(),
        advertise,
        default_tls: args.default_tls,
        agent: agent::Config {
            listen: args.nbd_listen_address,
            ports: args.nbd_port_range.clone(),
            connection_caps: agent::ConnectionCaps {
                per_volume: args.nbd_max_connections as usize,
                per_peer: args.nbd_max_connections_per_peer as usize,
            },
            tls_dir: args.tls_dir.clone(),
        },
    })
}

/// Builds the driver from the flags: validates them, then loads the store
/// and starts the volume servers, or, in cluster mode, reads (or creates)
/// the export-name key.
pub(crate) async fn build(args: &Args) -> anyhow::Result<Arc<Driver>> {
    let config = config(args)?;
    let known: BTreeSet<String> = args.known_nodes.iter().filter(|n| !n.is_empty()).cloned().collect();
    let nodes = Nodes::connect(args.kubeconfig.as_deref(), known).await.context("Kubernetes access")?;
    tracing::info!(kubernetes = nodes.uses_kubernetes(), "node lookups configured");
    start_issuer(args, &nodes, config.advertise).await?;
    if args.storage_mode == StorageMode::Cluster {
        let Nodes::Kubernetes(client, _) = &nodes else {
            bail!("--storage-mode cluster needs Kubernetes: run in a pod or give --kubeconfig");
        };
        let namespace = args.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
        let secret = args.export_key_secret.as_deref().unwrap_or_default();
        let key = storage::load_export_key(client.clone(), &namespace, secret)
            .await
            .with_context(|| format!("the export-name key in Secret {namespace}/{secret}"))?;
        tracing::info!(namespace, secret, "cluster mode: volumes on the storage nodes' agents");
        let cluster = Cluster::new(client.clone(), namespace, key, Duration::from_secs(args.storage_timeout));
        return Ok(Driver::start_cluster(config, nodes, cluster));
    }
    let driver = Driver::start(config, args.data_dir.clone(), nodes)
        .await
        .with_context(|| format!("loading the store in {}", args.data_dir.display()))?;
    Ok(driver)
}

/// Starts issuing TLS certificates when `--tls-issuer` asks (see `certs`):
/// in the background, for as long as the process runs.
async fn start_issuer(args: &Args, nodes: &Nodes, advertise: IpAddr) -> anyhow::Result<()> {
    if args.tls.tls_issuer == crate::certs::IssuerKind::None {
        return Ok(());
    }
    let Nodes::Kubernetes(client, _) = nodes else {
        bail!("--tls-issuer needs Kubernetes (the certificates go into Secrets): run in a pod or give --kubeconfig");
    };
    let cluster = args.storage_mode == StorageMode::Cluster;
    let scope = crate::certs::Scope {
        namespace: args.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned()),
        driver_name: args.driver_name.clone(),
        storage_nodes: cluster,
        controller_address: (!cluster).then_some(advertise),
    };
    // Embedded, this process serves the volumes itself: its own server
    // certificate (<prefix>-controller, issued above) is kept in --tls-dir
    // the way an agent keeps its one.
    let own_files = match (&args.tls_dir, args.tls.tls_secret_prefix.as_deref(), cluster) {
        (Some(dir), Some(prefix), false) => {
            let names = SecretNames::new(prefix).map_err(|e| anyhow::anyhow!("--tls-secret-prefix: {e}"))?;
            let name = names.of(Holder::Controller).map_err(|e| anyhow::anyhow!("{e}"))?;
            tracing::info!(secret = %format!("{}/{name}", scope.namespace), dir = %dir.display(), "following the controller's TLS Secret");
            Some(TlsSecretSync::spawn(client.clone(), &scope.namespace, name, dir.clone()))
        }
        _ => None,
    };
    if let Some(issuer) = crate::certs::Issuer::start(client.clone(), &args.tls, &scope).await? {
        tokio::spawn(async move {
            let _own_files = own_files;
            issuer.run(scope).await
        });
    }
    Ok(())
}

/// Serves CSI on `endpoint` until `shutdown` resolves, then stops every
/// volume server.
pub(crate) async fn serve(
    driver: Arc<Driver>,
    endpoint: Endpoint,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService(Arc::clone(&driver))))
        .add_service(ControllerServer::new(ControllerService(Arc::clone(&driver))));
    match &endpoint {
        Endpoint::Unix(path) => {
            let listener = csi_proto::uds::bind(path).with_context(|| format!("binding {}", path.display()))?;
            router.serve_with_incoming_shutdown(csi_proto::uds::incoming(listener), shutdown).await?;
            let _ = std::fs::remove_file(path);
        }
        Endpoint::Tcp(addr) => {
            let addr =
                tokio::net::lookup_host(addr.as_str()).await?.next().with_context(|| format!("resolving {addr}"))?;
            let listener = tokio::net::TcpListener::bind(addr).await?;
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            router.serve_with_incoming_shutdown(incoming, shutdown).await?;
        }
    }
    driver.shutdown().await;
    Ok(())
}

/// The endpoint without `--endpoint`: a socket in the data directory. The
/// CLI subcommands find a server started without flags the same way.
pub fn default_endpoint(data_dir: &Path) -> Endpoint {
    Endpoint::Unix(data_dir.join("csi.sock"))
}

/// The flags as the main job will use them: `--data-dir` made absolute
/// and the endpoint with its default, after the checks that need no I/O.
fn resolve(mut args: Args) -> anyhow::Result<(Args, Endpoint)> {
    args.data_dir = std::path::absolute(&args.data_dir).context("resolving --data-dir")?;
    let endpoint = args.endpoint.clone().unwrap_or_else(|| default_endpoint(&args.data_dir));
    check_endpoint(&endpoint, args.allow_insecure_tcp_endpoint)?;
    Ok((args, endpoint))
}

/// `NBD_CSI_VALIDATE_ARGS=1 nbd-csi-controller ...`: every check a start
/// makes before touching the system, then what it would serve, one
/// `key=value` per line on stdout. The chart's tests run the rendered
/// command lines through this.
pub fn validate(args: Args) -> anyhow::Result<()> {
    let (args, endpoint) = resolve(args)?;
    let config = config(&args)?;
    let optional = |v: Option<String>| v.unwrap_or_default();
    println!("would_run=controller");
    println!("endpoint={endpoint}");
    println!("data_dir={}", args.data_dir.display());
    println!("driver_name={}", config.driver_name);
    println!("advertise_address={}", config.advertise);
    println!("nbd_listen_address={}", config.agent.listen);
    println!("nbd_port_range={}-{}", config.agent.ports.start(), config.agent.ports.end());
    println!("default_tls={}", config.default_tls);
    println!("tls_dir={}", optional(config.agent.tls_dir.as_ref().map(|p| p.display().to_string())));
    println!("metrics_address={}", optional(args.metrics_address.map(|a| a.to_string())));
    println!("kubeconfig={}", optional(args.kubeconfig.map(|p| p.display().to_string())));
    println!("known_nodes={}", args.known_nodes.join(","));
    println!("storage_mode={}", args.storage_mode);
    println!("export_key_secret={}", optional(args.export_key_secret));
    println!("namespace={}", optional(args.namespace));
    println!("storage_timeout={}", args.storage_timeout);
    args.tls.print();
    Ok(())
}

/// `nbd-csi-controller` without a subcommand.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let (args, endpoint) = resolve(args)?;
    let shutdown = csi_proto::shutdown::shutdown_signal()?;
    let driver = build(&args).await?;
    if let Some(addr) = args.metrics_address {
        let local = crate::metrics::spawn(addr, Arc::clone(driver.metrics()))
            .await
            .with_context(|| format!("metrics on {addr}"))?;
        tracing::info!(address = %local, "metrics listening");
    }
    tracing::info!(
        endpoint = %endpoint,
        data_dir = %args.data_dir.display(),
        nbd = %SocketAddr::new(driver.config().advertise, *driver.config().agent.ports.start()),
        "CSI controller listening"
    );
    eprintln!("nbd-csi-controller: CSI on {endpoint}, data in {}", args.data_dir.display());
    serve(driver, endpoint, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}
