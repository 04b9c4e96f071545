//! Test support for the agent's tests and for crates whose tests drive an
//! agent (feature `testing`): a minimal NBD client, and small filesystems
//! to fill.

mod fs;
mod nbd_client;

pub use fs::{Tmpfs, fill, temp_files};
pub use nbd_client::Client;
