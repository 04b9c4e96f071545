//! Server side of the fixed-newstyle handshake (option haggling).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Export;
use crate::consts::{base_allocation, info, limits, opt, rep};
use crate::error::{Error, Result};
use crate::flags::{ClientFlags, HandshakeFlags};
use crate::wire::{
    ExportNameReply, Greeting, InfoReply, InfoRequest, MetaContextReply, MetaContextRequest, OptionHeader,
    OptionReplyHeader, encode_server_reply,
};

/// The context id this server gives `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the client and server agreed on for the transmission phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Session {
    /// The export is read-only, or this peer may only read.
    pub read_only: bool,
    pub structured_replies: bool,
    /// `base:allocation` was selected with SET_META_CONTEXT.
    pub base_allocation: bool,
}

/// [`negotiate`] bounded by the export's handshake timeout.
pub async fn negotiate_with_timeout<R, W>(
    export: &Export,
    rd: &mut R,
    wr: &mut W,
    peer_read_only: bool,
) -> Result<Option<Session>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let limit = export.config().handshake_timeout;
    let negotiating = negotiate(export, rd, wr, peer_read_only);
    tokio::time::timeout(limit, negotiating).await.map_err(|_| Error::HandshakeTimeout(limit))?
}

/// Runs the handshake. `Ok(None)`: the client aborted or went away cleanly.
pub async fn negotiate<R, W>(export: &Export, rd: &mut R, wr: &mut W, peer_read_only: bool) -> Result<Option<Session>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let greeting = Greeting { handshake_flags: HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES };
    wr.write_all(&greeting.encode()).await?;
    wr.flush().await?;
    let raw = rd.read_u32().await?;
    // The spec: a server MUST close on client flags it does not know.
    let flags = ClientFlags::from_bits(raw).ok_or_else(|| Error::Protocol(format!("unknown client flags {raw:#x}")))?;
    let no_zeroes = flags.contains(ClientFlags::C_NO_ZEROES);
    let session = Session { read_only: export.config().read_only || peer_read_only, ..Session::default() };
    let mut haggle = Haggle { export, wr, session };
    let mut data = Vec::new();
    loop {
        let mut header = [0u8; OptionHeader::SIZE];
        match rd.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let header = OptionHeader::decode(&header)?;
        if header.length > limits::MAX_OPTION_LEN {
            if header.option == opt::EXPORT_NAME {
                return Err(Error::Protocol(format!("export name of {} bytes", header.length)));
            }
            // Drain without buffering, then refuse: the stream stays in sync.
            let mut limited = (&mut *rd).take(header.length.into());
            tokio::io::copy(&mut limited, &mut tokio::io::sink()).await?;
            haggle.reply(header.option, rep::ERR_TOO_BIG, b"option too long").await?;
            continue;
        }
        data.clear();
        data.resize(header.length as usize, 0);
        rd.read_exact(&mut data).await?;
        match haggle.option(header.option, &data, no_zeroes).await? {
            Next::Continue => {}
            Next::Transmission => return Ok(Some(haggle.session)),
            Next::Close => return Ok(None),
        }
    }
}

enum Next {
    Continue,
    Transmission,
    Close,
}

struct Haggle<'a, W> {
    export: &'a Export,
    wr: &'a mut W,
    session: Session,
}

