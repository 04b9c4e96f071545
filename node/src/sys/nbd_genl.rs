//! The kernel NBD driver's generic netlink family: numbers from
//! include/uapi/linux/nbd-netlink.h and nbd.h, and pure message builders.

use std::os::fd::{AsRawFd, BorrowedFd};

use super::netlink::{Attrs, GenlRequest, NLM_F_ACK, NLM_F_REQUEST, attr_u8, attr_u32, attrs, find_attr};

pub const FAMILY_NAME: &str = "nbd";
pub const VERSION: u8 = 1;
pub const MCAST_GROUP: &str = "nbd_mc_group";

pub mod cmd {
    pub const CONNECT: u8 = 1;
    pub const DISCONNECT: u8 = 2;
    pub const RECONFIGURE: u8 = 3;
    pub const LINK_DEAD: u8 = 4;
    pub const STATUS: u8 = 5;
}

pub mod attr {
    pub const INDEX: u16 = 1;
    pub const SIZE_BYTES: u16 = 2;
    pub const BLOCK_SIZE_BYTES: u16 = 3;
    pub const TIMEOUT: u16 = 4;
    pub const SERVER_FLAGS: u16 = 5;
    pub const CLIENT_FLAGS: u16 = 6;
    pub const SOCKETS: u16 = 7;
    pub const DEAD_CONN_TIMEOUT: u16 = 8;
    pub const DEVICE_LIST: u16 = 9;
    pub const BACKEND_IDENTIFIER: u16 = 10;
    /// Inside SOCKETS: one SOCK_ITEM per socket, holding SOCK_FD.
    pub const SOCK_ITEM: u16 = 1;
    pub const SOCK_FD: u16 = 1;
    /// Inside DEVICE_LIST: one DEVICE_ITEM per device.
    pub const DEVICE_ITEM: u16 = 1;
    pub const DEVICE_INDEX: u16 = 1;
    pub const DEVICE_CONNECTED: u16 = 2;
}

/// NBD_ATTR_CLIENT_FLAGS bits (nbd.h, NBD_CFLAG_*). Neither is used: devices
/// survive their last close and stay listed after DISCONNECT.
#[allow(dead_code)]
pub mod client_flags {
    pub const DESTROY_ON_DISCONNECT: u64 = 1 << 0;
    pub const DISCONNECT_ON_CLOSE: u64 = 1 << 1;
}

/// Everything CONNECT needs. `server_flags` are the export's transmission
/// flags exactly as the server sent them. The sockets stay the caller's: the
/// message carries their numbers, and the kernel takes its own reference on
/// each while handling it, so they need only outlive the request.
#[derive(Debug, Clone)]
pub struct ConnectParams<'fd> {
    pub sockets: Vec<BorrowedFd<'fd>>,
    pub size_bytes: u64,
    pub block_size: u64,
    pub server_flags: u16,
    pub client_flags: u64,
    pub timeout_secs: u64,
    pub dead_conn_timeout_secs: u64,
    pub backend_id: String,
}

