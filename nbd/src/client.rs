//! Client side of the fixed-newstyle handshake, generic over any async
//! stream. After [`handshake`] the stream is positioned at the start of the
//! transmission phase, ready to be handed to the kernel. [`handshake_tls`]
//! starts TLS first (NBD_OPT_STARTTLS, then a rustls handshake with this
//! node's certificate) and negotiates the export over it.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::client::TlsStream;

use crate::consts::{info, limits, opt, rep};
use crate::error::Error;
use crate::flags::{ClientFlags, HandshakeFlags, TransmissionFlags};
use crate::tls::ClientTls;
use crate::wire::{ExportNameReply, Greeting, InfoReply, InfoRequest, OptionHeader, OptionReplyHeader};

/// What the client asks for.
#[derive(Debug, Clone, Default)]
pub struct HandshakeOptions {
    pub export_name: String,
    /// Negotiate structured replies (the Linux kernel cannot use them, so
    /// the node plugin leaves this off).
    pub structured_replies: bool,
}

/// What the server agreed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub size: u64,
    /// As the server sent them, bits this library does not know included.
    pub transmission_flags: TransmissionFlags,
    /// (minimum, preferred, maximum payload) when the server announced them.
    pub block_size: Option<(u32, u32, u32)>,
    pub structured_replies: bool,
}

impl Export {
    /// True only when the server set NBD_FLAG_CAN_MULTI_CONN (bit 8). No
    /// other bit, SEND_CACHE (bit 10) in particular, counts.
    pub fn can_multi_conn(&self) -> bool {
        self.transmission_flags.contains(TransmissionFlags::CAN_MULTI_CONN)
    }

    pub fn read_only(&self) -> bool {
        self.transmission_flags.contains(TransmissionFlags::READ_ONLY)
    }
}

/// Runs the fixed-newstyle handshake: NBD_OPT_GO with info requests, falling
/// back to NBD_OPT_EXPORT_NAME when the server does not know NBD_OPT_GO.
pub async fn handshake<S>(stream: &mut S, opts: &HandshakeOptions) -> Result<Export, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let no_zeroes = greet(stream).await?;
    negotiate_export(stream, opts, no_zeroes).await
}

/// The handshake over TLS: NBD_OPT_STARTTLS as the first option (so no
/// option crosses in plaintext), the TLS handshake with `tls`'s client
/// certificate, then the export negotiated as [`handshake`] does. A server
/// that refuses STARTTLS ends it with [`Error::Refused`]: this client never
/// falls back to plaintext. Returns the TLS stream, at the start of the
/// transmission phase.
pub async fn handshake_tls<S>(
    mut stream: S,
    opts: &HandshakeOptions,
    tls: &ClientTls,
) -> Result<(TlsStream<S>, Export), Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let no_zeroes = greet(&mut stream).await?;
    send_option(&mut stream, opt::STARTTLS, &[]).await?;
    let (header, payload) = read_reply(&mut stream, opt::STARTTLS).await?;
    match header.reply {
        rep::ACK if payload.is_empty() => {}
        reply if reply & rep::ERR_BIT != 0 => {
            let message = String::from_utf8_lossy(&payload).into_owned();
            return Err(Error::Refused { option: opt::STARTTLS, reply, message });
        }
        reply => return Err(Error::UnexpectedReply { option: opt::STARTTLS, reply }),
    }
    // Nothing past the ACK was read: the server's first TLS bytes are
    // still in the stream for rustls.
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(tls.config()));
    let mut stream = connector.connect(tls.server_name().clone(), stream).await.map_err(Error::TlsHandshake)?;
    let export = negotiate_export(&mut stream, opts, no_zeroes).await?;
    Ok((stream, export))
}

