//! Every number of the NBD protocol this project uses, in one place; the
//! flag fields are types of their own, in [`crate::flags`].
//!
//! Sources: NetworkBlockDevice/nbd `doc/proto.md`. Each value is pinned by a
//! unit test at the bottom of this file (the flags by theirs), because a
//! wrong number here is exactly the qemu 3.0 bug this project exists to
//! avoid (SEND_CACHE on bit 8).

/// Magic numbers and fixed protocol values.
pub mod magic {
    /// "NBDMAGIC", first 8 bytes the server sends.
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    /// "IHAVEOPT", newstyle negotiation marker and option request magic.
    pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
    /// Oldstyle negotiation magic (never sent by this server; recognised by the client).
    pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
    pub const OPTION_REPLY: u64 = 0x0003_e889_0455_65a9;
    pub const REQUEST: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY: u32 = 0x6744_6698;
    pub const STRUCTURED_REPLY: u32 = 0x668e_33ef;
    /// Experimental extended headers: recognised so they can be refused.
    pub const EXTENDED_REQUEST: u32 = 0x21e4_1c71;
    pub const EXTENDED_REPLY: u32 = 0x6e8a_278c;
    pub const DEFAULT_PORT: u16 = 10809;
}

/// Option types (u32) sent during option haggling.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    /// Withdrawn PEEK_EXPORT; never valid.
    pub const PEEK_EXPORT: u32 = 4;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (u32). Errors have bit 31 set.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    pub const ERR_BIT: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR_BIT + 1;
    pub const ERR_POLICY: u32 = ERR_BIT + 2;
    pub const ERR_INVALID: u32 = ERR_BIT + 3;
    pub const ERR_PLATFORM: u32 = ERR_BIT + 4;
    pub const ERR_TLS_REQD: u32 = ERR_BIT + 5;
    pub const ERR_UNKNOWN: u32 = ERR_BIT + 6;
    pub const ERR_SHUTDOWN: u32 = ERR_BIT + 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT + 8;
    pub const ERR_TOO_BIG: u32 = ERR_BIT + 9;
    pub const ERR_EXT_HEADER_REQD: u32 = ERR_BIT + 10;
}

/// NBD_INFO item types (u16) in NBD_OPT_INFO/GO requests and NBD_REP_INFO replies.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission command types (u16).
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
    pub const RESIZE: u16 = 8;
}

