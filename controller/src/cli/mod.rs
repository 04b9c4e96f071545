//! The operator CLI: `nbd-csi-controller volume …`, `snapshot …` and
//! `info`, thin clients of the CSI RPCs over the endpoint a running
//! controller serves, so a volume can be created, served and inspected
//! without Kubernetes.
//!
//! Without `--endpoint` the client uses the server's own default,
//! `unix://<data-dir>/csi.sock` with `--data-dir` defaulting to
//! `nbd-csi-data` in the working directory: a server started with no
//! arguments and a client started with none, in the same directory, meet.

mod args;
mod commands;
mod connect;
mod render;
mod requests;

pub use args::{ClientArgs, SnapshotArgs, VolumeArgs};
pub use commands::{info, snapshot, volume};
pub use connect::connect;
pub use requests::{all_snapshots, all_volumes, capability};
