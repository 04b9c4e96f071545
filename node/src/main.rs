//! `nbd-csi-node`: the node plugin. This release carries the pieces the
//! attach path is built on: URI parsing, the userspace handshake and the
//! connection-count rule, exposed through the `probe` subcommand.

mod connections;
mod uri;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::connections::{connection_count, default_connections};
use crate::uri::NbdUri;

#[derive(Debug, Parser)]
#[command(version, about = "nbd-csi node plugin")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match Cli::parse().command {
        Command::Probe { uri, connections } => runtime.block_on(probe(&uri, connections)),
    }
}

async fn probe(uri: &str, connections: Option<usize>) -> anyhow::Result<()> {
    let uri = NbdUri::parse(uri)?;
    let mut stream =
        tokio::net::TcpStream::connect(uri.authority()).await.with_context(|| format!("connecting to {uri}"))?;
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
