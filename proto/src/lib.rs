//! Rust bindings for the Container Storage Interface (CSI) spec v1.12.0.
//!
//! Messages, enums, gRPC server traits and clients are generated at build
//! time by `tonic-prost-build` from `csi.proto` (package `csi.v1`). Everything
//! lives in [`v1`] and is re-exported at the crate root. [`plugin`] holds
//! what both nbd-csi binaries report about the plugin as a whole, and
//! [`contract`] what the controller tells the node plugin (publish and
//! volume context, the `nbd://` URI) and the parameters it accepts;
//! [`metrics_endpoint`] the `GET /metrics` endpoint both serve.

/// Generated code for the `csi.v1` protobuf package.
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
pub mod v1 {
    tonic::include_proto!("csi.v1");
}

pub use v1::*;

pub mod contract;
pub mod metrics_endpoint;
pub mod plugin;
pub mod shutdown;
pub mod uds;
