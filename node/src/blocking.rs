//! The one door from async code to blocking calls. `sys/` stays plain
//! synchronous code; every syscall that can wait (a netlink request up to
//! its timeout, mount(2)/umount(2), ioctls, fsync, reading a device) is
//! called through [`blocking`] from the async paths, so that a stuck kernel
//! or server never holds a runtime worker and Probe, NodeGetCapabilities
//! and the other volumes' calls keep being answered.

use crate::error::{Error, ErrorKind, Result};

/// Runs `f` on tokio's blocking pool and waits for it.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::new(ErrorKind::Io, format!("blocking task failed: {e}")))?
}