/// Structured reply chunk types (u16).
pub mod reply_type {
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const BLOCK_STATUS_EXT: u16 = 6;
    pub const ERROR: u16 = (1 << 15) + 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// Error values carried in replies. They are the spec's, not the host's errno.
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// The `base:allocation` metadata context and its state bits.
pub mod base_allocation {
    pub const NAME: &str = "base:allocation";
    pub const STATE_HOLE: u32 = 1 << 0;
    pub const STATE_ZERO: u32 = 1 << 1;
}

/// Block size constraints this project announces and enforces.
pub mod limits {
    /// Maximum READ/WRITE payload, announced in NBD_INFO_BLOCK_SIZE (2^25).
    pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
    pub const MIN_BLOCK: u32 = 1;
    pub const PREFERRED_BLOCK: u32 = 4096;
    /// Longest option payload accepted during the handshake. Names and
    /// queries are at most 4096 bytes by the spec; a few of them fit.
    pub const MAX_OPTION_LEN: u32 = 64 * 1024;
    /// Longest string (export name, description, query) accepted.
    pub const MAX_STRING_LEN: u32 = 4096;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_match_spec() {
        assert_eq!(&magic::NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&magic::IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(magic::CLISERV_MAGIC, 0x00420281861253);
        assert_eq!(magic::OPTION_REPLY, 0x3e889045565a9);
        assert_eq!(magic::REQUEST, 0x25609513);
        assert_eq!(magic::SIMPLE_REPLY, 0x67446698);
        assert_eq!(magic::STRUCTURED_REPLY, 0x668e33ef);
        assert_eq!(magic::EXTENDED_REQUEST, 0x21e41c71);
        assert_eq!(magic::EXTENDED_REPLY, 0x6e8a278c);
        assert_eq!(magic::DEFAULT_PORT, 10809);
    }

    #[test]
    fn options_and_replies_match_spec() {
        let opts = [
            opt::EXPORT_NAME,
            opt::ABORT,
            opt::LIST,
            opt::PEEK_EXPORT,
            opt::STARTTLS,
            opt::INFO,
            opt::GO,
            opt::STRUCTURED_REPLY,
            opt::LIST_META_CONTEXT,
            opt::SET_META_CONTEXT,
            opt::EXTENDED_HEADERS,
        ];
        assert_eq!(opts, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!([rep::ACK, rep::SERVER, rep::INFO, rep::META_CONTEXT], [1, 2, 3, 4]);
        let errs = [
            rep::ERR_UNSUP,
            rep::ERR_POLICY,
            rep::ERR_INVALID,
            rep::ERR_PLATFORM,
            rep::ERR_TLS_REQD,
            rep::ERR_UNKNOWN,
            rep::ERR_SHUTDOWN,
            rep::ERR_BLOCK_SIZE_REQD,
            rep::ERR_TOO_BIG,
            rep::ERR_EXT_HEADER_REQD,
        ];
        for (i, e) in errs.into_iter().enumerate() {
            assert_eq!(e, 0x8000_0000 + i as u32 + 1);
        }
        assert_eq!([info::EXPORT, info::NAME, info::DESCRIPTION, info::BLOCK_SIZE], [0, 1, 2, 3]);
    }

    /// The numbers NBD_OPT_STARTTLS haggling uses, as the spec's TLS
    /// section and its option and reply lists give them: STARTTLS is
    /// option 5; NOTLS answers it with ERR_POLICY (2^31 + 2), a second one
    /// gets ERR_INVALID (2^31 + 3), and FORCEDTLS answers other options
    /// before TLS with ERR_TLS_REQD (2^31 + 5).
    #[test]
    fn tls_numbers_match_spec() {
        assert_eq!(opt::STARTTLS, 5);
        assert_eq!(rep::ERR_POLICY, (1 << 31) + 2);
        assert_eq!(rep::ERR_INVALID, (1 << 31) + 3);
        assert_eq!(rep::ERR_TLS_REQD, (1 << 31) + 5);
        assert_eq!(rep::ERR_TLS_REQD, 0x8000_0005);
    }

    #[test]
    fn commands_and_reply_types_match_spec() {
        let cmds = [
            cmd::READ,
            cmd::WRITE,
            cmd::DISC,
            cmd::FLUSH,
            cmd::TRIM,
            cmd::CACHE,
            cmd::WRITE_ZEROES,
            cmd::BLOCK_STATUS,
            cmd::RESIZE,
        ];
        assert_eq!(cmds, [0, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(reply_type::NONE, 0);
        assert_eq!(reply_type::OFFSET_DATA, 1);
        assert_eq!(reply_type::OFFSET_HOLE, 2);
        assert_eq!(reply_type::BLOCK_STATUS, 5);
        assert_eq!(reply_type::BLOCK_STATUS_EXT, 6);
        assert_eq!(reply_type::ERROR, 32769);
        assert_eq!(reply_type::ERROR_OFFSET, 32770);
        assert_eq!(base_allocation::STATE_HOLE, 1);
        assert_eq!(base_allocation::STATE_ZERO, 2);
    }

    #[test]
    fn errnos_match_spec() {
        use errno::*;
        assert_eq!(
            [EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN],
            [1, 5, 12, 22, 28, 75, 95, 108]
        );
    }

    #[test]
    fn default_limits_match_spec() {
        assert_eq!(limits::MAX_PAYLOAD, 1 << 25);
        assert_eq!(limits::PREFERRED_BLOCK, 1 << 12);
        assert_eq!(limits::MIN_BLOCK, 1);
    }
}
