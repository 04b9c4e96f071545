//! `nbd-csi-controller` as a library: the CSI controller (Identity +
//! Controller over an in-process storage agent, `nbd-csi-agent`, which
//! holds the volumes and runs one NBD server per volume, or, in cluster
//! mode, over the storage nodes' agents through Kubernetes objects), the
//! operator CLI that drives a running one over its CSI endpoint,
//! `serve-file`, and the storage agent as a process of its own (`agent`).
//! The binary
//! (`main.rs`) parses [`command_line::Cli`] and runs one of them; the
//! examples and integration tests reach the same types through here.
//!
//! Public: what a caller outside the crate runs or talks to (the command
//! line, the server's entry points and endpoint, the CLI's client pieces).
//! The driver, its agent and the CSI services stay crate-private: nothing
//! outside may reach into the controller's state.

pub mod agent_role;
pub mod certs;
pub mod cli;
pub mod command_line;
pub mod serve_file;
pub mod service;

mod agent_events;
mod csi;
mod driver;
mod error;
mod events;
mod metrics;
mod nodes;
mod storage;

#[cfg(test)]
mod tests;