/// Reads the greeting and sends the client flags; returns whether the
/// 124 zero bytes are left out of an NBD_OPT_EXPORT_NAME reply.
async fn greet<S>(stream: &mut S) -> Result<bool, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = [0u8; Greeting::SIZE];
    stream.read_exact(&mut greeting).await?;
    let greeting = Greeting::decode(&greeting)?;
    if !greeting.handshake_flags.contains(HandshakeFlags::FIXED_NEWSTYLE) {
        return Err(Error::NotFixedNewstyle);
    }
    // C_NO_ZEROES only when offered; other handshake bits are ignored.
    let no_zeroes = greeting.handshake_flags.contains(HandshakeFlags::NO_ZEROES);
    let mut flags = ClientFlags::C_FIXED_NEWSTYLE;
    flags.set(ClientFlags::C_NO_ZEROES, no_zeroes);
    stream.write_all(&flags.bits().to_be_bytes()).await?;
    Ok(no_zeroes)
}

/// From the first option after the greeting (or after TLS) to the
/// transmission phase.
async fn negotiate_export<S>(stream: &mut S, opts: &HandshakeOptions, no_zeroes: bool) -> Result<Export, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut structured = false;
    if opts.structured_replies {
        send_option(stream, opt::STRUCTURED_REPLY, &[]).await?;
        let (header, _) = read_reply(stream, opt::STRUCTURED_REPLY).await?;
        structured = header.reply == rep::ACK;
    }

    let request = InfoRequest { name: opts.export_name.clone(), requests: vec![info::BLOCK_SIZE] };
    send_option(stream, opt::GO, &request.encode()).await?;
    let mut export = None;
    let mut block_size = None;
    loop {
        let (header, payload) = read_reply(stream, opt::GO).await?;
        match header.reply {
            rep::INFO => match InfoReply::decode(&payload)? {
                InfoReply::Export { size, transmission_flags } => export = Some((size, transmission_flags)),
                InfoReply::BlockSize { minimum, preferred, maximum } => {
                    block_size = Some((minimum, preferred, maximum))
                }
                _ => {}
            },
            rep::ACK => {
                let (size, transmission_flags) = export.ok_or(Error::MissingExportInfo)?;
                return Ok(Export { size, transmission_flags, block_size, structured_replies: structured });
            }
            rep::ERR_UNSUP => break,
            reply if reply & rep::ERR_BIT != 0 => {
                return Err(Error::Refused {
                    option: opt::GO,
                    reply,
                    message: String::from_utf8_lossy(&payload).into_owned(),
                });
            }
            reply => return Err(Error::UnexpectedReply { option: opt::GO, reply }),
        }
    }

    // Old server: NBD_OPT_EXPORT_NAME cannot report errors, a refusal closes.
    send_option(stream, opt::EXPORT_NAME, opts.export_name.as_bytes()).await?;
    let mut reply = [0u8; ExportNameReply::SIZE];
    stream.read_exact(&mut reply).await?;
    let reply = ExportNameReply::decode(&reply);
    if !no_zeroes {
        let mut zeroes = [0u8; ExportNameReply::ZEROES];
        stream.read_exact(&mut zeroes).await?;
    }
    Ok(Export {
        size: reply.size,
        transmission_flags: reply.transmission_flags,
        block_size: None,
        structured_replies: structured,
    })
}

async fn send_option<S: AsyncWrite + Unpin>(stream: &mut S, option: u32, data: &[u8]) -> io::Result<()> {
    let header = OptionHeader { option, length: data.len() as u32 };
    let mut msg = Vec::with_capacity(OptionHeader::SIZE + data.len());
    msg.extend_from_slice(&header.encode());
    msg.extend_from_slice(data);
    stream.write_all(&msg).await?;
    stream.flush().await
}

async fn read_reply<S: AsyncRead + Unpin>(stream: &mut S, option: u32) -> Result<(OptionReplyHeader, Vec<u8>), Error> {
    let mut header = [0u8; OptionReplyHeader::SIZE];
    stream.read_exact(&mut header).await?;
    let header = OptionReplyHeader::decode(&header)?;
    if header.option != option {
        return Err(Error::UnexpectedReply { option, reply: header.reply });
    }
    crate::wire::check_len("option reply", header.length.into(), limits::MAX_OPTION_LEN.into())?;
    let mut payload = vec![0u8; header.length as usize];
    stream.read_exact(&mut payload).await?;
    Ok((header, payload))
}
