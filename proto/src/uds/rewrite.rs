//! The client-to-server half of an HTTP/2 connection, with every request's
//! `:authority` made acceptable to our HTTP/2 server.
//!
//! gRPC C-core (Python, Ruby, C++, PHP) and grpc-java name the peer of a
//! `unix:` channel by its socket path, percent-encoded or not, and send that
//! as `:authority`. hyper's h2 parses `:authority` as an RFC 3986 authority
//! and resets such a stream with PROTOCOL_ERROR, so those clients cannot
//! call a tonic server on a Unix socket at all (hyperium/h2#487, still open).
//! Go clients send `localhost`. On a Unix socket the authority carries no
//! meaning — there is one server behind the path — so the rewriter replaces
//! an authority that does not parse with `localhost` before h2 sees it.
//!
//! Header blocks are HPACK-compressed with a table that spans the whole
//! connection, so once one block is rewritten the server's decoder can no
//! longer follow the client's encoder. The rewriter therefore decodes every
//! block with the client's table and encodes every block again with an
//! encoder of its own whose dynamic table is empty (size 0): the server's
//! table then never holds an entry the blocks refer to. Every other frame,
//! and the connection preface, pass through untouched.
//!
//! This is a pure codec: bytes in, bytes out, no I/O.

use std::borrow::Cow;

use loona_hpack::{Decoder, Encoder};

/// What every HTTP/2 client sends first (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
const PRIORITY_LEN: usize = 5;
/// SETTINGS_MAX_FRAME_SIZE's initial value: every server accepts frames of
/// this size, so re-encoded blocks are cut into pieces no larger.
const MAX_FRAME_PAYLOAD: usize = 16_384;
/// A header block held while it arrives in pieces. gRPC metadata is a few
/// hundred bytes; a client that sends more is cut off rather than buffered.
pub const MAX_HEADER_BLOCK: usize = 256 << 10;
/// What replaces an authority that does not parse.
pub const LOCAL_AUTHORITY: &[u8] = b"localhost";

/// Why the connection must close.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RewriteError {
    #[error("HTTP/2 header block larger than {MAX_HEADER_BLOCK} bytes")]
    HeaderBlockTooLarge,
    #[error("HTTP/2 frame sequence broken: {0}")]
    Framing(&'static str),
    #[error("HPACK decoding failed: {0}")]
    Hpack(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Gathering the connection preface.
    Preface,
    /// Not HTTP/2 as we know it: forward everything and let the server judge.
    Passthrough,
    /// Gathering the 9 bytes of a frame header.
    FrameHeader,
    /// Forwarding this many more payload bytes of a frame we do not touch.
    Forward(usize),
    /// Gathering the payload of a HEADERS or CONTINUATION frame.
    HeaderPayload { kind: u8, flags: u8, stream: u32, len: usize },
}

/// A header block being assembled from HEADERS + CONTINUATION frames.
#[derive(Debug)]
struct Pending {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_LEN]>,
    block: Vec<u8>,
}

/// Rewrites the bytes a client sends on one HTTP/2 connection.
pub struct AuthorityRewriter {
    state: State,
    /// Bytes of the preface, a frame header or a header frame's payload
    /// gathered so far.
    held: Vec<u8>,
    pending: Option<Pending>,
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
    rewritten: u64,
}

impl std::fmt::Debug for AuthorityRewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityRewriter").field("state", &self.state).field("rewritten", &self.rewritten).finish()
    }
}

impl Default for AuthorityRewriter {
    fn default() -> Self {
        let mut encoder = Encoder::new();
        // Nothing is ever indexed: see the module doc.
        encoder.set_max_table_size(0);
        Self { state: State::Preface, held: Vec::new(), pending: None, decoder: Decoder::new(), encoder, rewritten: 0 }
    }
}

impl AuthorityRewriter {
    /// How many `:authority` values were replaced so far.
    pub fn rewritten(&self) -> u64 {
        self.rewritten
    }

