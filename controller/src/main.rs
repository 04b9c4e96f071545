//! `nbd-csi-controller`: the CSI controller (Identity + Controller, one NBD
//! server per volume), an operator CLI that drives a running one over its
//! CSI endpoint, and tools around its NBD server.

mod cli;
mod csi;
mod driver;
mod error;
mod events;
mod metrics;
mod nodes;
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
    /// Volumes of a running controller, over its CSI endpoint: create,
    /// list, get, delete, expand, publish (prints the nbdUri), unpublish.
    Volume(cli::VolumeArgs),
    /// Snapshots of a running controller: create, list, get, delete.
    Snapshot(cli::SnapshotArgs),
    /// A running controller's name, version, readiness and free capacity.
    Info(cli::ClientArgs),
}

/// Set to `1`: parse and check the command line and environment exactly as
/// a start would, print what would run, and exit without touching anything.
const VALIDATE_ENV: &str = "NBD_CSI_VALIDATE_ARGS";

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The client subcommands print results, not logs, unless RUST_LOG asks.
    let client = matches!(cli.command, Some(Command::Volume(_) | Command::Snapshot(_) | Command::Info(_)));
    let default_filter = if client { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)))
        .with_writer(std::io::stderr)
        .init();
    if std::env::var_os(VALIDATE_ENV).is_some_and(|v| v == "1") {
        return match cli.command {
            None => service::validate(cli.serve),
            Some(command) => {
                println!("would_run={command:?}");
                Ok(())
            }
        };
    }
    if !client {
        raise_descriptor_limit();
    }
    let client_runtime = || tokio::runtime::Builder::new_current_thread().enable_all().build();
    let server_runtime = || tokio::runtime::Builder::new_multi_thread().enable_all().build();
    match cli.command {
        Some(Command::Volume(args)) => client_done(client_runtime()?.block_on(cli::volume(args))),
        Some(Command::Snapshot(args)) => client_done(client_runtime()?.block_on(cli::snapshot(args))),
        Some(Command::Info(args)) => client_done(client_runtime()?.block_on(cli::info(args))),
        Some(Command::ServeFile(args)) => server_runtime()?.block_on(serve_file::run(args)),
        None => server_runtime()?.block_on(service::run(cli.serve)),
    }
}

/// Every volume's NBD server lives in this process and shares its
/// descriptor limit, whose soft value is often 1024 while the hard one is
/// far higher: the soft limit goes up to the hard one, so the per-volume
/// connection caps, not the process limit, bound what clients can open.
fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open-file limit"),
            Err(error) => tracing::warn!(%error, limit = soft, "could not raise the open-file limit"),
        },
        Ok((soft, _)) => tracing::info!(limit = soft, "open-file limit"),
        Err(error) => tracing::warn!(%error, "could not read the open-file limit"),
    }
}

/// A client subcommand's failure is one line on stderr (the RPC's code and
/// message) and exit status 1, without a backtrace.
fn client_done(result: anyhow::Result<()>) -> anyhow::Result<()> {
    if let Err(e) = result {
        eprintln!("nbd-csi-controller: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}
