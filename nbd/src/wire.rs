//! Pure encode/decode of NBD messages. No I/O here: every function works on
//! byte slices, so it is exhaustively unit- and property-tested.
//!
//! Decoders never trust a length they read: strings and lists are checked
//! against the bytes actually present and against [`limits`] before anything
//! is allocated.
//!
//! Flag fields decode into their [`crate::flags`] types with every bit kept,
//! known or not (`from_bits_retain`): what a bit the spec does not define
//! means is for the receiver to decide (ignore it, or refuse the request),
//! so decoding a message and encoding it again gives back the same bytes.

use crate::consts::{limits, magic, reply_type};
use crate::flags::{CommandFlags, HandshakeFlags, ReplyFlags, TransmissionFlags};

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message truncated: needed {needed} more bytes")]
    Truncated { needed: usize },
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    BadMagic { expected: u64, found: u64 },
    #[error("{what} length {len} exceeds the limit of {limit}")]
    TooLong { what: &'static str, len: u64, limit: u64 },
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("{0} bytes left over after the message")]
    TrailingBytes(usize),
}

/// Bounds-checked big-endian reader over a byte slice.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if n > self.buf.len() {
            return Err(WireError::Truncated { needed: n - self.buf.len() });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub fn u16(&mut self) -> Result<u16, WireError> {
        self.array().map(u16::from_be_bytes)
    }

    pub fn u32(&mut self) -> Result<u32, WireError> {
        self.array().map(u32::from_be_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, WireError> {
        self.array().map(u64::from_be_bytes)
    }

    /// A string of `len` bytes; `len` is checked against the limit and the
    /// bytes present before it is used.
    pub fn string(&mut self, len: u64, what: &'static str) -> Result<String, WireError> {
        check_len(what, len, limits::MAX_STRING_LEN.into())?;
        let raw = self.bytes(len as usize)?;
        std::str::from_utf8(raw).map(str::to_owned).map_err(|_| WireError::NotUtf8(what))
    }

    /// A u32 length followed by that many bytes of string.
    pub fn prefixed_string(&mut self, what: &'static str) -> Result<String, WireError> {
        let len = self.u32()?;
        self.string(len.into(), what)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub fn finish(self) -> Result<(), WireError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(WireError::TrailingBytes(n)),
        }
    }
}

pub fn check_len(what: &'static str, len: u64, limit: u64) -> Result<(), WireError> {
    if len > limit { Err(WireError::TooLong { what, len, limit }) } else { Ok(()) }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

// ---------------------------------------------------------------- handshake

/// The server's first message: NBDMAGIC, IHAVEOPT, handshake flags (18 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    pub handshake_flags: HandshakeFlags,
}

impl Greeting {
    pub const SIZE: usize = 18;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        out[..8].copy_from_slice(&magic::NBDMAGIC.to_be_bytes());
        out[8..16].copy_from_slice(&magic::IHAVEOPT.to_be_bytes());
        out[16..].copy_from_slice(&self.handshake_flags.bits().to_be_bytes());
        out
    }

    pub fn decode(buf: &[u8; Self::SIZE]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        expect_magic(r.u64()?, magic::NBDMAGIC)?;
        expect_magic(r.u64()?, magic::IHAVEOPT)?;
        Ok(Self { handshake_flags: HandshakeFlags::from_bits_retain(r.u16()?) })
    }
}

fn expect_magic(found: u64, expected: u64) -> Result<(), WireError> {
    if found == expected { Ok(()) } else { Err(WireError::BadMagic { expected, found }) }
}

/// Header of an option request sent by the client: IHAVEOPT, option, length (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub const SIZE: usize = 16;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        out[..8].copy_from_slice(&magic::IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    pub fn decode(buf: &[u8; Self::SIZE]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        expect_magic(r.u64()?, magic::IHAVEOPT)?;
        Ok(Self { option: r.u32()?, length: r.u32()? })
    }
}

/// Header of an option reply: magic, option, reply type, length (20 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub const SIZE: usize = 20;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        out[..8].copy_from_slice(&magic::OPTION_REPLY.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..16].copy_from_slice(&self.reply.to_be_bytes());
        out[16..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    pub fn decode(buf: &[u8; Self::SIZE]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        expect_magic(r.u64()?, magic::OPTION_REPLY)?;
        Ok(Self { option: r.u32()?, reply: r.u32()?, length: r.u32()? })
    }
}

/// The server's answer to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero
/// bytes unless NO_ZEROES was agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    pub size: u64,
    pub transmission_flags: TransmissionFlags,
}

impl ExportNameReply {
    pub const SIZE: usize = 10;
    pub const ZEROES: usize = 124;

    pub fn encode(&self, no_zeroes: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::SIZE + Self::ZEROES);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.transmission_flags.bits().to_be_bytes());
        if !no_zeroes {
            out.resize(Self::SIZE + Self::ZEROES, 0);
        }
        out
    }

    pub fn decode(buf: &[u8; Self::SIZE]) -> Self {
        let mut r = Reader::new(buf);
        // A 10-byte array always holds both fields.
        let size = r.u64().unwrap_or_default();
        let transmission_flags = TransmissionFlags::from_bits_retain(r.u16().unwrap_or_default());
        Self { size, transmission_flags }
    }
}

