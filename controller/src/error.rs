//! The crate's one error type: a gRPC-facing kind, a message, and the cause.

use std::io;

use nix::errno::Errno;

/// What went wrong, as far as a CSI caller needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    OutOfRange,
    ResourceExhausted,
    Aborted,
    Unavailable,
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

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Kind::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, message)
    }

    pub fn exists(message: impl Into<String>) -> Self {
        Self::new(Kind::AlreadyExists, message)
    }

    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(Kind::FailedPrecondition, message)
    }

    pub fn out_of_range(message: impl Into<String>) -> Self {
        Self::new(Kind::OutOfRange, message)
    }

    pub fn exhausted(message: impl Into<String>) -> Self {
        Self::new(Kind::ResourceExhausted, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Kind::Internal, message)
    }

    /// An I/O failure; a full disk or quota is RESOURCE_EXHAUSTED.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        let kind = match source.raw_os_error().map(Errno::from_raw) {
            Some(Errno::ENOSPC | Errno::EDQUOT | Errno::EFBIG) => Kind::ResourceExhausted,
            _ => Kind::Internal,
        };
        let message = format!("{}: {source}", context.into());
        Self { kind, message, source: Some(Box::new(source)) }
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let code = match e.kind {
            Kind::InvalidArgument => tonic::Code::InvalidArgument,
            Kind::NotFound => tonic::Code::NotFound,
            Kind::AlreadyExists => tonic::Code::AlreadyExists,
            Kind::FailedPrecondition => tonic::Code::FailedPrecondition,
            Kind::OutOfRange => tonic::Code::OutOfRange,
            Kind::ResourceExhausted => tonic::Code::ResourceExhausted,
            Kind::Aborted => tonic::Code::Aborted,
            Kind::Unavailable => tonic::Code::Unavailable,
            Kind::Internal => tonic::Code::Internal,
        };
        tonic::Status::new(code, e.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_disk_is_resource_exhausted_and_maps_to_its_code() {
        let e = Error::io("creating", io::Error::from_raw_os_error(Errno::ENOSPC as i32));
        assert_eq!(e.kind(), Kind::ResourceExhausted);
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::ResourceExhausted);
        let e = Error::io("creating", io::Error::from_raw_os_error(Errno::EIO as i32));
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Internal);
        assert_eq!(tonic::Status::from(Error::not_found("x")).code(), tonic::Code::NotFound);
    }
}
