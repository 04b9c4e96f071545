//! The node crate's one error type: a small kind, a message, and the cause.

use std::fmt;

/// What went wrong, coarse enough to map onto a gRPC status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed (bad URI, missing field, wrong capability).
    InvalidArgument,
    /// A volume, device or path that must exist does not.
    NotFound,
    /// Something is still in use (a mounted device, an open block device).
    Busy,
    /// The node has no room for another volume (its volume limit, or every
    /// NBD device the kernel offers is in use).
    Exhausted,
    /// The NBD server cannot be reached or refused the export.
    Unavailable,
    /// The node lacks something the volume requires and retrying will not
    /// bring (kernel TLS without the `tls` module, an `nbds://` volume on a
    /// plugin started without `--tls-dir`): FAILED_PRECONDITION.
    Unsupported,
    /// The kernel refused a request (netlink, ioctl, mount).
    Kernel,
    /// Any other I/O failure.
    Io,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::InvalidArgument => "invalid argument",
            Self::NotFound => "not found",
            Self::Busy => "busy",
            Self::Exhausted => "resource exhausted",
            Self::Unavailable => "unavailable",
            Self::Unsupported => "unsupported",
            Self::Kernel => "kernel",
            Self::Io => "i/o",
        };
        f.write_str(s)
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    #[source]
    pub source: Option<Source>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None }
    }

    pub fn with_source(kind: ErrorKind, message: impl Into<String>, source: impl Into<Source>) -> Self {
        Self { kind, message: message.into(), source: Some(source.into()) }
    }

    /// The message followed by every cause, for logs and gRPC statuses.
    pub fn chain(&self) -> String {
        let mut out = self.message.clone();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cause = c.source();
        }
        out
    }

    /// The errno behind this error, when the cause is a system call.
    pub fn errno(&self) -> Option<nix::errno::Errno> {
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            if let Some(e) = c.downcast_ref::<nix::errno::Errno>() {
                return Some(*e);
            }
            if let Some(e) = c.downcast_ref::<std::io::Error>() {
                return e.raw_os_error().map(nix::errno::Errno::from_raw);
            }
            cause = c.source();
        }
        None
    }
}

/// Handing a TLS session to the kernel, mapped once: a kernel without the
/// `tls` module is a precondition the node does not meet (the message names
/// `tls.ko`), never a reason to fall back to plaintext; a session that was
/// not at rest is the server's doing and worth a new connection.
impl From<nbd::ktls::KtlsError> for Error {
    fn from(e: nbd::ktls::KtlsError) -> Self {
        use nbd::ktls::KtlsError as K;
        let kind = match &e {
            K::Unavailable | K::UnsupportedCipher => ErrorKind::Unsupported,
            K::NotAtRest(_) => ErrorKind::Unavailable,
            K::Sockopt { .. } | K::Secrets(_) => ErrorKind::Kernel,
        };
        Self::with_source(kind, "handing the TLS session to the kernel (kTLS)", e)
    }
}

/// Adds context to fallible calls: `.ctx(ErrorKind::Io, || format!(...))`.
pub trait Context<T> {
    fn ctx<M: Into<String>>(self, kind: ErrorKind, message: impl FnOnce() -> M) -> Result<T>;
}

impl<T, E: Into<Source>> Context<T> for std::result::Result<T, E> {
    fn ctx<M: Into<String>>(self, kind: ErrorKind, message: impl FnOnce() -> M) -> Result<T> {
        self.map_err(|e| Error::with_source(kind, message(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_shows_causes_and_errno_is_found() {
        let io = std::io::Error::from_raw_os_error(16);
        let err: Result<()> = Err(io).ctx(ErrorKind::Busy, || "unmounting /x");
        let err = err.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Busy);
        assert!(err.chain().starts_with("unmounting /x: "));
        assert_eq!(err.errno(), Some(nix::errno::Errno::EBUSY));
    }

    #[test]
    fn a_kernel_without_tls_is_unsupported_and_names_the_module() {
        let err = Error::from(nbd::ktls::KtlsError::Unavailable);
        assert_eq!(err.kind, ErrorKind::Unsupported);
        assert!(err.chain().contains("tls.ko"), "{}", err.chain());
        let sockopt = nbd::ktls::KtlsError::Sockopt { what: "SOL_TLS TLS_TX", errno: nix::errno::Errno::EINVAL };
        assert_eq!(Error::from(sockopt).kind, ErrorKind::Kernel);
        assert_eq!(Error::from(nbd::ktls::KtlsError::NotAtRest("x")).kind, ErrorKind::Unavailable);
    }
}
