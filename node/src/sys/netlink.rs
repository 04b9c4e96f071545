//! Pure encode/decode of netlink and generic netlink messages (no I/O).
//! Layouts from include/uapi/linux/netlink.h and genetlink.h; numbers are in
//! native byte order, attributes padded to 4 bytes.

/// `struct nlmsghdr`: len u32, type u16, flags u16, seq u32, pid u32.
pub const NLMSG_HDRLEN: usize = 16;
/// `struct genlmsghdr`: cmd u8, version u8, reserved u16.
pub const GENL_HDRLEN: usize = 4;
/// `struct nlattr`: len u16, type u16.
pub const NLA_HDRLEN: usize = 4;

pub const NLM_F_REQUEST: u16 = 0x1;
#[allow(dead_code)]
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLMSG_NOOP: u16 = 0x1;
pub const NLMSG_ERROR: u16 = 0x2;
pub const NLMSG_DONE: u16 = 0x3;
pub const NLA_F_NESTED: u16 = 1 << 15;
pub const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
pub const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

/// SOL_NETLINK / NETLINK_ADD_MEMBERSHIP, for joining a multicast group.
pub const SOL_NETLINK: i32 = 270;
pub const NETLINK_ADD_MEMBERSHIP: i32 = 1;

/// The generic netlink controller (include/uapi/linux/genetlink.h).
pub mod ctrl {
    pub const GENL_ID_CTRL: u16 = 0x10;
    #[allow(dead_code)]
    pub const CMD_NEWFAMILY: u8 = 1;
    pub const CMD_GETFAMILY: u8 = 3;
    pub const ATTR_FAMILY_ID: u16 = 1;
    pub const ATTR_FAMILY_NAME: u16 = 2;
    pub const ATTR_MCAST_GROUPS: u16 = 7;
    pub const ATTR_MCAST_GRP_NAME: u16 = 1;
    pub const ATTR_MCAST_GRP_ID: u16 = 2;
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Builds a list of attributes; nested lists are built with [`Attrs::nested`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Attrs(Vec<u8>);

impl Attrs {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = NLA_HDRLEN + payload.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.0.resize(align4(self.0.len()), 0);
        self
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub fn u8(&mut self, kind: u16, v: u8) -> &mut Self {
        self.put(kind, &[v])
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub fn u16(&mut self, kind: u16, v: u16) -> &mut Self {
        self.put(kind, &v.to_ne_bytes())
    }

    pub fn u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.put(kind, &v.to_ne_bytes())
    }

    pub fn u64(&mut self, kind: u16, v: u64) -> &mut Self {
        self.put(kind, &v.to_ne_bytes())
    }

    /// A NUL-terminated string, as NLA_STRING / NLA_NUL_STRING expect.
    pub fn string(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut bytes = Vec::with_capacity(s.len() + 1);
        bytes.extend_from_slice(s.as_bytes());
        bytes.push(0);
        self.put(kind, &bytes)
    }

    pub fn nested(&mut self, kind: u16, inner: &Attrs) -> &mut Self {
        self.put(kind | NLA_F_NESTED, &inner.0)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A generic netlink request: header fields and attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenlRequest {
    pub family: u16,
    pub cmd: u8,
    pub version: u8,
    pub flags: u16,
    pub attrs: Attrs,
}

impl GenlRequest {
    pub fn encode(&self, seq: u32, pid: u32) -> Vec<u8> {
        let len = NLMSG_HDRLEN + GENL_HDRLEN + self.attrs.bytes().len();
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.extend_from_slice(&self.family.to_ne_bytes());
        out.extend_from_slice(&self.flags.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&pid.to_ne_bytes());
        out.extend_from_slice(&[self.cmd, self.version, 0, 0]);
        out.extend_from_slice(self.attrs.bytes());
        out
    }
}

/// One message out of a netlink datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// NLMSG_ERROR: 0 is an acknowledgement, otherwise a negative errno.
    Error {
        seq: u32,
        errno: i32,
    },
    Done {
        seq: u32,
    },
    /// A generic netlink message of family `kind`.
    Genl {
        kind: u16,
        seq: u32,
        cmd: u8,
        attrs: &'a [u8],
    },
    Other {
        kind: u16,
        seq: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed netlink message: {0}")]
pub struct Malformed(pub &'static str);

fn ne_u16(b: &[u8]) -> u16 {
    u16::from_ne_bytes([b[0], b[1]])
}

fn ne_u32(b: &[u8]) -> u32 {
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

/// Splits a received datagram into its messages.
pub fn parse_messages(mut buf: &[u8]) -> Result<Vec<Message<'_>>, Malformed> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = ne_u32(buf) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(Malformed("message length"));
        }
        let kind = ne_u16(&buf[4..]);
        let seq = ne_u32(&buf[8..]);
        let body = &buf[NLMSG_HDRLEN..len];
        out.push(match kind {
            NLMSG_ERROR => {
                if body.len() < 4 {
                    return Err(Malformed("short error message"));
                }
                Message::Error { seq, errno: ne_u32(body) as i32 }
            }
            NLMSG_DONE => Message::Done { seq },
            NLMSG_NOOP => Message::Other { kind, seq },
            k if k >= ctrl::GENL_ID_CTRL => {
                if body.len() < GENL_HDRLEN {
                    return Err(Malformed("short generic netlink header"));
                }
                Message::Genl { kind, seq, cmd: body[0], attrs: &body[GENL_HDRLEN..] }
            }
            _ => Message::Other { kind, seq },
        });
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

/// Iterates over `(type without flags, payload)` of an attribute list.
pub fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < NLA_HDRLEN {
            return None;
        }
        let len = ne_u16(buf) as usize;
        if len < NLA_HDRLEN || len > buf.len() {
            buf = &[];
            return None;
        }
        let item = (ne_u16(&buf[2..]) & NLA_TYPE_MASK, &buf[NLA_HDRLEN..len]);
        buf = &buf[align4(len).min(buf.len())..];
        Some(item)
    })
}

pub fn find_attr(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(buf).find(|(k, _)| *k == kind).map(|(_, v)| v)
}

pub fn attr_u8(v: &[u8]) -> Option<u8> {
    v.first().copied()
}

pub fn attr_u16(v: &[u8]) -> Option<u16> {
    (v.len() >= 2).then(|| ne_u16(v))
}

pub fn attr_u32(v: &[u8]) -> Option<u32> {
    (v.len() >= 4).then(|| ne_u32(v))
}

pub fn attr_string(v: &[u8]) -> String {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

/// CTRL_CMD_GETFAMILY for `name`.
pub fn get_family(name: &str) -> GenlRequest {
    let mut attrs = Attrs::new();
    attrs.string(ctrl::ATTR_FAMILY_NAME, name);
    GenlRequest { family: ctrl::GENL_ID_CTRL, cmd: ctrl::CMD_GETFAMILY, version: 1, flags: NLM_F_REQUEST, attrs }
}

/// What CTRL_CMD_NEWFAMILY tells about a family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    pub id: u16,
    /// (name, id) of each multicast group.
    pub groups: Vec<(String, u32)>,
}

pub fn parse_family(attrs_buf: &[u8]) -> Option<Family> {
    let id = find_attr(attrs_buf, ctrl::ATTR_FAMILY_ID).and_then(attr_u16)?;
    let mut groups = Vec::new();
    if let Some(list) = find_attr(attrs_buf, ctrl::ATTR_MCAST_GROUPS) {
        for (_, group) in attrs(list) {
            let name = find_attr(group, ctrl::ATTR_MCAST_GRP_NAME).map(attr_string);
            let gid = find_attr(group, ctrl::ATTR_MCAST_GRP_ID).and_then(attr_u32);
            if let (Some(name), Some(gid)) = (name, gid) {
                groups.push((name, gid));
            }
        }
    }
    Some(Family { id, groups })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::libc;

    #[test]
    fn constants_match_the_kernel_headers() {
        assert_eq!(NLM_F_REQUEST as i32, libc::NLM_F_REQUEST);
        assert_eq!(NLM_F_MULTI as i32, libc::NLM_F_MULTI);
        assert_eq!(NLM_F_ACK as i32, libc::NLM_F_ACK);
        assert_eq!(NLMSG_NOOP as i32, libc::NLMSG_NOOP);
        assert_eq!(NLMSG_ERROR as i32, libc::NLMSG_ERROR);
        assert_eq!(NLMSG_DONE as i32, libc::NLMSG_DONE);
        assert_eq!(NLA_F_NESTED as i32, libc::NLA_F_NESTED);
        assert_eq!(NLA_F_NET_BYTEORDER as i32, libc::NLA_F_NET_BYTEORDER);
        assert_eq!(SOL_NETLINK, libc::SOL_NETLINK);
        assert_eq!(NETLINK_ADD_MEMBERSHIP, libc::NETLINK_ADD_MEMBERSHIP);
        assert_eq!(ctrl::GENL_ID_CTRL as i32, libc::GENL_ID_CTRL);
        assert_eq!(ctrl::CMD_NEWFAMILY as i32, libc::CTRL_CMD_NEWFAMILY);
        assert_eq!(ctrl::CMD_GETFAMILY as i32, libc::CTRL_CMD_GETFAMILY);
        assert_eq!(ctrl::ATTR_FAMILY_ID as i32, libc::CTRL_ATTR_FAMILY_ID);
        assert_eq!(ctrl::ATTR_FAMILY_NAME as i32, libc::CTRL_ATTR_FAMILY_NAME);
        assert_eq!(ctrl::ATTR_MCAST_GROUPS as i32, libc::CTRL_ATTR_MCAST_GROUPS);
        assert_eq!(ctrl::ATTR_MCAST_GRP_NAME as i32, libc::CTRL_ATTR_MCAST_GRP_NAME);
        assert_eq!(ctrl::ATTR_MCAST_GRP_ID as i32, libc::CTRL_ATTR_MCAST_GRP_ID);
        assert_eq!(NLMSG_HDRLEN, std::mem::size_of::<libc::nlmsghdr>());
        assert_eq!(NLA_HDRLEN, std::mem::size_of::<libc::nlattr>());
        assert_eq!(GENL_HDRLEN, std::mem::size_of::<libc::genlmsghdr>());
    }

    #[test]
    fn get_family_encodes_byte_for_byte() {
        let msg = get_family("nbd").encode(7, 0);
        let mut expected = Vec::new();
        expected.extend_from_slice(&28u32.to_ne_bytes()); // 16 + 4 + attr(4 + "nbd\0")
        expected.extend_from_slice(&0x10u16.to_ne_bytes());
        expected.extend_from_slice(&1u16.to_ne_bytes());
        expected.extend_from_slice(&7u32.to_ne_bytes());
        expected.extend_from_slice(&0u32.to_ne_bytes());
        expected.extend_from_slice(&[3, 1, 0, 0]);
        expected.extend_from_slice(&8u16.to_ne_bytes());
        expected.extend_from_slice(&2u16.to_ne_bytes());
        expected.extend_from_slice(b"nbd\0");
        assert_eq!(msg, expected);
    }

    #[test]
    fn attributes_are_padded_and_nested_flagged() {
        let mut inner = Attrs::new();
        inner.u8(2, 1);
        let mut outer = Attrs::new();
        outer.nested(9, &inner).u64(2, 5);
        let b = outer.bytes();
        assert_eq!(b.len(), 4 + 8 + 12);
        assert_eq!(ne_u16(&b[2..]), 9 | NLA_F_NESTED);
        let parsed: Vec<_> = attrs(b).collect();
        assert_eq!(parsed[0].0, 9);
        assert_eq!(parsed[1], (2, &5u64.to_ne_bytes()[..]));
        assert_eq!(attrs(parsed[0].1).next(), Some((2, &[1u8][..])));
    }

    fn datagram(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn parses_errors_acks_and_family_replies() {
        let mut group = Attrs::new();
        group.string(ctrl::ATTR_MCAST_GRP_NAME, "nbd_mc_group").u32(ctrl::ATTR_MCAST_GRP_ID, 33);
        let mut groups = Attrs::new();
        groups.nested(1, &group);
        let mut fam = Attrs::new();
        fam.string(ctrl::ATTR_FAMILY_NAME, "nbd")
            .u16(ctrl::ATTR_FAMILY_ID, 27)
            .nested(ctrl::ATTR_MCAST_GROUPS, &groups);
        let mut body = vec![ctrl::CMD_NEWFAMILY, 2, 0, 0];
        body.extend_from_slice(fam.bytes());
        let mut buf = datagram(ctrl::GENL_ID_CTRL, 4, &body);
        let mut err = (-22i32).to_ne_bytes().to_vec();
        err.extend_from_slice(&[0u8; 16]);
        buf.extend(datagram(NLMSG_ERROR, 4, &err));
        let msgs = parse_messages(&buf).unwrap();
        assert_eq!(msgs.len(), 2);
        let Message::Genl { kind, cmd, attrs, .. } = &msgs[0] else { panic!("{msgs:?}") };
        assert_eq!((*kind, *cmd), (ctrl::GENL_ID_CTRL, ctrl::CMD_NEWFAMILY));
        let family = parse_family(attrs).unwrap();
        assert_eq!(family, Family { id: 27, groups: vec![("nbd_mc_group".into(), 33)] });
        assert_eq!(msgs[1], Message::Error { seq: 4, errno: -22 });
    }

    #[test]
    fn rejects_truncated_messages() {
        let mut buf = datagram(NLMSG_ERROR, 1, &[0; 20]);
        buf.truncate(20);
        assert!(parse_messages(&buf).is_err());
        let mut bad = Attrs::new();
        bad.u32(1, 1);
        let mut b = bad.bytes().to_vec();
        b[0] = 200;
        assert_eq!(attrs(&b).count(), 0);
    }
}
