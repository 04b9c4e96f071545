//! Server side of the fixed-newstyle handshake (option haggling).
//!
//! Haggling may be cut in two by NBD_OPT_STARTTLS: [`Negotiation::haggle`]
//! returns [`Outcome::StartTls`] once it has acknowledged the option, the
//! caller runs the TLS handshake on the same connection and calls it again
//! on the TLS stream, after [`Negotiation::tls_established`]. What the
//! export's [`TlsMode`](crate::tls::TlsMode) requires before that point
//! (NBD_REP_ERR_TLS_REQD for every option but STARTTLS and ABORT when TLS
//! is required) is decided here, and so is who may use the export: the
//! connection's [`Gate`] is asked when the client asks for it.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Export;
use super::access::{Decision, Gate};
use crate::consts::{base_allocation, info, limits, opt, rep};
use crate::error::{Error, Result};
use crate::flags::{ClientFlags, HandshakeFlags};
use crate::tls::IdentityError;
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

/// How haggling ended, for now.
#[derive(Debug)]
pub enum Outcome {
    Transmission(Session),
    /// The client aborted or went away cleanly.
    Close,
    /// NBD_OPT_STARTTLS was acknowledged: the TLS handshake comes next.
    StartTls,
}

/// Where a connection stands with TLS.
#[derive(Debug, Clone)]
enum Tls {
    Plain,
    /// Established; the node its client certificate names, or why none.
    On {
        node: Result<String, IdentityError>,
    },
}

/// One connection's option haggling, across a TLS upgrade.
#[derive(Debug)]
pub struct Negotiation {
    export: Arc<Export>,
    /// The access check; none for sessions outside the server's registry.
    gate: Option<Gate>,
    no_zeroes: bool,
    /// The client set NBD_FLAG_C_FIXED_NEWSTYLE: TLS needs it (spec).
    fixed_newstyle: bool,
    tls: Tls,
    session: Session,
}

impl Negotiation {
    pub fn new(export: Arc<Export>, gate: Option<Gate>) -> Self {
        Self { export, gate, no_zeroes: false, fixed_newstyle: false, tls: Tls::Plain, session: Session::default() }
    }

    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }

    /// Sends the greeting and reads the client's flags.
    pub async fn greet<R, W>(&mut self, rd: &mut R, wr: &mut W) -> Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let greeting = Greeting { handshake_flags: HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES };
        wr.write_all(&greeting.encode()).await?;
        wr.flush().await?;
        let raw = rd.read_u32().await?;
        // The spec: a server MUST close on client flags it does not know.
        let flags =
            ClientFlags::from_bits(raw).ok_or_else(|| Error::Protocol(format!("unknown client flags {raw:#x}")))?;
        self.no_zeroes = flags.contains(ClientFlags::C_NO_ZEROES);
        self.fixed_newstyle = flags.contains(ClientFlags::C_FIXED_NEWSTYLE);
        if self.export.config().tls.is_required() && !self.fixed_newstyle {
            // Without fixed newstyle there is no STARTTLS (spec), so no way in.
            return Err(Error::Protocol("TLS is required and the client does not speak fixed newstyle".into()));
        }
        Ok(())
    }

    /// The TLS handshake after [`Outcome::StartTls`] succeeded; `node` is
    /// who the client's certificate says it is. Nothing negotiated before
    /// carries over (spec).
    pub fn tls_established(&mut self, node: Result<String, IdentityError>) {
        self.tls = Tls::On { node };
        self.session = Session::default();
    }

    fn tls_on(&self) -> bool {
        matches!(self.tls, Tls::On { .. })
    }

    /// TLS is required and not on yet: options get NBD_REP_ERR_TLS_REQD.
    fn tls_missing(&self) -> bool {
        self.export.config().tls.is_required() && !self.tls_on()
    }

    /// Haggles until the client enters transmission, leaves, or starts TLS.
    pub async fn haggle<R, W>(&mut self, rd: &mut R, wr: &mut W) -> Result<Outcome>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut data = Vec::new();
        loop {
            let mut header = [0u8; OptionHeader::SIZE];
            match rd.read_exact(&mut header).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Outcome::Close),
                Err(e) => return Err(e.into()),
            }
            let header = OptionHeader::decode(&header)?;
            let mut haggle = Haggle { negotiation: self, wr };
            if header.length > limits::MAX_OPTION_LEN {
                if header.option == opt::EXPORT_NAME {
                    return Err(Error::Protocol(format!("export name of {} bytes", header.length)));
                }
                // Drain without buffering, then refuse: the stream stays in sync.
                let mut limited = (&mut *rd).take(header.length.into());
                tokio::io::copy(&mut limited, &mut tokio::io::sink()).await?;
                if haggle.negotiation.tls_missing() {
                    haggle.reply(header.option, rep::ERR_TLS_REQD, TLS_REQUIRED).await?;
                } else {
                    haggle.reply(header.option, rep::ERR_TOO_BIG, b"option too long").await?;
                }
                continue;
            }
            data.clear();
            data.resize(header.length as usize, 0);
            rd.read_exact(&mut data).await?;
            match haggle.option(header.option, &data).await? {
                Next::Continue => {}
                Next::Transmission => return Ok(Outcome::Transmission(self.session)),
                Next::Close => return Ok(Outcome::Close),
                Next::StartTls => return Ok(Outcome::StartTls),
            }
        }
    }

    /// The access check's answer for this client, now.
    fn decide(&self) -> Decision {
        let node = match &self.tls {
            Tls::On { node: Ok(node) } => Some(node.as_str()),
            _ => None,
        };
        match &self.gate {
            Some(gate) => gate.decide(node),
            None => Decision::Admit { read_only: false },
        }
    }
}