// ------------------------------------------------------------ option data

/// Data of NBD_OPT_INFO and NBD_OPT_GO: export name and requested info items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + self.name.len() + 2 * self.requests.len());
        put_string(&mut out, &self.name);
        out.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            out.extend_from_slice(&r.to_be_bytes());
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        let name = r.prefixed_string("export name")?;
        let count = r.u16()? as usize;
        // Each request is 2 bytes: a count larger than the data is refused
        // by `bytes` before any allocation.
        let raw = r.bytes(count * 2)?;
        r.finish()?;
        let requests = raw.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
        Ok(Self { name, requests })
    }
}

/// Data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_string(&mut out, &self.export);
        out.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            put_string(&mut out, q);
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        let export = r.prefixed_string("export name")?;
        let count = r.u32()? as usize;
        // Every query takes at least its 4-byte length: cap the capacity by
        // what the data can hold, never by what the client claims.
        let mut queries = Vec::with_capacity(count.min(r.remaining() / 4));
        for _ in 0..count {
            queries.push(r.prefixed_string("meta context query")?);
        }
        r.finish()?;
        Ok(Self { export, queries })
    }
}

/// One NBD_REP_INFO payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    Export {
        size: u64,
        transmission_flags: TransmissionFlags,
    },
    Name(String),
    Description(String),
    BlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
    /// An item this library does not know; clients must ignore it.
    Unknown {
        kind: u16,
    },
}

impl InfoReply {
    pub fn encode(&self) -> Vec<u8> {
        use crate::consts::info;
        let mut out = Vec::with_capacity(16);
        match self {
            Self::Export { size, transmission_flags } => {
                out.extend_from_slice(&info::EXPORT.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&transmission_flags.bits().to_be_bytes());
            }
            Self::Name(s) | Self::Description(s) => {
                let kind = if matches!(self, Self::Name(_)) { info::NAME } else { info::DESCRIPTION };
                out.extend_from_slice(&kind.to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Self::BlockSize { minimum, preferred, maximum } => {
                out.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
                for v in [minimum, preferred, maximum] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            Self::Unknown { kind } => out.extend_from_slice(&kind.to_be_bytes()),
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        use crate::consts::info;
        let mut r = Reader::new(buf);
        let kind = r.u16()?;
        let item = match kind {
            info::EXPORT => {
                Self::Export { size: r.u64()?, transmission_flags: TransmissionFlags::from_bits_retain(r.u16()?) }
            }
            info::NAME => Self::Name(r.string(r.remaining() as u64, "export name")?),
            info::DESCRIPTION => Self::Description(r.string(r.remaining() as u64, "description")?),
            info::BLOCK_SIZE => Self::BlockSize { minimum: r.u32()?, preferred: r.u32()?, maximum: r.u32()? },
            kind => {
                r.rest();
                Self::Unknown { kind }
            }
        };
        r.finish()?;
        Ok(item)
    }
}

/// Payload of NBD_REP_META_CONTEXT: context id and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextReply {
    pub id: u32,
    pub name: String,
}

impl MetaContextReply {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.name.len());
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        let id = r.u32()?;
        let name = r.string(r.remaining() as u64, "meta context name")?;
        Ok(Self { id, name })
    }
}

/// Payload of NBD_REP_SERVER (one export in a LIST reply).
pub fn encode_server_reply(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    put_string(&mut out, name);
    out
}

/// Decodes NBD_REP_SERVER: the name, then an optional description.
pub fn decode_server_reply(buf: &[u8]) -> Result<(String, String), WireError> {
    let mut r = Reader::new(buf);
    let name = r.prefixed_string("export name")?;
    let description = r.string(r.remaining() as u64, "description")?;
    Ok((name, description))
}

// ------------------------------------------------------------ transmission

/// A transmission request header (28 bytes), followed by `length` bytes of
/// payload for NBD_CMD_WRITE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: CommandFlags,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub const SIZE: usize = 28;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        out[..4].copy_from_slice(&magic::REQUEST.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.bits().to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    pub fn decode(buf: &[u8; Self::SIZE]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        expect_magic(r.u32()?.into(), magic::REQUEST.into())?;
        let flags = CommandFlags::from_bits_retain(r.u16()?);
        Ok(Self { flags, command: r.u16()?, cookie: r.u64()?, offset: r.u64()?, length: r.u32()? })
    }
}

/// A simple reply header (16 bytes); READ data follows on success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub const SIZE: usize = 16;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        out[..4].copy_from_slice(&magic::SIMPLE_REPLY.to_be_bytes());
        out[4..8].copy_from_slice(&self.error.to_be_bytes());
        out[8..].copy_from_slice(&self.cookie.to_be_bytes());
        out
    }

    pub fn decode(buf: &[u8; Self::SIZE]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        expect_magic(r.u32()?.into(), magic::SIMPLE_REPLY.into())?;
        Ok(Self { error: r.u32()?, cookie: r.u64()? })
    }
}

