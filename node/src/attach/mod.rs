//! Attaching exports as /dev/nbdX: the [`Attacher`] trait and its kernel
//! implementation (generic netlink behind [`control::NbdControl`]; ioctls
//! only where netlink is missing). Whatever can block in the kernel is
//! async here. An `nbds://` export's sockets reach the kernel with kernel
//! TLS on them ([`tls`], [`sockets`]).

pub mod backend;
mod control;
pub mod devices;
mod kernel;
pub mod sockets;
pub mod tls;

use std::path::PathBuf;
use std::time::Duration;

#[cfg(test)]
pub use control::NbdControl;
pub use kernel::KernelAttacher;

use crate::error::Result;
use crate::uri::NbdUri;

/// What to attach and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachSpec {
    pub uri: NbdUri,
    /// BACKEND_IDENTIFIER ([`backend`]: the volume and the node); how the
    /// device is found again.
    pub backend_id: String,
    /// Connections wanted when the server allows several.
    pub connections: usize,
    /// Per-request timeout; a request that takes longer marks its socket dead.
    pub timeout: Duration,
    /// How long I/O waits for a reconnect once every socket is dead.
    pub dead_conn_timeout: Duration,
}

/// A configured device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub index: u32,
    pub size: u64,
    pub transmission_flags: u16,
    pub connections: usize,
}

impl Attached {
    pub fn device(&self) -> PathBuf {
        devices::device_path(self.index)
    }
}

/// Attaches, heals, resizes and detaches NBD devices.
pub trait Attacher: Send + Sync {
    /// Handshakes, opens the sockets and has the kernel allocate a device.
    fn attach(&self, spec: &AttachSpec) -> impl Future<Output = Result<Attached>> + Send;
    /// Hands fresh sockets to a device whose connections died (RECONFIGURE);
    /// returns the number of sockets offered.
    fn reconnect(&self, index: u32, spec: &AttachSpec) -> impl Future<Output = Result<usize>> + Send;
    /// Tells the kernel the export's current size; returns it.
    fn resize(&self, index: u32, spec: &AttachSpec) -> impl Future<Output = Result<u64>> + Send;
    /// Disconnects the device (idempotent).
    fn detach(&self, index: u32) -> impl Future<Output = Result<()>> + Send;
    /// The device attached with this backend identifier (from sysfs or
    /// memory: nothing that waits).
    fn find(&self, backend_id: &str) -> Result<Option<u32>>;
    /// Whether the kernel still has the device configured.
    fn connected(&self, index: u32) -> impl Future<Output = Result<bool>> + Send;
    /// Every (index, backend identifier) the kernel has.
    fn list(&self) -> Result<Vec<(u32, String)>>;
    /// Whether anything uses the device: a mount of it, or an exclusive
    /// holder (a filesystem, device-mapper, an O_EXCL opener).
    fn in_use(&self, index: u32) -> impl Future<Output = Result<bool>> + Send;
}
