//! The crate's one error type: a gRPC-facing kind, a message, and the cause.

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

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Kind::Unavailable, message)
    }

    /// A Kubernetes API call `what` failed: the API server's refusals keep
    /// their meaning (404 NOT_FOUND, 409 ABORTED: someone else changed the
    /// object, 400/422 INVALID_ARGUMENT, 429 and 5xx UNAVAILABLE); a
    /// forbidden call is the install's RBAC (INTERNAL); anything that never
    /// got an answer (connection refused, timeout, TLS) is UNAVAILABLE:
    /// the API server may be back for the retry.
    pub fn kube(what: &str, e: kube::Error) -> Self {
        let kind = match &e {
            kube::Error::Api(status) => match status.code {
                404 => Kind::NotFound,
                409 => Kind::Aborted,
                400 | 422 => Kind::InvalidArgument,
                429 | 500..=599 => Kind::Unavailable,
                _ => Kind::Internal,
            },
            kube::Error::SerdeError(_) | kube::Error::BuildRequest(_) => Kind::Internal,
            _ => Kind::Unavailable,
        };
        Self::new(kind, format!("{what}: {e}")).with_source(e)
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }
}

/// The storage agent's failures keep their message and cause; their kind
/// becomes the CSI kind it stands for.
impl From<agent::Error> for Error {
    fn from(e: agent::Error) -> Self {
        let kind = match e.kind() {
            agent::Kind::InvalidArgument => Kind::InvalidArgument,
            agent::Kind::NotFound => Kind::NotFound,
            agent::Kind::FailedPrecondition => Kind::FailedPrecondition,
            agent::Kind::ResourceExhausted => Kind::ResourceExhausted,
            agent::Kind::Unavailable => Kind::Unavailable,
            agent::Kind::Internal => Kind::Internal,
        };
        let message = e.message().to_owned();
        Self { kind, message, source: e.into_source() }
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
    use std::io;

    use nix::errno::Errno;

    use super::*;

    #[test]
    fn agent_failures_keep_their_message_and_map_to_their_code() {
        let full = agent::Error::io("creating", io::Error::from_raw_os_error(Errno::ENOSPC as i32));
        let message = full.to_string();
        let e = Error::from(full);
        assert_eq!(e.kind(), Kind::ResourceExhausted);
        assert!(std::error::Error::source(&e).is_some(), "the cause is kept");
        let status = tonic::Status::from(e);
        assert_eq!((status.code(), status.message()), (tonic::Code::ResourceExhausted, message.as_str()));
        let e = agent::Error::io("creating", io::Error::from_raw_os_error(Errno::EIO as i32));
        assert_eq!(tonic::Status::from(Error::from(e)).code(), tonic::Code::Internal);
        let e = Error::kube(
            "creating",
            kube::Error::Api(Box::new(kube::core::Status::failure("taken", "AlreadyExists").with_code(409))),
        );
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Aborted);
        let e = agent::Error::precondition("volume vol-1: image file is missing");
        assert_eq!(tonic::Status::from(Error::from(e)).code(), tonic::Code::FailedPrecondition);
        assert_eq!(tonic::Status::from(Error::not_found("x")).code(), tonic::Code::NotFound);
    }
}
