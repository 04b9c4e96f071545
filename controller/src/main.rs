//! `nbd-csi-controller`: the CSI controller (Identity + Controller, one NBD
//! server per volume), and tools around its NBD server.

mod csi;
mod driver;
mod error;
mod kube;
mod metrics;
mod serve_file;
mod service;
mod store;
mod volumes;

#[cfg(test)]
mod tests;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(version, about = "nbd-csi controller", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    serve: service::Args,
    #[command(subcommand)]
    command: Option<Command>,
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
        Some(Command::ServeFile(args)) => runtime.block_on(serve_file::run(args)),
        None => runtime.block_on(service::run(cli.serve)),
    }
}