impl<W: AsyncWrite + Unpin> Haggle<'_, W> {
    async fn reply(&mut self, option: u32, reply: u32, payload: &[u8]) -> std::io::Result<()> {
        let header = OptionReplyHeader { option, reply, length: payload.len() as u32 };
        let mut msg = Vec::with_capacity(OptionReplyHeader::SIZE + payload.len());
        msg.extend_from_slice(&header.encode());
        msg.extend_from_slice(payload);
        self.wr.write_all(&msg).await?;
        self.wr.flush().await
    }

    fn is_our_export(&self, name: &str) -> bool {
        name == self.export.config().name
    }

    async fn option(&mut self, option: u32, data: &[u8], no_zeroes: bool) -> Result<Next> {
        match option {
            opt::EXPORT_NAME => {
                let name = std::str::from_utf8(data).unwrap_or("");
                if !self.is_our_export(name) {
                    // EXPORT_NAME cannot carry an error: the spec says close.
                    return Err(Error::Protocol("unknown export requested".into()));
                }
                let reply = ExportNameReply {
                    size: self.export.size(),
                    transmission_flags: self
                        .export
                        .transmission_flags(self.session.structured_replies, self.session.read_only),
                };
                self.wr.write_all(&reply.encode(no_zeroes)).await?;
                self.wr.flush().await?;
                return Ok(Next::Transmission);
            }
            opt::ABORT => {
                // The client may already be gone; a failed ACK changes nothing.
                let _ = self.reply(option, rep::ACK, &[]).await;
                return Ok(Next::Close);
            }
            opt::LIST if !data.is_empty() => self.reply(option, rep::ERR_INVALID, b"LIST takes no data").await?,
            opt::LIST if !self.export.config().list_export => {
                self.reply(option, rep::ERR_POLICY, b"export listing is disabled").await?
            }
            opt::LIST => {
                let entry = encode_server_reply(&self.export.config().name);
                self.reply(option, rep::SERVER, &entry).await?;
                self.reply(option, rep::ACK, &[]).await?;
            }
            opt::INFO | opt::GO => return self.info_or_go(option, data).await,
            opt::STRUCTURED_REPLY if !data.is_empty() => {
                self.reply(option, rep::ERR_INVALID, b"STRUCTURED_REPLY takes no data").await?
            }
            opt::STRUCTURED_REPLY => {
                self.session.structured_replies = true;
                self.reply(option, rep::ACK, &[]).await?;
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => self.meta_context(option, data).await?,
            _ => self.reply(option, rep::ERR_UNSUP, b"option not supported").await?,
        }
        Ok(Next::Continue)
    }

    async fn info_or_go(&mut self, option: u32, data: &[u8]) -> Result<Next> {
        let Ok(request) = InfoRequest::decode(data) else {
            self.reply(option, rep::ERR_INVALID, b"malformed INFO/GO request").await?;
            return Ok(Next::Continue);
        };
        if !self.is_our_export(&request.name) {
            // Say nothing about which exports do exist.
            self.reply(option, rep::ERR_UNKNOWN, b"unknown export").await?;
            return Ok(Next::Continue);
        }
        let config = self.export.config();
        let mut items = vec![InfoReply::Export {
            size: self.export.size(),
            transmission_flags: self.export.transmission_flags(self.session.structured_replies, self.session.read_only),
        }];
        if request.requests.contains(&info::NAME) {
            items.push(InfoReply::Name(config.name.clone()));
        }
        if request.requests.contains(&info::DESCRIPTION) && !config.description.is_empty() {
            items.push(InfoReply::Description(config.description.clone()));
        }
        // Sent even when not asked: it announces the 32 MiB payload limit.
        items.push(InfoReply::BlockSize {
            minimum: limits::MIN_BLOCK,
            preferred: limits::PREFERRED_BLOCK,
            maximum: limits::MAX_PAYLOAD,
        });
        for item in items {
            self.reply(option, rep::INFO, &item.encode()).await?;
        }
        self.reply(option, rep::ACK, &[]).await?;
        Ok(if option == opt::GO { Next::Transmission } else { Next::Continue })
    }

    async fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let set = option == opt::SET_META_CONTEXT;
        if set {
            // SET replaces the selection even when it fails (spec).
            self.session.base_allocation = false;
        }
        if set && !self.session.structured_replies {
            self.reply(option, rep::ERR_INVALID, b"negotiate structured replies first").await?;
            return Ok(());
        }
        let Ok(request) = MetaContextRequest::decode(data) else {
            self.reply(option, rep::ERR_INVALID, b"malformed meta context request").await?;
            return Ok(());
        };
        if !self.is_our_export(&request.export) {
            self.reply(option, rep::ERR_UNKNOWN, b"unknown export").await?;
            return Ok(());
        }
        if request.queries.iter().any(|q| !q.contains(':')) {
            self.reply(option, rep::ERR_INVALID, b"query without namespace").await?;
            return Ok(());
        }
        let matches = if request.queries.is_empty() {
            // LIST with no queries: everything; SET with none selects nothing.
            !set
        } else {
            request.queries.iter().any(|q| q == base_allocation::NAME || (!set && q == "base:"))
        };
        if set {
            self.session.base_allocation = matches;
        }
        if matches {
            let ctx = MetaContextReply {
                id: if set { BASE_ALLOCATION_ID } else { 0 },
                name: base_allocation::NAME.to_owned(),
            };
            self.reply(option, rep::META_CONTEXT, &ctx.encode()).await?;
        }
        self.reply(option, rep::ACK, &[]).await?;
        Ok(())
    }
}
