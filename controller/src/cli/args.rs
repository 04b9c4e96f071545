//! The client subcommands' arguments: where the controller is, how to
//! print, and what each `volume …` / `snapshot …` command asks for.

use std::path::PathBuf;

use csi_proto::volume_capability::access_mode::Mode;

use crate::service::Endpoint;

/// How to reach the controller, and how to print; shared by every client
/// subcommand (and accepted after it: `volume list --endpoint …`).
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// CSI endpoint of the running controller: unix:///path/csi.sock or
    /// tcp://host:port [default: unix://<data-dir>/csi.sock, as the server]
    #[allow(rustdoc::invalid_html_tags)] // `<data-dir>` is --help text, not HTML
    #[arg(long, env = "CSI_ENDPOINT", global = true)]
    pub(super) endpoint: Option<Endpoint>,
    /// The server's --data-dir; only used to find its default endpoint.
    #[arg(long, env = "NBD_CSI_DATA_DIR", default_value = "nbd-csi-data", global = true)]
    pub(super) data_dir: PathBuf,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text, global = true)]
    pub(super) output: Output,
    /// Seconds to wait for one RPC (clones and snapshots of big volumes copy data).
    #[arg(long, default_value_t = 300, global = true)]
    pub(super) timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum Output {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct VolumeArgs {
    #[command(flatten)]
    pub(super) client: ClientArgs,
    #[command(subcommand)]
    pub(super) command: VolumeCommand,
}

#[derive(Debug, clap::Subcommand)]
pub(super) enum VolumeCommand {
    /// CreateVolume: a new volume (or the existing one of that name).
    Create {
        /// The volume's name; creating the same name again is idempotent.
        name: String,
        /// Size, in bytes or with a binary suffix: 512M, 1G, 1GiB, 2T.
        /// Rounded up to a whole MiB [default: 1G, or the source's size].
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// A raw block volume (default: a filesystem volume the node formats).
        #[arg(long)]
        block: bool,
        /// Filesystem for a mount volume (the node's default when unset).
        #[arg(long, conflicts_with = "block")]
        fs_type: Option<String>,
        /// Access mode; repeat for several.
        #[arg(long = "access-mode", value_enum, default_values_t = [AccessModeArg::SingleNodeWriter])]
        access_modes: Vec<AccessModeArg>,
        /// Content from this snapshot.
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Content cloned from this volume (point in time).
        #[arg(long)]
        from_volume: Option<String>,
    },
    /// ListVolumes: every volume, with the nodes it is published to.
    List,
    /// ControllerGetVolume: one volume and its condition.
    Get { id: String },
    /// DeleteVolume: stops its server and removes its data.
    Delete { id: String },
    /// ControllerExpandVolume: grows the volume online.
    Expand {
        id: String,
        /// The new size (never smaller than the current one).
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// ControllerPublishVolume: lets NODE attach the volume; prints the nbdUri.
    Publish {
        id: String,
        /// Node id (the Node's name under Kubernetes).
        #[arg(long)]
        node: String,
        /// Publish read-only.
        #[arg(long)]
        readonly: bool,
        /// Access mode of this publication.
        #[arg(long, value_enum, default_value_t = AccessModeArg::SingleNodeWriter)]
        access_mode: AccessModeArg,
    },
    /// ControllerUnpublishVolume: revokes NODE and closes its connections.
    Unpublish {
        id: String,
        #[arg(long)]
        node: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub(super) client: ClientArgs,
    #[command(subcommand)]
    pub(super) command: SnapshotCommand,
}

#[derive(Debug, clap::Subcommand)]
pub(super) enum SnapshotCommand {
    /// CreateSnapshot: a point-in-time copy of a volume.
    Create {
        /// The snapshot's name; creating the same name again is idempotent.
        name: String,
        /// The volume to snapshot.
        #[arg(long)]
        volume: String,
    },
    /// ListSnapshots, optionally of one volume.
    List {
        #[arg(long)]
        volume: Option<String>,
    },
    /// GetSnapshot.
    Get { id: String },
    /// DeleteSnapshot.
    Delete { id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum AccessModeArg {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    MultiNodeMultiWriter,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl From<AccessModeArg> for Mode {
    fn from(mode: AccessModeArg) -> Self {
        match mode {
            AccessModeArg::SingleNodeWriter => Mode::SingleNodeWriter,
            AccessModeArg::SingleNodeReaderOnly => Mode::SingleNodeReaderOnly,
            AccessModeArg::MultiNodeReaderOnly => Mode::MultiNodeReaderOnly,
            AccessModeArg::MultiNodeMultiWriter => Mode::MultiNodeMultiWriter,
            AccessModeArg::SingleNodeSingleWriter => Mode::SingleNodeSingleWriter,
            AccessModeArg::SingleNodeMultiWriter => Mode::SingleNodeMultiWriter,
        }
    }
}

/// Bytes, or a number with a binary suffix (K, M, G, T, optionally
/// followed by `i` and/or `B`: 1G = 1GiB = 1073741824).
pub(super) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("size {s:?} must start with a number"))?;
    let unit = suffix.trim_end_matches(['B', 'b']).trim_end_matches('i');
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("size {s:?}: unknown unit {suffix:?} (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift).filter(|&b| b <= i64::MAX as u64).ok_or_else(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("2TB"), Ok(2 << 40));
        assert!(parse_size("G").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
