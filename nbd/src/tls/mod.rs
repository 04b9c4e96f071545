//! NBD over TLS (NBD_OPT_STARTTLS), with rustls.
//!
//! - [`config`]: the server's and the client's rustls configurations, from
//!   PEM files: TLS 1.3 only, client certificates required and verified
//!   against the cluster CA, no session tickets.
//! - [`identity`]: the node name a verified client certificate carries,
//!   which the export's access check can admit instead of an address.
//! - [`reload`]: a server configuration built again when its PEM files
//!   change, so renewed certificates apply without a restart.
//! - [`records`]: TLS records counted per connection, which is closed
//!   before its keys have protected too many (no KeyUpdate is ever sent).
//!
//! Where an export requires or allows TLS is [`TlsMode`]; the option
//! haggling that upgrades a connection is in `server::handshake`, the
//! client's side in [`crate::client::handshake_tls`].

pub mod config;
pub mod identity;
pub mod records;
pub mod reload;

pub use config::{ClientTls, ServerTls, TlsConfigError};
pub use identity::{IdentityError, node_name};
pub use records::{DEFAULT_RECORD_LIMIT, RecordLimit};

/// Whether an export speaks TLS (the NBD spec's server modes, per export).
#[derive(Debug, Clone, Default)]
pub enum TlsMode {
    /// No TLS (the spec's NOTLS): NBD_OPT_STARTTLS is refused with
    /// NBD_REP_ERR_POLICY and everything else works in plaintext.
    #[default]
    Off,
    /// The client chooses (SELECTIVETLS): plaintext sessions work as with
    /// `Off`, NBD_OPT_STARTTLS upgrades.
    Allowed(ServerTls),
    /// TLS before anything (FORCEDTLS): before NBD_OPT_STARTTLS every
    /// option but it and NBD_OPT_ABORT gets NBD_REP_ERR_TLS_REQD, and
    /// NBD_OPT_EXPORT_NAME closes the connection; no plaintext session
    /// reaches transmission.
    Required(ServerTls),
}

impl TlsMode {
    /// The server side of TLS, unless it is off.
    pub fn server(&self) -> Option<&ServerTls> {
        match self {
            Self::Off => None,
            Self::Allowed(tls) | Self::Required(tls) => Some(tls),
        }
    }

    pub fn is_required(&self) -> bool {
        matches!(self, Self::Required(_))
    }
}
