//! `nbd://HOST[:PORT]/EXPORT` URIs, as the controller publishes them: the
//! type and its parser are the contract both binaries share
//! ([`csi_proto::contract`]); this is the node's name for them.

pub use csi_proto::contract::NbdUri;
