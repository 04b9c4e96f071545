//! The protocol's flag fields, one type per field, so a bit of one field
//! cannot be tested against, or sent in, another: a command flag is not a
//! transmission flag even though both are a `u16` on the wire.
//!
//! Sources: NetworkBlockDevice/nbd `doc/proto.md`, "Flag fields". Every bit
//! is pinned by a unit test at the bottom of this file.
//!
//! Unknown bits. The decoders in [`crate::wire`] keep every bit they read
//! (`from_bits_retain`): clients ignore unknown transmission, handshake and
//! reply flags, and the server answers a request carrying a command flag it
//! does not accept with `EINVAL`, which needs the bit to still be there.
//! Client flags are the one field where the spec demands a hang-up on an
//! unknown bit; the server parses them with [`ClientFlags::from_bits`].
//! Note that `!flags` drops unknown bits: use `difference` to keep them.
//!
//! ```compile_fail,E0308
//! // Flags of different fields do not combine.
//! let _ = nbd::TransmissionFlags::HAS_FLAGS | nbd::CommandFlags::FUA;
//! ```
//!
//! ```compile_fail,E0308
//! // Nor does a server handshake flag stand for a client flag.
//! let _ = nbd::ClientFlags::all().contains(nbd::HandshakeFlags::NO_ZEROES);
//! ```
//!
//! ```
//! // The same expressions within one field compile (and keep the doc tests
//! // above honest: they fail for the mixing, not for a typo).
//! let _ = nbd::TransmissionFlags::HAS_FLAGS | nbd::TransmissionFlags::SEND_FLUSH;
//! let _ = nbd::ClientFlags::all().contains(nbd::ClientFlags::C_NO_ZEROES);
//! ```

use bitflags::bitflags;

bitflags! {
    /// Handshake flags: the server's 16 bits after NBDMAGIC and IHAVEOPT.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct HandshakeFlags: u16 {
        /// The server speaks fixed newstyle.
        const FIXED_NEWSTYLE = 1 << 0;
        /// The server may leave out the 124 zero bytes after EXPORT_NAME.
        const NO_ZEROES = 1 << 1;
    }
}

bitflags! {
    /// Client flags: the client's 32 bits after the greeting. The spec makes
    /// the server hang up on any bit not defined here.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ClientFlags: u32 {
        const C_FIXED_NEWSTYLE = 1 << 0;
        /// Only when the server offered NO_ZEROES.
        const C_NO_ZEROES = 1 << 1;
    }
}

bitflags! {
    /// Transmission flags (16 bits) describing an export, sent at the end of
    /// the handshake.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct TransmissionFlags: u16 {
        /// Always set.
        const HAS_FLAGS = 1 << 0;
        const READ_ONLY = 1 << 1;
        const SEND_FLUSH = 1 << 2;
        const SEND_FUA = 1 << 3;
        const ROTATIONAL = 1 << 4;
        const SEND_TRIM = 1 << 5;
        const SEND_WRITE_ZEROES = 1 << 6;
        /// Only once structured replies are negotiated.
        const SEND_DF = 1 << 7;
        /// The only bit that allows a client to use several connections:
        /// FLUSH and FUA are then visible across all of them.
        const CAN_MULTI_CONN = 1 << 8;
        /// Experimental RESIZE extension.
        const SEND_RESIZE = 1 << 9;
        /// qemu 3.0 wrongly used bit 8 for this; the spec says bit 10.
        const SEND_CACHE = 1 << 10;
        const SEND_FAST_ZERO = 1 << 11;
        /// Experimental EXTENDED_HEADERS extension.
        const BLOCK_STATUS_PAYLOAD = 1 << 12;
    }
}

bitflags! {
    /// Command flags (16 bits) in a transmission request.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct CommandFlags: u16 {
        /// Valid on every command once SEND_FUA is negotiated.
        const FUA = 1 << 0;
        /// WRITE_ZEROES: do not punch a hole.
        const NO_HOLE = 1 << 1;
        /// READ: one content chunk only (structured replies).
        const DF = 1 << 2;
        /// BLOCK_STATUS: one extent only.
        const REQ_ONE = 1 << 3;
        /// WRITE_ZEROES: fail with ENOTSUP rather than be slow.
        const FAST_ZERO = 1 << 4;
        /// Experimental EXTENDED_HEADERS extension.
        const PAYLOAD_LEN = 1 << 5;
    }
}

