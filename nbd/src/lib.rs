//! The Network Block Device protocol, as nbd-csi speaks it.
//!
//! - [`consts`]: every number from the spec, pinned by tests.
//! - [`flags`]: the flag fields as distinct types, pinned by tests.
//! - [`wire`]: pure encode/decode of handshake and transmission messages.
//! - [`client`]: the client side of the fixed-newstyle handshake (the node
//!   plugin hands the negotiated socket to the kernel afterwards).
//! - [`server`]: a tokio export server, one per volume, over a shared file.
//! - [`tls`]: NBD_OPT_STARTTLS with rustls: configurations, the client's
//!   node identity, the per-connection record limit.
//! - [`ktls`]: a finished rustls session handed to the kernel (kTLS).

pub mod client;
pub mod consts;
pub mod error;
pub mod flags;
pub mod ktls;
pub mod server;
pub mod tls;
pub mod wire;

pub use consts::*;
pub use error::{Error, ErrorKind, Result};
pub use flags::{ClientFlags, CommandFlags, HandshakeFlags, ReplyFlags, TransmissionFlags};