fn sockets(fds: &[BorrowedFd<'_>]) -> Attrs {
    let mut list = Attrs::new();
    for fd in fds {
        let mut item = Attrs::new();
        // An open descriptor is never negative: the cast keeps its number.
        item.u32(attr::SOCK_FD, fd.as_raw_fd() as u32);
        list.nested(attr::SOCK_ITEM, &item);
    }
    list
}

fn request(family: u16, cmd: u8, attrs: Attrs) -> GenlRequest {
    GenlRequest { family, cmd, version: VERSION, flags: NLM_F_REQUEST | NLM_F_ACK, attrs }
}

/// CONNECT without INDEX: the kernel picks or creates a free device and
/// answers with its INDEX.
pub fn connect(family: u16, p: &ConnectParams<'_>) -> GenlRequest {
    let mut a = Attrs::new();
    a.u64(attr::SIZE_BYTES, p.size_bytes)
        .u64(attr::BLOCK_SIZE_BYTES, p.block_size)
        .u64(attr::SERVER_FLAGS, u64::from(p.server_flags))
        .u64(attr::CLIENT_FLAGS, p.client_flags)
        .u64(attr::TIMEOUT, p.timeout_secs)
        .u64(attr::DEAD_CONN_TIMEOUT, p.dead_conn_timeout_secs)
        .string(attr::BACKEND_IDENTIFIER, &p.backend_id)
        .nested(attr::SOCKETS, &sockets(&p.sockets));
    request(family, cmd::CONNECT, a)
}

/// RECONFIGURE: fresh sockets replace dead ones (surplus ones are ignored),
/// and SIZE_BYTES, when given, resizes the device. BACKEND_IDENTIFIER must
/// match the one given at CONNECT.
pub fn reconfigure(
    family: u16,
    index: u32,
    backend_id: &str,
    fds: &[BorrowedFd<'_>],
    size_bytes: Option<u64>,
) -> GenlRequest {
    let mut a = Attrs::new();
    a.u32(attr::INDEX, index).string(attr::BACKEND_IDENTIFIER, backend_id);
    if let Some(size) = size_bytes {
        a.u64(attr::SIZE_BYTES, size);
    }
    if !fds.is_empty() {
        a.nested(attr::SOCKETS, &sockets(fds));
    }
    request(family, cmd::RECONFIGURE, a)
}

pub fn disconnect(family: u16, index: u32) -> GenlRequest {
    let mut a = Attrs::new();
    a.u32(attr::INDEX, index);
    request(family, cmd::DISCONNECT, a)
}

/// STATUS of one device, or of all when `index` is None.
pub fn status(family: u16, index: Option<u32>) -> GenlRequest {
    let mut a = Attrs::new();
    if let Some(i) = index {
        a.u32(attr::INDEX, i);
    }
    request(family, cmd::STATUS, a)
}

/// INDEX out of a CONNECT reply or a LINK_DEAD notification.
pub fn parse_index(buf: &[u8]) -> Option<u32> {
    find_attr(buf, attr::INDEX).and_then(attr_u32)
}

/// (index, connected) for each device in a STATUS reply.
pub fn parse_status(buf: &[u8]) -> Vec<(u32, bool)> {
    let Some(list) = find_attr(buf, attr::DEVICE_LIST) else { return Vec::new() };
    attrs(list)
        .filter(|(k, _)| *k == attr::DEVICE_ITEM)
        .filter_map(|(_, item)| {
            let index = find_attr(item, attr::DEVICE_INDEX).and_then(attr_u32)?;
            let connected = find_attr(item, attr::DEVICE_CONNECTED).and_then(attr_u8).unwrap_or(0) != 0;
            Some((index, connected))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    use super::super::netlink::{NLA_F_NESTED, attr_string, attr_u16};
    use super::*;

    #[test]
    fn numbers_match_nbd_netlink_h() {
        // enum { NBD_CMD_UNSPEC, CONNECT, DISCONNECT, RECONFIGURE, LINK_DEAD, STATUS }
        assert_eq!([cmd::CONNECT, cmd::DISCONNECT, cmd::RECONFIGURE, cmd::LINK_DEAD, cmd::STATUS], [1, 2, 3, 4, 5]);
        // enum { NBD_ATTR_UNSPEC, INDEX, SIZE_BYTES, BLOCK_SIZE_BYTES, TIMEOUT, SERVER_FLAGS,
        //        CLIENT_FLAGS, SOCKETS, DEAD_CONN_TIMEOUT, DEVICE_LIST, BACKEND_IDENTIFIER }
        let attrs = [
            attr::INDEX,
            attr::SIZE_BYTES,
            attr::BLOCK_SIZE_BYTES,
            attr::TIMEOUT,
            attr::SERVER_FLAGS,
            attr::CLIENT_FLAGS,
            attr::SOCKETS,
            attr::DEAD_CONN_TIMEOUT,
            attr::DEVICE_LIST,
            attr::BACKEND_IDENTIFIER,
        ];
        assert_eq!(attrs, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!((attr::SOCK_ITEM, attr::SOCK_FD), (1, 1));
        assert_eq!((attr::DEVICE_ITEM, attr::DEVICE_INDEX, attr::DEVICE_CONNECTED), (1, 1, 2));
        assert_eq!((client_flags::DESTROY_ON_DISCONNECT, client_flags::DISCONNECT_ON_CLOSE), (1, 2));
        assert_eq!((FAMILY_NAME, VERSION, MCAST_GROUP), ("nbd", 1, "nbd_mc_group"));
    }

    /// Two real, open sockets: the messages carry descriptor numbers the
    /// kernel will look up, so the tests use descriptors that exist.
    fn socket_pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    fn number(fd: &impl AsRawFd) -> u32 {
        u32::try_from(fd.as_raw_fd()).unwrap()
    }

    fn params<'fd>(sockets: &[BorrowedFd<'fd>]) -> ConnectParams<'fd> {
        ConnectParams {
            sockets: sockets.to_vec(),
            size_bytes: 64 << 20,
            block_size: 4096,
            server_flags: 0b101_0110_1101,
            client_flags: 0,
            timeout_secs: 30,
            dead_conn_timeout_secs: 120,
            backend_id: "vol-1".into(),
        }
    }

    fn u64_of(buf: &[u8], kind: u16) -> u64 {
        u64::from_ne_bytes(find_attr(buf, kind).unwrap().try_into().unwrap())
    }

    #[test]
    fn connect_carries_every_attribute_and_no_index() {
        let (first, second) = socket_pair();
        let req = connect(21, &params(&[first.as_fd(), second.as_fd()]));
        assert_eq!((req.family, req.cmd, req.version), (21, 1, 1));
        assert_eq!(req.flags, NLM_F_REQUEST | NLM_F_ACK);
        let a = req.attrs.bytes();
        assert!(find_attr(a, attr::INDEX).is_none(), "the kernel allocates the device");
        assert_eq!(u64_of(a, attr::SIZE_BYTES), 64 << 20);
        assert_eq!(u64_of(a, attr::BLOCK_SIZE_BYTES), 4096);
        // The server's flags pass through unchanged: FLUSH, FUA, TRIM, WRITE_ZEROES reach it.
        assert_eq!(u64_of(a, attr::SERVER_FLAGS), 0b101_0110_1101);
        assert_eq!(u64_of(a, attr::TIMEOUT), 30);
        assert_eq!(u64_of(a, attr::DEAD_CONN_TIMEOUT), 120);
        assert_eq!(u64_of(a, attr::CLIENT_FLAGS), 0);
        assert_eq!(attr_string(find_attr(a, attr::BACKEND_IDENTIFIER).unwrap()), "vol-1");
        assert_eq!(find_attr(a, attr::BACKEND_IDENTIFIER).unwrap(), b"vol-1\0");
        let socks: Vec<_> = attrs(find_attr(a, attr::SOCKETS).unwrap())
            .map(|(k, item)| (k, attr_u32(find_attr(item, attr::SOCK_FD).unwrap()).unwrap()))
            .collect();
        assert_eq!(socks, [(1, number(&first)), (1, number(&second))]);
        // SOCKETS and its items are marked nested.
        let raw = a.windows(2).any(|w| u16::from_ne_bytes([w[0], w[1]]) == attr::SOCKETS | NLA_F_NESTED);
        assert!(raw);
    }

    #[test]
    fn reconfigure_disconnect_status() {
        let (sock, _peer) = socket_pair();
        let r = reconfigure(21, 3, "vol-1", &[sock.as_fd()], Some(1 << 30));
        assert_eq!(r.cmd, cmd::RECONFIGURE);
        let items: Vec<_> = attrs(find_attr(r.attrs.bytes(), attr::SOCKETS).unwrap())
            .map(|(_, item)| attr_u32(find_attr(item, attr::SOCK_FD).unwrap()).unwrap())
            .collect();
        assert_eq!(items, [number(&sock)]);
        assert_eq!(parse_index(r.attrs.bytes()), Some(3));
        assert_eq!(u64_of(r.attrs.bytes(), attr::SIZE_BYTES), 1 << 30);
        let r = reconfigure(21, 3, "vol-1", &[], None);
        assert!(find_attr(r.attrs.bytes(), attr::SOCKETS).is_none());
        assert!(find_attr(r.attrs.bytes(), attr::SIZE_BYTES).is_none());
        let d = disconnect(21, 4);
        assert_eq!((d.cmd, parse_index(d.attrs.bytes())), (cmd::DISCONNECT, Some(4)));
        assert_eq!(status(21, None).attrs.bytes(), b"");
        assert_eq!(status(21, Some(2)).cmd, cmd::STATUS);
        assert_eq!(attr_u16(&2u16.to_ne_bytes()), Some(2));
    }

    #[test]
    fn parses_a_status_reply() {
        let mut list = Attrs::new();
        for (i, c) in [(0u32, 1u8), (7, 0)] {
            let mut item = Attrs::new();
            item.u32(attr::DEVICE_INDEX, i).u8(attr::DEVICE_CONNECTED, c);
            list.nested(attr::DEVICE_ITEM, &item);
        }
        let mut reply = Attrs::new();
        reply.nested(attr::DEVICE_LIST, &list);
        assert_eq!(parse_status(reply.bytes()), [(0, true), (7, false)]);
        assert!(parse_status(b"").is_empty());
    }
}