bitflags! {
    /// Structured reply chunk flags (16 bits).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ReplyFlags: u16 {
        /// The last chunk of the reply.
        const DONE = 1 << 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asserts each flag is the single bit given, and that the type defines
    /// no other flag (a flag added without a pin fails here).
    fn assert_bits<F: bitflags::Flags + std::fmt::Debug>(expected: &[(F, u32)])
    where
        F::Bits: Into<u64>,
    {
        let mut union = 0u64;
        for (flag, bit) in expected {
            assert_eq!(flag.bits().into(), 1u64 << bit, "{flag:?} is bit {bit}");
            union |= 1u64 << bit;
        }
        assert_eq!(F::all().bits().into(), union, "every flag of the type is pinned");
        assert_eq!(F::FLAGS.len(), expected.len(), "every flag of the type is pinned");
    }

    #[test]
    fn multi_conn_is_bit_8_and_cache_is_bit_10() {
        // The seed bug: qemu 3.0 put SEND_CACHE on bit 8.
        assert_eq!(TransmissionFlags::CAN_MULTI_CONN.bits(), 1 << 8);
        assert_eq!(TransmissionFlags::SEND_RESIZE.bits(), 1 << 9);
        assert_eq!(TransmissionFlags::SEND_CACHE.bits(), 1 << 10);
        assert_ne!(TransmissionFlags::CAN_MULTI_CONN, TransmissionFlags::SEND_CACHE);
        assert!(!TransmissionFlags::from_bits_retain(1 << 10).contains(TransmissionFlags::CAN_MULTI_CONN));
        assert!(TransmissionFlags::from_bits_retain(1 << 8).contains(TransmissionFlags::CAN_MULTI_CONN));
    }

    #[test]
    fn transmission_flags_match_spec() {
        use TransmissionFlags as T;
        assert_bits(&[
            (T::HAS_FLAGS, 0),
            (T::READ_ONLY, 1),
            (T::SEND_FLUSH, 2),
            (T::SEND_FUA, 3),
            (T::ROTATIONAL, 4),
            (T::SEND_TRIM, 5),
            (T::SEND_WRITE_ZEROES, 6),
            (T::SEND_DF, 7),
            (T::CAN_MULTI_CONN, 8),
            (T::SEND_RESIZE, 9),
            (T::SEND_CACHE, 10),
            (T::SEND_FAST_ZERO, 11),
            (T::BLOCK_STATUS_PAYLOAD, 12),
        ]);
    }

    #[test]
    fn handshake_and_client_flags_match_spec() {
        assert_bits(&[(HandshakeFlags::FIXED_NEWSTYLE, 0), (HandshakeFlags::NO_ZEROES, 1)]);
        assert_bits(&[(ClientFlags::C_FIXED_NEWSTYLE, 0), (ClientFlags::C_NO_ZEROES, 1)]);
    }

    #[test]
    fn command_and_reply_flags_match_spec() {
        use CommandFlags as C;
        assert_bits(&[
            (C::FUA, 0),
            (C::NO_HOLE, 1),
            (C::DF, 2),
            (C::REQ_ONE, 3),
            (C::FAST_ZERO, 4),
            (C::PAYLOAD_LEN, 5),
        ]);
        assert_bits(&[(ReplyFlags::DONE, 0)]);
    }

    #[test]
    fn unknown_client_flags_do_not_parse() {
        assert_eq!(ClientFlags::from_bits(0b11), Some(ClientFlags::C_FIXED_NEWSTYLE | ClientFlags::C_NO_ZEROES));
        assert_eq!(ClientFlags::from_bits(0), Some(ClientFlags::empty()));
        for bit in 2..32 {
            assert_eq!(ClientFlags::from_bits(1 | 1 << bit), None, "bit {bit}");
        }
    }

    #[test]
    fn retained_unknown_bits_survive_and_fail_contains() {
        // What the server's flag check relies on: an unknown command bit
        // kept by the decoder is not contained in any set of known flags.
        let raw = CommandFlags::from_bits_retain(CommandFlags::FUA.bits() | 1 << 15);
        assert_eq!(raw.bits(), 0x8001);
        assert!(!CommandFlags::all().contains(raw));
        assert!(!raw.difference(CommandFlags::FUA).is_empty());
        // And `!` would have dropped it: the reason `difference` is used.
        assert_eq!((!CommandFlags::empty()).bits(), CommandFlags::all().bits());
    }
}
