//! Test support for the agent's tests and for crates whose tests drive an
//! agent (feature `testing`): a minimal NBD client, small filesystems to
//! fill, and a bounded wait for asynchronous state.

mod eventually;
mod fs;
mod nbd_client;

pub use eventually::eventually;
pub use fs::{Tmpfs, fill, temp_files};
pub use nbd_client::Client;