    /// Takes bytes the client sent and appends to `out` the bytes the server
    /// should read. Header frames are held until complete.
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        while !data.is_empty() {
            match self.state {
                State::Passthrough => {
                    out.extend_from_slice(data);
                    return Ok(());
                }
                State::Forward(remaining) => {
                    let take = remaining.min(data.len());
                    out.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    self.state = if take == remaining { State::FrameHeader } else { State::Forward(remaining - take) };
                }
                State::Preface => {
                    let take = (PREFACE.len() - self.held.len()).min(data.len());
                    self.held.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if !PREFACE.starts_with(&self.held) {
                        out.append(&mut self.held);
                        self.state = State::Passthrough;
                    } else if self.held.len() == PREFACE.len() {
                        out.append(&mut self.held);
                        self.state = State::FrameHeader;
                    }
                }
                State::FrameHeader => {
                    data = self.gather(data, FRAME_HEADER_LEN);
                    if self.held.len() == FRAME_HEADER_LEN {
                        self.start_frame(out)?;
                    }
                }
                State::HeaderPayload { kind, flags, stream, len } => {
                    // The frame header stays in `held` until the payload is
                    // complete, so `finish` can forward a partial frame whole.
                    data = self.gather(data, FRAME_HEADER_LEN + len);
                    if self.held.len() == FRAME_HEADER_LEN + len {
                        let payload = self.held.split_off(FRAME_HEADER_LEN);
                        self.held.clear();
                        self.state = State::FrameHeader;
                        self.header_frame(kind, flags, stream, &payload, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The client closed its side: a partial frame goes to the server as it
    /// came, for the server to reject. (An unfinished header block is
    /// dropped: no server could act on it.)
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.held);
        self.state = State::Passthrough;
    }

    /// Moves bytes from `data` into `held` until it has `want`; returns the rest.
    fn gather<'d>(&mut self, data: &'d [u8], want: usize) -> &'d [u8] {
        let take = (want - self.held.len()).min(data.len());
        self.held.extend_from_slice(&data[..take]);
        &data[take..]
    }

    fn start_frame(&mut self, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let h = &self.held;
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        let is_header = kind == HEADERS || kind == CONTINUATION;
        if self.pending.is_some() && kind != CONTINUATION {
            // RFC 9113 §6.10: nothing may come between a header block's frames.
            return Err(RewriteError::Framing("a frame interrupted a header block"));
        }
        if is_header {
            let held = self.pending.as_ref().map_or(0, |p| p.block.len());
            if held + len > MAX_HEADER_BLOCK {
                return Err(RewriteError::HeaderBlockTooLarge);
            }
            self.state = State::HeaderPayload { kind, flags, stream, len };
            if len == 0 {
                self.held.clear();
                self.state = State::FrameHeader;
                self.header_frame(kind, flags, stream, &[], out)?;
            }
        } else {
            out.append(&mut self.held);
            self.state = if len == 0 { State::FrameHeader } else { State::Forward(len) };
        }
        Ok(())
    }

    fn header_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RewriteError> {
        if kind == HEADERS {
            let mut start = 0;
            let mut pad = 0;
            if flags & PADDED != 0 {
                pad =
                    usize::from(*payload.first().ok_or(RewriteError::Framing("PADDED HEADERS without a pad length"))?);
                start = 1;
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                let fields = payload.get(start..start + PRIORITY_LEN).ok_or(RewriteError::Framing("short PRIORITY"))?;
                priority = Some(fields.try_into().expect("five bytes"));
                start += PRIORITY_LEN;
            }
            let end = payload.len().checked_sub(pad).filter(|&end| end >= start);
            let end = end.ok_or(RewriteError::Framing("padding longer than the HEADERS payload"))?;
            self.pending = Some(Pending {
                stream,
                end_stream: flags & END_STREAM != 0,
                priority,
                block: payload[start..end].to_vec(),
            });
        } else {
            let pending = self.pending.as_mut().filter(|p| p.stream == stream);
            let pending = pending.ok_or(RewriteError::Framing("CONTINUATION without its HEADERS"))?;
            pending.block.extend_from_slice(payload);
        }
        if flags & END_HEADERS != 0 {
            let pending = self.pending.take().expect("set above");
            self.emit(pending, out)?;
        }
        Ok(())
    }

    /// Decodes a whole header block, fixes its authority, and writes it out
    /// again as HEADERS (+ CONTINUATION) frames.
    fn emit(&mut self, pending: Pending, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        self.decoder
            .decode_with_cb(&pending.block, |name: Cow<'_, [u8]>, value: Cow<'_, [u8]>| {
                fields.push((name.into_owned(), value.into_owned()))
            })
            .map_err(|e| RewriteError::Hpack(format!("{e:?}")))?;
        for (name, value) in &mut fields {
            if name.as_slice() == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
                *value = LOCAL_AUTHORITY.to_vec();
                self.rewritten += 1;
            }
        }
        let block = self.encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let priority = pending.priority.as_ref().map_or(&[][..], |p| &p[..]);
        let first_room = MAX_FRAME_PAYLOAD - priority.len();
        let (first, mut rest) = block.split_at(first_room.min(block.len()));
        let mut flags = if pending.end_stream { END_STREAM } else { 0 };
        if pending.priority.is_some() {
            flags |= PRIORITY;
        }
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        put_frame(out, HEADERS, flags, pending.stream, &[priority, first]);
        while !rest.is_empty() {
            let (piece, tail) = rest.split_at(MAX_FRAME_PAYLOAD.min(rest.len()));
            rest = tail;
            let flags = if rest.is_empty() { END_HEADERS } else { 0 };
            put_frame(out, CONTINUATION, flags, pending.stream, &[piece]);
        }
        Ok(())
    }
}

fn put_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
}

#[cfg(test)]
mod tests;
