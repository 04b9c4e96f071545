//! `nbd-csi-controller`: the CSI controller, and tools around its NBD server.

mod serve_file;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(version, about = "nbd-csi controller")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve one existing file over NBD with the volume server code, until
    /// SIGINT or SIGTERM. For debugging and benchmarks.
    ServeFile(serve_file::Args),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::ServeFile(args) => runtime.block_on(serve_file::run(args)),
    }
}