const TLS_REQUIRED: &[u8] = b"TLS is required: send NBD_OPT_STARTTLS first";

enum Next {
    Continue,
    Transmission,
    Close,
    StartTls,
}

struct Haggle<'a, W> {
    negotiation: &'a mut Negotiation,
    wr: &'a mut W,
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

    fn export(&self) -> &Export {
        &self.negotiation.export
    }

    fn is_our_export(&self, name: &str) -> bool {
        name == self.export().config().name
    }

    async fn option(&mut self, option: u32, data: &[u8]) -> Result<Next> {
        if self.negotiation.tls_missing() {
            match option {
                opt::STARTTLS | opt::ABORT => {}
                // It cannot carry an error: the spec says close.
                opt::EXPORT_NAME => return Err(Error::Protocol("NBD_OPT_EXPORT_NAME before the required TLS".into())),
                _ => {
                    self.reply(option, rep::ERR_TLS_REQD, TLS_REQUIRED).await?;
                    return Ok(Next::Continue);
                }
            }
        }
        match option {
            opt::EXPORT_NAME => {
                let name = std::str::from_utf8(data).unwrap_or("");
                if !self.is_our_export(name) {
                    // EXPORT_NAME cannot carry an error: the spec says close.
                    return Err(Error::Protocol("unknown export requested".into()));
                }
                let Decision::Admit { read_only } = self.negotiation.decide() else {
                    return Err(Error::Protocol("the access policy refuses this client".into()));
                };
                let export = Arc::clone(&self.negotiation.export);
                let session = &mut self.negotiation.session;
                session.read_only = export.config().read_only || read_only;
                let reply = ExportNameReply {
                    size: export.size(),
                    transmission_flags: export.transmission_flags(session.structured_replies, session.read_only),
                };
                self.wr.write_all(&reply.encode(self.negotiation.no_zeroes)).await?;
                self.wr.flush().await?;
                return Ok(Next::Transmission);
            }
            opt::ABORT => {
                // The client may already be gone; a failed ACK changes nothing.
                let _ = self.reply(option, rep::ACK, &[]).await;
                return Ok(Next::Close);
            }
            opt::STARTTLS => return self.starttls(data).await,
            opt::LIST if !data.is_empty() => self.reply(option, rep::ERR_INVALID, b"LIST takes no data").await?,
            opt::LIST if !self.export().config().list_export => {
                self.reply(option, rep::ERR_POLICY, b"export listing is disabled").await?
            }
            opt::LIST => {
                let entry = encode_server_reply(&self.export().config().name);
                self.reply(option, rep::SERVER, &entry).await?;
                self.reply(option, rep::ACK, &[]).await?;
            }
            opt::INFO | opt::GO => return self.info_or_go(option, data).await,
            opt::STRUCTURED_REPLY if !data.is_empty() => {
                self.reply(option, rep::ERR_INVALID, b"STRUCTURED_REPLY takes no data").await?
            }
            opt::STRUCTURED_REPLY => {
                self.negotiation.session.structured_replies = true;
                self.reply(option, rep::ACK, &[]).await?;
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => self.meta_context(option, data).await?,
            _ => self.reply(option, rep::ERR_UNSUP, b"option not supported").await?,
        }
        Ok(Next::Continue)
    }

    /// NBD_OPT_STARTTLS: refused where TLS is off (NOTLS mode), invalid a
    /// second time or with data; otherwise acknowledged, and the TLS
    /// handshake follows.
    async fn starttls(&mut self, data: &[u8]) -> Result<Next> {
        let offered = self.export().config().tls.server().is_some();
        if !offered || !self.negotiation.fixed_newstyle {
            self.reply(opt::STARTTLS, rep::ERR_POLICY, b"TLS is not offered on this export").await?;
        } else if self.negotiation.tls_on() {
            self.reply(opt::STARTTLS, rep::ERR_INVALID, b"TLS is already on").await?;
        } else if !data.is_empty() {
            self.reply(opt::STARTTLS, rep::ERR_INVALID, b"STARTTLS takes no data").await?;
        } else {
            self.reply(opt::STARTTLS, rep::ACK, &[]).await?;
            return Ok(Next::StartTls);
        }
        Ok(Next::Continue)
    }

    /// Asks the access check; on a refusal, answers `option` with the
    /// error and returns `None`.
    async fn admitted(&mut self, option: u32) -> Result<Option<bool>> {
        match self.negotiation.decide() {
            Decision::Admit { read_only } => return Ok(Some(read_only)),
            // The export admits clients by their certificate's node name:
            // TLS-only for this client (the spec's SELECTIVETLS answer).
            Decision::NeedsNodeName if self.export().config().tls.server().is_some() && !self.negotiation.tls_on() => {
                self.reply(option, rep::ERR_TLS_REQD, b"this export admits clients by node certificate: start TLS")
                    .await?
            }
            Decision::NeedsNodeName => {
                let why = match &self.negotiation.tls {
                    Tls::On { node: Err(e) } => format!("access denied: {e}"),
                    _ => "access denied: this export admits clients by node certificate".to_owned(),
                };
                tracing::info!(reason = %why, "export refused at the handshake");
                self.reply(option, rep::ERR_POLICY, why.as_bytes()).await?
            }
            Decision::Refuse => {
                tracing::info!(node = ?self.negotiation.tls, "export refused at the handshake: not admitted");
                self.reply(option, rep::ERR_POLICY, b"access denied").await?
            }
        }
        Ok(None)
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
        // Nothing about the export, not even its size, before the access
        // check has admitted the client.
        let Some(read_only) = self.admitted(option).await? else { return Ok(Next::Continue) };
        let export = Arc::clone(&self.negotiation.export);
        let session = &mut self.negotiation.session;
        session.read_only = export.config().read_only || read_only;
        let config = export.config();
        let mut items = vec![InfoReply::Export {
            size: export.size(),
            transmission_flags: export.transmission_flags(session.structured_replies, session.read_only),
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
            self.negotiation.session.base_allocation = false;
        }
        if set && !self.negotiation.session.structured_replies {
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
            self.negotiation.session.base_allocation = matches;
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
