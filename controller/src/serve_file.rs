//! `serve-file`: files as exports, exactly the server volumes use, one
//! port per file in one process as the storage role serves its volumes
//! (bench/volumes.sh measures many at once this way); with `--tls-dir` and
//! `--tls`, NBD over TLS (the real-kernel test bed's server for kTLS on the
//! node).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use nbd::server::{Export, ExportConfig, Server};
use nbd::tls::{ServerTls, TlsMode};
use tokio::sync::watch;
use tokio::task::JoinSet;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The files to export; each one's current length is its export's
    /// size. Each has a port of its own: the first --listen's, the next the
    /// port after it, and so on (with port 0, each a free port).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
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

/// The address of the `index`th file: --listen's port plus `index`, or
/// port 0 (a free port) for all when --listen's is 0.
fn listen_addr(listen: SocketAddr, index: usize) -> anyhow::Result<SocketAddr> {
    if listen.port() == 0 {
        return Ok(listen);
    }
    let port = u16::try_from(index)
        .ok()
        .and_then(|index| listen.port().checked_add(index))
        .with_context(|| format!("{} files do not fit in the ports from {listen}", index + 1))?;
    Ok(SocketAddr::new(listen.ip(), port))
}

fn export_config(args: &Args, path: &Path) -> anyhow::Result<ExportConfig> {
    let mut config = ExportConfig::new(args.export_name.clone());
    config.read_only = args.read_only;
    config.multi_conn = !args.no_multi_conn;
    config.max_connections = args.max_connections as usize;
    config.max_connections_per_peer = args.max_connections_per_peer as usize;
    config.description = format!("nbd-csi serve-file {}", path.display());
    config.tls = tls_mode(args.tls, args.tls_dir.as_deref())?;
    Ok(config)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = csi_proto::shutdown::shutdown_signal()?;
    let tls = match args.tls {
        None => "off",
        Some(TlsArg::Required) => "required",
        Some(TlsArg::Allowed) => "allowed",
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers = JoinSet::new();
    for (index, path) in args.paths.iter().enumerate() {
        let addr = listen_addr(args.listen, index)?;
        let export =
            Export::open(path, export_config(&args, path)?).with_context(|| format!("opening {}", path.display()))?;
        let server = Server::bind(export, addr).await.with_context(|| format!("listening on {addr}"))?;
        tracing::info!(
            path = %path.display(),
            listen = %server.local_addr()?,
            size = server.export().size(),
            tls,
            "serving"
        );
        let mut stop = stop_rx.clone();
        servers.spawn(server.run(async move {
            // Err only when the sender is gone, which is a stop as well.
            let _ = stop.wait_for(|stopped| *stopped).await;
        }));
    }
    tokio::select! {
        () = shutdown => {}
        // A server that returns before the signal failed: stop the others.
        Some(early) = servers.join_next() => {
            stop_tx.send_replace(true);
            early.context("an export server panicked")?.context("an export server failed")?;
        }
    }
    stop_tx.send_replace(true);
    while let Some(done) = servers.join_next().await {
        done.context("an export server panicked")?.context("an export server failed")?;
    }
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_take_consecutive_ports_from_listen() {
        let listen: SocketAddr = "127.0.0.1:10809".parse().unwrap();
        assert_eq!(listen_addr(listen, 0).unwrap(), listen);
        assert_eq!(listen_addr(listen, 3).unwrap(), "127.0.0.1:10812".parse().unwrap());
    }

    #[test]
    fn port_zero_gives_every_file_a_free_port() {
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(listen_addr(listen, 63).unwrap(), listen);
    }

    #[test]
    fn ports_past_65535_are_an_error_not_a_wrap() {
        let listen: SocketAddr = "127.0.0.1:65530".parse().unwrap();
        assert_eq!(listen_addr(listen, 5).unwrap().port(), 65535);
        let err = listen_addr(listen, 6).unwrap_err().to_string();
        assert!(err.contains("7 files do not fit"), "{err}");
    }
}
