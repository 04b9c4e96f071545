//! The agent's one error type: what kind of failure, a message that names
//! the object, and the cause. Callers map the kind once to their own
//! protocol (the controller to gRPC codes); nothing here knows of one.

use std::io;

use nix::errno::Errno;

/// What went wrong, as far as the caller must act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// What was asked for cannot be: a volume smaller than its source.
    InvalidArgument,
    /// The volume or snapshot an operation names does not exist.
    NotFound,
    /// The object is not in a state that allows the operation: a volume
    /// whose image is missing, one still published.
    FailedPrecondition,
    /// No space, no quota, or no free NBD port.
    ResourceExhausted,
    /// Not done yet, worth retrying: stopped connections still hold a file.
    Unavailable,
    /// Anything else: an I/O failure, a corrupt record.
    Internal,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: Kind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The cause, to keep when the error is wrapped in another type.
    pub fn into_source(self) -> Option<Box<dyn std::error::Error + Send + Sync>> {
        self.source
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, message)
    }

    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(Kind::FailedPrecondition, message)
    }

    pub fn exhausted(message: impl Into<String>) -> Self {
        Self::new(Kind::ResourceExhausted, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Kind::Internal, message)
    }

    /// An I/O failure; a full disk or quota is [`Kind::ResourceExhausted`].
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        let kind = match source.raw_os_error().map(Errno::from_raw) {
            Some(Errno::ENOSPC | Errno::EDQUOT | Errno::EFBIG) => Kind::ResourceExhausted,
            _ => Kind::Internal,
        };
        let message = format!("{}: {source}", context.into());
        Self { kind, message, source: Some(Box::new(source)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_resource_exhausted_and_other_io_failures_internal() {
        let e = Error::io("creating", io::Error::from_raw_os_error(Errno::ENOSPC as i32));
        assert_eq!(e.kind(), Kind::ResourceExhausted);
        assert_eq!(e.to_string(), format!("creating: {}", io::Error::from_raw_os_error(Errno::ENOSPC as i32)));
        assert!(e.into_source().is_some(), "the cause is kept");
        let e = Error::io("creating", io::Error::from_raw_os_error(Errno::EIO as i32));
        assert_eq!(e.kind(), Kind::Internal);
    }
}
