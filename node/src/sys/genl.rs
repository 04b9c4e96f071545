//! A blocking generic netlink socket: requests with acknowledgements, family
//! resolution through the controller, multicast subscription.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, getsockname, recv, send, setsockopt,
    sockopt,
};
use nix::sys::time::TimeVal;

use super::netlink::{self, Family, GenlRequest, Message};
use crate::error::{Context, Error, ErrorKind, Result};

/// One generic netlink message addressed to us: command and attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub cmd: u8,
    pub attrs: Vec<u8>,
}

#[derive(Debug)]
pub struct GenlSocket {
    fd: OwnedFd,
    pid: u32,
    seq: u32,
}

const RECV_BUF: usize = 64 * 1024;

impl GenlSocket {
    /// Opens and binds a NETLINK_GENERIC socket. Replies not seen within
    /// `timeout` fail the request instead of hanging it.
    pub fn open(timeout: Duration) -> Result<Self> {
        let fd = nix::sys::socket::socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkGeneric,
        )
        .ctx(ErrorKind::Kernel, || "opening a generic netlink socket")?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).ctx(ErrorKind::Kernel, || "binding the netlink socket")?;
        let addr: NetlinkAddr = getsockname(fd.as_raw_fd()).ctx(ErrorKind::Kernel, || "netlink getsockname")?;
        if !timeout.is_zero() {
            setsockopt(
                &fd,
                sockopt::ReceiveTimeout,
                &TimeVal::from(nix::libc::timeval {
                    tv_sec: timeout.as_secs() as _,
                    tv_usec: timeout.subsec_micros() as _,
                }),
            )
            .ctx(ErrorKind::Kernel, || "netlink SO_RCVTIMEO")?;
        }
        Ok(Self { fd, pid: addr.pid(), seq: 1 })
    }

    /// Sends `req` and collects the generic netlink replies until the
    /// acknowledgement; a negative errno in it becomes a Kernel error.
    pub fn request(&mut self, req: &GenlRequest, what: &str) -> Result<Vec<Reply>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let msg = req.encode(seq, self.pid);
        send(self.fd.as_raw_fd(), &msg, MsgFlags::empty()).ctx(ErrorKind::Kernel, || format!("sending {what}"))?;
        let mut replies = Vec::new();
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .ctx(ErrorKind::Kernel, || format!("waiting for the reply to {what}"))?;
            let messages = netlink::parse_messages(&buf[..n]).ctx(ErrorKind::Kernel, || what.to_owned())?;
            for m in messages {
                match m {
                    Message::Error { seq: s, errno } if s == seq => {
                        if errno == 0 {
                            return Ok(replies);
                        }
                        return Err(Error::with_source(ErrorKind::Kernel, what.to_owned(), Errno::from_raw(-errno)));
                    }
                    Message::Genl { seq: s, cmd, attrs, .. } if s == seq => {
                        replies.push(Reply { cmd, attrs: attrs.to_vec() })
                    }
                    Message::Done { seq: s } if s == seq => return Ok(replies),
                    _ => {}
                }
            }
        }
    }

    /// Resolves a family by name; None when the kernel does not know it
    /// (module not loaded, or too old).
    pub fn resolve(&mut self, name: &str) -> Result<Option<Family>> {
        let mut req = netlink::get_family(name);
        req.flags |= netlink::NLM_F_ACK;
        match self.request(&req, &format!("resolving generic netlink family {name:?}")) {
            Ok(replies) => Ok(replies.iter().find_map(|r| netlink::parse_family(&r.attrs))),
            Err(e) if e.errno() == Some(Errno::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn join(&self, group: u32) -> Result<()> {
        let value: nix::libc::c_int = group as nix::libc::c_int;
        // SAFETY: the descriptor is an open netlink socket owned by self;
        // optval points to a live c_int and optlen is its exact size, which
        // is what NETLINK_ADD_MEMBERSHIP reads.
        let rc = unsafe {
            nix::libc::setsockopt(
                self.fd.as_raw_fd(),
                netlink::SOL_NETLINK,
                netlink::NETLINK_ADD_MEMBERSHIP,
                (&raw const value).cast(),
                std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
            )
        };
        Errno::result(rc).map(drop).ctx(ErrorKind::Kernel, || format!("joining multicast group {group}"))
    }

    /// Blocks for the next datagram and returns its generic netlink messages
    /// (multicast notifications carry sequence number 0).
    pub fn recv_notifications(&self) -> Result<Vec<Reply>> {
        let mut buf = vec![0u8; RECV_BUF];
        let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
            .ctx(ErrorKind::Kernel, || "receiving netlink notifications")?;
        let messages = netlink::parse_messages(&buf[..n]).ctx(ErrorKind::Kernel, || "netlink notification")?;
        Ok(messages
            .into_iter()
            .filter_map(|m| match m {
                Message::Genl { cmd, attrs, .. } => Some(Reply { cmd, attrs: attrs.to_vec() }),
                _ => None,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generic netlink controller exists on every Linux kernel, the
    /// host's included: resolving it exercises the socket code for real.
    #[test]
    fn resolves_the_controller_family_itself() {
        let mut sock = GenlSocket::open(Duration::from_secs(5)).unwrap();
        let family = sock.resolve("nlctrl").unwrap().expect("nlctrl always exists");
        assert_eq!(family.id, netlink::ctrl::GENL_ID_CTRL);
        assert!(family.groups.iter().any(|(name, _)| name == "notify"));
    }

    #[test]
    fn unknown_family_is_none() {
        let mut sock = GenlSocket::open(Duration::from_secs(5)).unwrap();
        assert_eq!(sock.resolve("nbdcsi-none").unwrap(), None);
    }
}