/// A structured reply chunk header (20 bytes), followed by `length` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: ReplyFlags,
    pub kind: u16,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    pub const SIZE: usize = 20;

    pub fn is_done(&self) -> bool {
        self.flags.contains(ReplyFlags::DONE)
    }

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        out[..4].copy_from_slice(&magic::STRUCTURED_REPLY.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.bits().to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    pub fn decode(buf: &[u8; Self::SIZE]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        expect_magic(r.u32()?.into(), magic::STRUCTURED_REPLY.into())?;
        let flags = ReplyFlags::from_bits_retain(r.u16()?);
        Ok(Self { flags, kind: r.u16()?, cookie: r.u64()?, length: r.u32()? })
    }
}

/// One descriptor of a BLOCK_STATUS chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u32,
    pub flags: u32,
}

/// The payload of a structured reply chunk, decoded by type. OFFSET_DATA
/// data is borrowed, never copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk<'a> {
    None,
    OffsetData { offset: u64, data: &'a [u8] },
    OffsetHole { offset: u64, length: u32 },
    BlockStatus { context_id: u32, extents: Vec<Extent> },
    Error { error: u32, message: String },
    ErrorOffset { error: u32, message: String, offset: u64 },
    Unknown { kind: u16 },
}

impl<'a> Chunk<'a> {
    /// Decodes a chunk payload; `kind` comes from its header. The extent list
    /// is sized by the bytes present, so the header's length is trusted only
    /// as far as the caller already capped it.
    pub fn decode(kind: u16, payload: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        let chunk = match kind {
            reply_type::NONE => Self::None,
            reply_type::OFFSET_DATA => Self::OffsetData { offset: r.u64()?, data: r.rest() },
            reply_type::OFFSET_HOLE => Self::OffsetHole { offset: r.u64()?, length: r.u32()? },
            reply_type::BLOCK_STATUS => {
                let context_id = r.u32()?;
                let raw = r.rest();
                if !raw.len().is_multiple_of(8) {
                    return Err(WireError::Truncated { needed: 8 - raw.len() % 8 });
                }
                let extents = raw
                    .chunks_exact(8)
                    .map(|c| Extent {
                        length: u32::from_be_bytes([c[0], c[1], c[2], c[3]]),
                        flags: u32::from_be_bytes([c[4], c[5], c[6], c[7]]),
                    })
                    .collect();
                Self::BlockStatus { context_id, extents }
            }
            reply_type::ERROR | reply_type::ERROR_OFFSET => {
                let error = r.u32()?;
                let len = r.u16()?;
                let message = r.string(len.into(), "error message")?;
                if kind == reply_type::ERROR {
                    Self::Error { error, message }
                } else {
                    Self::ErrorOffset { error, message, offset: r.u64()? }
                }
            }
            kind => {
                r.rest();
                Self::Unknown { kind }
            }
        };
        r.finish()?;
        Ok(chunk)
    }
}

/// Appends a whole structured reply chunk (header and payload) to `out`.
pub fn put_chunk(out: &mut Vec<u8>, flags: ReplyFlags, cookie: u64, chunk: &Chunk<'_>) {
    let start = out.len();
    let kind = match chunk {
        Chunk::None => reply_type::NONE,
        Chunk::OffsetData { .. } => reply_type::OFFSET_DATA,
        Chunk::OffsetHole { .. } => reply_type::OFFSET_HOLE,
        Chunk::BlockStatus { .. } => reply_type::BLOCK_STATUS,
        Chunk::Error { .. } => reply_type::ERROR,
        Chunk::ErrorOffset { .. } => reply_type::ERROR_OFFSET,
        Chunk::Unknown { kind } => *kind,
    };
    out.extend_from_slice(&ChunkHeader { flags, kind, cookie, length: 0 }.encode());
    match chunk {
        Chunk::None | Chunk::Unknown { .. } => {}
        Chunk::OffsetData { offset, data } => {
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(data);
        }
        Chunk::OffsetHole { offset, length } => {
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&length.to_be_bytes());
        }
        Chunk::BlockStatus { context_id, extents } => {
            out.extend_from_slice(&context_id.to_be_bytes());
            for e in extents {
                out.extend_from_slice(&e.length.to_be_bytes());
                out.extend_from_slice(&e.flags.to_be_bytes());
            }
        }
        Chunk::Error { error, message } | Chunk::ErrorOffset { error, message, .. } => {
            // Messages are ours and short; clip defensively to the spec's
            // 4096-byte string limit, on a character boundary so it stays UTF-8.
            let mut end = message.len().min(limits::MAX_STRING_LEN as usize);
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            let msg = &message.as_bytes()[..end];
            out.extend_from_slice(&error.to_be_bytes());
            out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            out.extend_from_slice(msg);
            if let Chunk::ErrorOffset { offset, .. } = chunk {
                out.extend_from_slice(&offset.to_be_bytes());
            }
        }
    }
    let length = (out.len() - start - ChunkHeader::SIZE) as u32;
    out[start + 16..start + 20].copy_from_slice(&length.to_be_bytes());
}

#[cfg(test)]
mod tests;
