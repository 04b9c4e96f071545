//! The kernel NBD driver's control requests as the attacher uses them: a
//! trait, so that the generic netlink implementation can be stood in for in
//! tests (a request that never returns, for one). The calls block — a
//! netlink request waits up to its timeout — so [`super::KernelAttacher`]
//! makes them only through [`crate::blocking::blocking`].

use std::os::fd::BorrowedFd;
use std::sync::Mutex;

use crate::error::Result;
use crate::sys::nbd::{LinkDeadListener, NbdNetlink};
use crate::sys::nbd_genl::ConnectParams;

pub trait NbdControl: std::fmt::Debug + Send + Sync + 'static {
    /// CONNECT; returns the index of the device the kernel picked.
    fn connect(&self, params: &ConnectParams<'_>) -> Result<u32>;
    /// RECONFIGURE: fresh sockets and/or a new size.
    fn reconfigure(&self, index: u32, backend_id: &str, fds: &[BorrowedFd<'_>], size: Option<u64>) -> Result<()>;
    fn disconnect(&self, index: u32) -> Result<()>;
    /// (index, connected) of one device or all of them.
    fn status(&self, index: Option<u32>) -> Result<Vec<(u32, bool)>>;
    /// A socket for LINK_DEAD notifications.
    fn link_dead_listener(&self) -> Result<LinkDeadListener>;
}

fn lock(m: &Mutex<NbdNetlink>) -> std::sync::MutexGuard<'_, NbdNetlink> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Generic netlink: one request socket, one request at a time.
impl NbdControl for Mutex<NbdNetlink> {
    fn connect(&self, params: &ConnectParams<'_>) -> Result<u32> {
        lock(self).connect(params)
    }

    fn reconfigure(&self, index: u32, backend_id: &str, fds: &[BorrowedFd<'_>], size: Option<u64>) -> Result<()> {
        lock(self).reconfigure(index, backend_id, fds, size)
    }

    fn disconnect(&self, index: u32) -> Result<()> {
        lock(self).disconnect(index)
    }

    fn status(&self, index: Option<u32>) -> Result<Vec<(u32, bool)>> {
        lock(self).status(index)
    }

    fn link_dead_listener(&self) -> Result<LinkDeadListener> {
        lock(self).link_dead_listener()
    }
}
