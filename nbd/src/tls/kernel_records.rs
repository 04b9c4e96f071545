//! The record limit of a connection whose TLS the kernel runs (kTLS on the
//! server's socket): the same [`RecordLimit`] as in userspace, counted
//! without seeing the records.
//!
//! Userspace TLS counts records on the wire (`records`). Under kTLS the
//! kernel cuts the bytes we send into records and decrypts the ones we
//! receive, so the two directions are counted differently:
//!
//! - **Sent: bounded from above, before each send.** Linux's kTLS closes a
//!   record when it holds 2^14 bytes of plaintext or when a send call
//!   ends (a record left open by a partial, non-blocking send is continued
//!   by the next call). A call of `n` bytes therefore begins at most
//!   ⌈n / 2^14⌉ ≤ 1 + ⌊n / 2^14⌋ new records, and over a connection
//!   `records ≤ calls + bytes / 2^14` (plus what rustls sent before the
//!   hand-over, whose exact count comes with the secrets). [`SendBound`]
//!   adds each call's share after it returns and, before it, cuts the call
//!   so that the bound cannot pass the hard limit: no record beyond it
//!   reaches the wire, whatever the kernel does inside the bound. Both the
//!   writer's write calls and its sendfile(2) calls count. The bound is
//!   close to exact for this server's writes (one call per batch of
//!   replies, or per READ's data); the connection logs the kernel's own
//!   count beside it when it ends (`ktls::records_sent`).
//! - **Received: the kernel's own count.** How many records a peer used is
//!   not bounded by the bytes (records may be tiny), but the kernel keeps
//!   the next record's sequence number, which `getsockopt(SOL_TLS,
//!   TLS_RX)` returns: [`ReceiveCheck`] reads it every
//!   [`RECEIVE_CHECK_BYTES`] of plaintext. A record the peer sends carries
//!   at least one byte of plaintext unless it is empty, so between two
//!   checks fewer than [`RECEIVE_CHECK_BYTES`] + one read's worth of
//!   records go by: far less than the 2^23 between the soft and the hard
//!   limit. (Empty records cost the peer's key nothing secret.)
//!
//! Reaching the soft limit either way raises [`RecordLimit::reached`], and
//! the connection drains and closes as in userspace.

use std::io;

use super::records::RecordLimit;

/// Plaintext bytes a TLS record holds at most (RFC 8446 §5.1).
pub const MAX_RECORD_PLAINTEXT: usize = 1 << 14;

/// Plaintext bytes received between two reads of the kernel's receive
/// sequence number.
pub const RECEIVE_CHECK_BYTES: u64 = 1 << 20;

/// An upper bound on the records the kernel has sent on one connection,
/// kept by its only writer.
#[derive(Debug)]
pub struct SendBound {
    limit: RecordLimit,
    bound: u64,
}

impl SendBound {
    /// `sent_before`: the records rustls sent under the same keys before
    /// the hand-over (its transmit sequence number).
    pub fn new(limit: RecordLimit, sent_before: u64) -> Self {
        limit.note_sent(sent_before);
        Self { limit, bound: sent_before }
    }

    /// The bound so far.
    pub fn records(&self) -> u64 {
        self.bound
    }

    /// How many of `len` bytes the next send call may carry so that the
    /// bound stays within the hard limit; an error once no call fits.
    pub fn admit(&self, len: usize) -> io::Result<usize> {
        let room = self.limit.hard().saturating_sub(self.bound);
        if room == 0 && len > 0 {
            return Err(io::Error::other("TLS record limit reached: the connection must be renewed"));
        }
        // 1 + ⌊n / 2^14⌋ ≤ room  ⇔  n < room · 2^14
        let most = usize::try_from(room).unwrap_or(usize::MAX).saturating_mul(MAX_RECORD_PLAINTEXT).saturating_sub(1);
        Ok(len.min(most))
    }

    /// A send call carried `bytes` (none: a call that failed or would
    /// have blocked began no record).
    pub fn sent(&mut self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.bound += 1 + (bytes / MAX_RECORD_PLAINTEXT) as u64;
        self.limit.note_sent(self.bound);
    }
}

/// When to read the kernel's receive sequence number again, kept by the
/// connection's only reader.
#[derive(Debug)]
pub struct ReceiveCheck {
    limit: RecordLimit,
    unchecked: u64,
}

