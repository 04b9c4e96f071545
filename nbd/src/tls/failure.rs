//! Why a TLS handshake failed, in the few classes a metric can carry.

use std::io;

/// The class of a failed server-side TLS handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// A certificate was refused: the client sent none, or one that does
    /// not chain to the CA, or the client refused ours.
    Certificate,
    /// Any other TLS error: no common version or cipher, a malformed or
    /// unexpected message.
    Protocol,
    /// The connection failed or closed in the middle of the handshake.
    Io,
    /// The handshake did not finish before the export's deadline.
    Timeout,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 4] = [Self::Certificate, Self::Protocol, Self::Io, Self::Timeout];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Certificate => "certificate",
            Self::Protocol => "protocol",
            Self::Io => "io",
            Self::Timeout => "timeout",
        }
    }

    /// This class's index in [`HandshakeFailure::ALL`].
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|f| *f == self).unwrap_or(0)
    }

    /// The class of the error tokio-rustls' acceptor returned: rustls'
    /// own errors travel inside the `io::Error`.
    pub fn of(error: &io::Error) -> Self {
        use rustls::AlertDescription as alert;
        let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
            return Self::Io;
        };
        match tls {
            rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => Self::Certificate,
            rustls::Error::AlertReceived(
                alert::BadCertificate
                | alert::UnsupportedCertificate
                | alert::CertificateRevoked
                | alert::CertificateExpired
                | alert::CertificateUnknown
                | alert::UnknownCA
                | alert::CertificateRequired,
            ) => Self::Certificate,
            _ => Self::Protocol,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_errors_inside_io_errors_are_classified() {
        let wrap = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        assert_eq!(HandshakeFailure::of(&wrap(rustls::Error::NoCertificatesPresented)), HandshakeFailure::Certificate);
        let unknown_ca = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        assert_eq!(HandshakeFailure::of(&wrap(unknown_ca)), HandshakeFailure::Certificate);
        let refused = rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA);
        assert_eq!(HandshakeFailure::of(&wrap(refused)), HandshakeFailure::Certificate);
        let version = rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic);
        assert_eq!(HandshakeFailure::of(&wrap(version)), HandshakeFailure::Protocol);
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert_eq!(HandshakeFailure::of(&eof), HandshakeFailure::Io);
        let labels: Vec<_> = HandshakeFailure::ALL.iter().map(|f| f.label()).collect();
        assert_eq!(labels, ["certificate", "protocol", "io", "timeout"]);
        assert!(HandshakeFailure::ALL.iter().enumerate().all(|(i, f)| f.index() == i));
    }
}
