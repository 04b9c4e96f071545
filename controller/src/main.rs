//! `nbd-csi-controller`: the CSI controller, the storage agent, its
//! operator CLI, `serve-file` and `crds`, all from [`nbd_csi_controller`] and the agent;
//! this binary only sets up logging, the process and a runtime for the one
//! that runs.

use clap::Parser;
use nbd_csi_controller::command_line::{Cli, Command, VALIDATE_ENV};
use nbd_csi_controller::{agent_role, cli, serve_file, service};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The client subcommands print results, not logs, unless RUST_LOG asks.
    let client = cli.command.as_ref().is_some_and(Command::is_client);
    let default_filter = if client { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)))
        .with_writer(std::io::stderr)
        .init();
    if std::env::var_os(VALIDATE_ENV).is_some_and(|v| v == "1") {
        return match cli.command {
            None => service::validate(cli.serve),
            Some(Command::Agent(args)) => agent_role::validate(args),
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
        Some(Command::Crds) => {
            print!("{}", agent::resources::crds_yaml()?);
            Ok(())
        }
        Some(Command::Agent(args)) => server_runtime()?.block_on(agent_role::run(args)),
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