impl ReceiveCheck {
    /// `received_before`: the records rustls received under the same keys
    /// before the hand-over (its receive sequence number).
    pub fn new(limit: RecordLimit, received_before: u64) -> Self {
        limit.note_received(received_before);
        Self { limit, unchecked: 0 }
    }

    /// `bytes` of plaintext were read; true when the sequence number is
    /// due to be read.
    pub fn read(&mut self, bytes: usize) -> bool {
        self.unchecked += bytes as u64;
        self.unchecked >= RECEIVE_CHECK_BYTES
    }

    /// The kernel says `records` have been received so far.
    pub fn checked(&mut self, records: u64) {
        self.unchecked = 0;
        self.limit.note_received(records);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's kTLS transmit path as the module doc describes it: records
    /// close when full, or when a call that sent all it was given ends; a
    /// call cut short (socket buffer full) leaves its record open.
    #[derive(Default)]
    struct KernelModel {
        open: usize,
        records: u64,
    }

    impl KernelModel {
        fn send(&mut self, given: usize, accepted: usize) {
            let mut left = accepted;
            while left > 0 {
                if self.open == 0 {
                    self.records += 1;
                }
                let take = left.min(MAX_RECORD_PLAINTEXT - self.open);
                self.open += take;
                left -= take;
                if self.open == MAX_RECORD_PLAINTEXT {
                    self.open = 0;
                }
            }
            if accepted == given {
                self.open = 0;
            }
        }
    }

    #[test]
    fn the_bound_is_never_below_what_the_kernel_makes() {
        let limit = RecordLimit::new(1 << 40);
        let mut bound = SendBound::new(limit.clone(), 3);
        let mut kernel = KernelModel { open: 0, records: 3 };
        // Sizes of this server's writes: headers, 4 KiB replies, batches,
        // large READs; some calls accepted only in part.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let given = [16, 4096 + 16, 16384, 16385, 65536 + 24, 1 << 20, 32 << 20][(seed % 7) as usize];
            let given = bound.admit(given).unwrap();
            let accepted = if seed.is_multiple_of(5) { (seed as usize >> 8) % given + 1 } else { given };
            kernel.send(given, accepted);
            bound.sent(accepted);
            assert!(kernel.records <= bound.records(), "{} records made, bound {}", kernel.records, bound.records());
        }
        assert_eq!(limit.sent(), bound.records());
        // Close to exact on full-size calls: 1 MiB is 64 records, bound 65.
        let mut bound = SendBound::new(RecordLimit::new(1 << 40), 0);
        bound.sent(1 << 20);
        assert_eq!(bound.records(), 65);
    }

    #[test]
    fn calls_are_cut_at_the_hard_limit_and_the_soft_limit_raises_the_signal() {
        // Soft 4, hard 8 records; 2 already sent by rustls.
        let limit = RecordLimit::new(4);
        let mut bound = SendBound::new(limit.clone(), 2);
        assert!(!limit.is_reached());
        // 6 records of room: a call may carry less than 6 · 2^14 bytes.
        assert_eq!(bound.admit(1 << 30).unwrap(), 6 * MAX_RECORD_PLAINTEXT - 1);
        assert_eq!(bound.admit(100).unwrap(), 100);
        bound.sent(MAX_RECORD_PLAINTEXT + 1);
        assert_eq!((bound.records(), limit.is_reached()), (4, true), "2 + 1 + 1 reaches the soft limit");
        bound.sent(0);
        assert_eq!(bound.records(), 4, "a call that sent nothing began nothing");
        bound.sent(3 * MAX_RECORD_PLAINTEXT);
        assert_eq!(bound.records(), 8);
        let err = bound.admit(1).unwrap_err();
        assert!(err.to_string().contains("record limit"), "{err}");
        assert_eq!(bound.admit(0).unwrap(), 0);
        assert_eq!(limit.sent(), 8);
    }

    #[test]
    fn the_receive_count_is_checked_every_mebibyte_and_raises_the_signal() {
        let limit = RecordLimit::new(100);
        let mut check = ReceiveCheck::new(limit.clone(), 4);
        assert_eq!(limit.received(), 4);
        assert!(!check.read(RECEIVE_CHECK_BYTES as usize - 1));
        assert!(check.read(1), "a mebibyte read: due");
        check.checked(60);
        assert!(!check.read(4096), "counted again from the check");
        assert_eq!((limit.received(), limit.is_reached()), (60, false));
        check.checked(100);
        assert!(limit.is_reached());
    }
}
