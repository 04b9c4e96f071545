//! The crate's one error type.

use std::io;

use crate::wire::WireError;

/// Coarse classification, for callers that map errors to their own codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The peer or the backing file failed at the I/O level.
    Io,
    /// The peer broke the protocol (bad magic, malformed or oversized message).
    Protocol,
    /// The peer refused what we asked for.
    Refused,
    /// The peer stalled past a deadline.
    Timeout,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("malformed message: {0}")]
    Wire(#[from] WireError),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("option {option} refused with reply {reply:#x}{}", suffix(.message))]
    Refused { option: u32, reply: u32, message: String },
    #[error("unexpected reply {reply:#x} to option {option}")]
    UnexpectedReply { option: u32, reply: u32 },
    #[error("server accepted the export without sending NBD_INFO_EXPORT")]
    MissingExportInfo,
    #[error("server does not speak fixed newstyle NBD")]
    NotFixedNewstyle,
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    /// The TLS handshake after NBD_OPT_STARTTLS failed: a certificate
    /// refused by either side, or a protocol error.
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(io::Error),
}

fn suffix(message: &str) -> String {
    if message.is_empty() { String::new() } else { format!(": {message}") }
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Io(_) => ErrorKind::Io,
            Self::Wire(_) | Self::Protocol(_) | Self::UnexpectedReply { .. } => ErrorKind::Protocol,
            Self::MissingExportInfo | Self::NotFixedNewstyle => ErrorKind::Protocol,
            Self::Refused { .. } | Self::TlsHandshake(_) => ErrorKind::Refused,
            Self::HandshakeTimeout(_) => ErrorKind::Timeout,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
