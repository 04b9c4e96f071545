//! The kernel NBD driver through its generic netlink family.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use super::genl::GenlSocket;
use super::nbd_genl::{self, ConnectParams, FAMILY_NAME, MCAST_GROUP};
use crate::error::{Error, ErrorKind, Result};

/// A handle on the `nbd` family: one socket for requests.
#[derive(Debug)]
pub struct NbdNetlink {
    sock: GenlSocket,
    family: u16,
    group: Option<u32>,
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl NbdNetlink {
    /// Resolves the family; None when the kernel has no `nbd` family (module
    /// not loaded or a kernel before 4.12): the caller falls back to ioctls.
    pub fn open() -> Result<Option<Self>> {
        let mut sock = GenlSocket::open(REQUEST_TIMEOUT)?;
        let Some(family) = sock.resolve(FAMILY_NAME)? else { return Ok(None) };
        let group = family.groups.iter().find(|(n, _)| n == MCAST_GROUP).map(|(_, id)| *id);
        Ok(Some(Self { sock, family: family.id, group }))
    }

    /// CONNECT; returns the index of the device the kernel picked.
    pub fn connect(&mut self, params: &ConnectParams<'_>) -> Result<u32> {
        let replies = self.sock.request(&nbd_genl::connect(self.family, params), "nbd CONNECT")?;
        replies
            .iter()
            .find_map(|r| nbd_genl::parse_index(&r.attrs))
            .ok_or_else(|| Error::new(ErrorKind::Kernel, "nbd CONNECT: the kernel returned no device index"))
    }

    /// RECONFIGURE: hands fresh sockets (replacing dead ones) and/or a new
    /// size. The sockets stay the caller's; the kernel takes its own references.
    pub fn reconfigure(
        &mut self,
        index: u32,
        backend_id: &str,
        fds: &[BorrowedFd<'_>],
        size: Option<u64>,
    ) -> Result<()> {
        let req = nbd_genl::reconfigure(self.family, index, backend_id, fds, size);
        self.sock.request(&req, &format!("nbd RECONFIGURE of nbd{index}")).map(drop)
    }

    pub fn disconnect(&mut self, index: u32) -> Result<()> {
        self.sock.request(&nbd_genl::disconnect(self.family, index), &format!("nbd DISCONNECT of nbd{index}")).map(drop)
    }

    /// (index, connected) of one device or all of them.
    pub fn status(&mut self, index: Option<u32>) -> Result<Vec<(u32, bool)>> {
        let replies = self.sock.request(&nbd_genl::status(self.family, index), "nbd STATUS")?;
        Ok(replies.iter().flat_map(|r| nbd_genl::parse_status(&r.attrs)).collect())
    }

    /// A second socket subscribed to the family's multicast group, for
    /// LINK_DEAD notifications.
    pub fn link_dead_listener(&self) -> Result<LinkDeadListener> {
        let group = self.group.ok_or_else(|| Error::new(ErrorKind::Kernel, "the nbd family has no multicast group"))?;
        let sock = GenlSocket::open(Duration::ZERO)?;
        sock.join(group)?;
        Ok(LinkDeadListener { sock })
    }
}

/// Receives LINK_DEAD notifications (blocking).
#[derive(Debug)]
pub struct LinkDeadListener {
    sock: GenlSocket,
}

impl LinkDeadListener {
    /// Blocks until the kernel reports dead links; returns their device indexes.
    pub fn next(&self) -> Result<Vec<u32>> {
        loop {
            let replies = self.sock.recv_notifications()?;
            let dead: Vec<u32> = replies
                .iter()
                .filter(|r| r.cmd == nbd_genl::cmd::LINK_DEAD)
                .filter_map(|r| nbd_genl::parse_index(&r.attrs))
                .collect();
            if !dead.is_empty() {
                return Ok(dead);
            }
        }
    }
}
