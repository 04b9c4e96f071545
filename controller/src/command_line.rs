//! The binary's command line: the controller's own flags, or one
//! subcommand (`agent`, `serve-file`, an operator client of a running
//! controller, or `crds`).

use clap::{Parser, Subcommand};

use crate::{agent_role, cli, serve_file, service};

/// Set to `1`: parse and check the command line and environment exactly as
/// a start would, print what would run, and exit without touching anything.
pub const VALIDATE_ENV: &str = "NBD_CSI_VALIDATE_ARGS";

#[derive(Debug, Parser)]
#[command(version, about = "nbd-csi controller", args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(flatten)]
    pub serve: service::Args,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The storage role on one storage node: serve this node's volumes
    /// from a data directory, as its NbdVolume and NbdSnapshot objects
    /// say, until SIGINT or SIGTERM. Needs Kubernetes.
    Agent(agent_role::Args),
    /// Serve existing files over NBD with the volume server code, each on
    /// its own port, until SIGINT or SIGTERM. For debugging and benchmarks.
    ServeFile(serve_file::Args),
    /// Volumes of a running controller, over its CSI endpoint: create,
    /// list, get, delete, expand, publish (prints the nbdUri), unpublish.
    Volume(cli::VolumeArgs),
    /// Snapshots of a running controller: create, list, get, delete.
    Snapshot(cli::SnapshotArgs),
    /// A running controller's name, version, readiness and free capacity.
    Info(cli::ClientArgs),
    /// Print the CustomResourceDefinitions of the nbd.csi.dev resources as
    /// YAML (the chart's crds/ copy is this output).
    Crds,
}

impl Command {
    /// An operator client (or `crds`): it prints results, not logs, and
    /// serves nothing.
    pub fn is_client(&self) -> bool {
        matches!(self, Self::Volume(_) | Self::Snapshot(_) | Self::Info(_) | Self::Crds)
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// clap's own consistency checks (unique argument and group ids across
    /// the flattened flag sets, say), which otherwise fail only at start.
    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
