//! `serve-file`: one file, one export, exactly the server volumes use;
//! with `--tls-dir` and `--tls`, NBD over TLS (the real-kernel test bed's
//! server for kTLS on the node).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use nbd::server::{Export, ExportConfig, Server};
use nbd::tls::{ServerTls, TlsMode};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The file to export; its current length is the export size.
    path: PathBuf,
    /// Address to listen on, e.g. 127.0.0.1:10809.
    #[arg(long)]
    listen: SocketAddr,
    /// The export name clients must ask for.
    #[arg(long, default_value = "")]
    export_name: String,
    /// Refuse writes and advertise READ_ONLY.
    #[arg(long)]
    read_only: bool,
    /// Do not advertise CAN_MULTI_CONN (clients then use one connection).
    #[arg(long)]
    no_multi_conn: bool,
    /// Connections held at once; more are closed right after accept.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..),
        default_value_t = nbd::server::DEFAULT_MAX_CONNECTIONS as u32)]
    max_connections: u32,
    /// Connections one client address holds at once (as for volumes).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..),
        default_value_t = nbd::server::DEFAULT_MAX_CONNECTIONS_PER_PEER as u32)]
    max_connections_per_peer: u32,
    /// NBD over TLS: `required` (nothing before STARTTLS but STARTTLS) or
    /// `allowed` (the client chooses); needs --tls-dir. Default: no TLS.
    #[arg(long, value_enum, requires = "tls_dir")]
    tls: Option<TlsArg>,
    /// The server's certificates: tls.crt and tls.key (its certificate,
    /// naming the address clients dial, and key) and ca.crt (the CA client
    /// certificates must chain to).
    #[arg(long, requires = "tls")]
    tls_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TlsArg {
    Required,
    Allowed,
}

fn tls_mode(mode: Option<TlsArg>, dir: Option<&std::path::Path>) -> anyhow::Result<TlsMode> {
    let (Some(mode), Some(dir)) = (mode, dir) else { return Ok(TlsMode::Off) };
    let tls = ServerTls::from_pem_files(&dir.join("tls.crt"), &dir.join("tls.key"), &dir.join("ca.crt"))
        .with_context(|| format!("--tls-dir {}", dir.display()))?;
    Ok(match mode {
        TlsArg::Required => TlsMode::Required(tls),
        TlsArg::Allowed => TlsMode::Allowed(tls),
    })
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut config = ExportConfig::new(args.export_name);
    config.read_only = args.read_only;
    config.multi_conn = !args.no_multi_conn;
    config.max_connections = args.max_connections as usize;
    config.max_connections_per_peer = args.max_connections_per_peer as usize;
    config.description = format!("nbd-csi serve-file {}", args.path.display());
    config.tls = tls_mode(args.tls, args.tls_dir.as_deref())?;
    let tls = match args.tls {
        None => "off",
        Some(TlsArg::Required) => "required",
        Some(TlsArg::Allowed) => "allowed",
    };
    let export = Export::open(&args.path, config).with_context(|| format!("opening {}", args.path.display()))?;
    let server = Server::bind(export, args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let shutdown = csi_proto::shutdown::shutdown_signal()?;
    tracing::info!(
        path = %args.path.display(),
        listen = %server.local_addr()?,
        size = server.export().size(),
        tls,
        "serving"
    );
    server.run(shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}
