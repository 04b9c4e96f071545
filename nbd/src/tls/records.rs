//! Counting TLS records on the wire, to close a connection before its keys
//! have protected too many.
//!
//! A key may encrypt only so many records: for AES-GCM, RFC 8446 §5.5 puts
//! the limit at 2^24.5 full-size records per key. TLS 1.3 renews keys with a
//! KeyUpdate message, but a kernel TLS peer (the node's kTLS socket under
//! the NBD driver) cannot process one, so this server never sends one and
//! renews keys the other way: by closing the connection, which the client
//! reconnects with a new handshake. rustls would send a KeyUpdate on its
//! own once an AES-GCM key has encrypted 2^24 records; the counts here keep
//! every connection well below that.
//!
//! The counting happens below TLS, on the bytes that cross the socket: a
//! [`RecordCounter`] follows the framing of TLS records (a 5-byte header
//! whose last two bytes are the length of the body) through each
//! direction, so it counts exactly what was sent and received, handshake
//! records included, whatever sizes the writes and reads had.
//! [`RecordCounting`] wraps the socket: past the soft limit in either
//! direction it raises [`RecordLimit::reached`], and the connection stops
//! taking requests, sends the replies it owes and closes; it never lets a
//! record beyond the hard limit onto the wire (a write there fails).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

/// Records per direction after which a connection stops taking requests
/// and closes: 2^23. Half of rustls' own AES-GCM rekeying point (2^24,
/// itself under RFC 8446's 2^24.5), so the replies still owed when the
/// limit is reached fit in the other half: at most 512 queued replies of
/// at most 32 MiB, 2049 records each, about 2^20 records. At 16 KiB per
/// record the limit is 128 GiB of data per connection, so reconnecting for
/// fresh keys is rare.
pub const DEFAULT_RECORD_LIMIT: u64 = 1 << 23;

/// Bytes of a TLS record header: content type, legacy version, length.
pub const RECORD_HEADER_LEN: usize = 5;

/// Follows TLS record framing through one direction of a byte stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordCounter {
    header: [u8; RECORD_HEADER_LEN],
    /// Bytes of the current header seen so far.
    header_seen: usize,
    /// Bytes of the current record's body still to come.
    body_left: usize,
    /// Records whose header is complete.
    records: u64,
}

impl RecordCounter {
    /// Records begun so far (their header has passed).
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Between two records: the next byte starts a header.
    pub fn at_boundary(&self) -> bool {
        self.header_seen == 0 && self.body_left == 0
    }

    /// Takes the bytes that `buf` holds of the current header or body (not
    /// beyond it) and returns how many that was.
    fn step(&mut self, buf: &[u8]) -> usize {
        if self.body_left > 0 {
            let n = self.body_left.min(buf.len());
            self.body_left -= n;
            return n;
        }
        let n = (RECORD_HEADER_LEN - self.header_seen).min(buf.len());
        self.header[self.header_seen..self.header_seen + n].copy_from_slice(&buf[..n]);
        self.header_seen += n;
        if self.header_seen == RECORD_HEADER_LEN {
            self.header_seen = 0;
            self.records += 1;
            self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
        }
        n
    }

    /// Counts the records `buf` begins or continues.
    pub fn feed(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() {
            let n = self.step(buf);
            buf = &buf[n..];
        }
    }

    /// How many leading bytes of `buf` may pass without beginning a record
    /// beyond the `cap`-th.
    pub fn admissible(&self, buf: &[u8], cap: u64) -> usize {
        let mut probe = self.clone();
        let mut pos = 0;
        while pos < buf.len() {
            if probe.at_boundary() && probe.records >= cap {
                break;
            }
            pos += probe.step(&buf[pos..]);
        }
        pos
    }
}

#[derive(Debug)]
struct Shared {
    soft: u64,
    sent: AtomicU64,
    received: AtomicU64,
    reached: watch::Sender<bool>,
}

/// One connection's record limit: the counts so far, and the signal that
/// the soft limit was reached.
#[derive(Debug, Clone)]
pub struct RecordLimit(Arc<Shared>);

impl RecordLimit {
    /// A limit of `soft` records per direction (at least 1); the hard limit,
    /// past which nothing is written, is twice that.
    pub fn new(soft: u64) -> Self {
        let (reached, _) = watch::channel(false);
        let soft = soft.max(1);
        Self(Arc::new(Shared { soft, sent: AtomicU64::new(0), received: AtomicU64::new(0), reached }))
    }

    pub fn soft(&self) -> u64 {
        self.0.soft
    }

    pub fn hard(&self) -> u64 {
        self.0.soft.saturating_mul(2)
    }

    /// Records sent so far (begun on the wire).
    pub fn sent(&self) -> u64 {
        self.0.sent.load(Ordering::Relaxed)
    }

    /// Records received so far.
    pub fn received(&self) -> u64 {
        self.0.received.load(Ordering::Relaxed)
    }

    /// Turns true once either direction has reached the soft limit.
    pub fn reached(&self) -> watch::Receiver<bool> {
        self.0.reached.subscribe()
    }

    pub fn is_reached(&self) -> bool {
        *self.0.reached.borrow()
    }

    /// `records` sent so far, counted by whoever sees them.
    pub fn note_sent(&self, records: u64) {
        self.note(&self.0.sent, records);
    }

    /// `records` received so far, likewise.
    pub fn note_received(&self, records: u64) {
        self.note(&self.0.received, records);
    }

    fn note(&self, count: &AtomicU64, records: u64) {
        count.store(records, Ordering::Relaxed);
        if records >= self.0.soft && !self.is_reached() {
            self.0.reached.send_replace(true);
        }
    }
}

/// A byte stream whose TLS records are counted against a [`RecordLimit`].
#[derive(Debug)]
pub struct RecordCounting<S> {
    inner: S,
    limit: RecordLimit,
    sent: RecordCounter,
    received: RecordCounter,
}

impl<S> RecordCounting<S> {
    pub fn new(inner: S, limit: RecordLimit) -> Self {
        Self { inner, limit, sent: RecordCounter::default(), received: RecordCounter::default() }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The bytes received so far end with a whole record: whoever read
    /// them (rustls) holds no part of a record still to come.
    pub fn received_whole_records(&self) -> bool {
        self.received.at_boundary()
    }

    /// How much of `buf` may be written now; an error once the hard limit
    /// leaves nothing.
    fn admit(&self, buf: &[u8]) -> io::Result<usize> {
        let n = self.sent.admissible(buf, self.limit.hard());
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::other("TLS record limit reached: the connection must be renewed"));
        }
        Ok(n)
    }

    fn wrote(&mut self, bytes: &[u8]) {
        self.sent.feed(bytes);
        self.limit.note_sent(self.sent.records());
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RecordCounting<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.received.feed(&buf.filled()[before..]);
            this.limit.note_received(this.received.records());
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RecordCounting<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let n = match this.admit(buf) {
            Ok(n) => n,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let polled = Pin::new(&mut this.inner).poll_write(cx, &buf[..n]);
        if let Poll::Ready(Ok(written)) = polled {
            this.wrote(&buf[..written]);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // Whole slices up to the first one the limit cuts, so the counter
        // sees exactly the bytes written, in order.
        let this = &mut *self;
        let mut probe = this.sent.clone();
        let hard = this.limit.hard();
        let mut take = 0;
        for (i, slice) in bufs.iter().enumerate() {
            let n = probe.admissible(slice, hard);
            probe.feed(&slice[..n]);
            if n < slice.len() {
                if i == 0 {
                    // A partial first slice goes out through plain write.
                    return Pin::new(this).poll_write(cx, slice);
                }
                break;
            }
            take = i + 1;
        }
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, &bufs[..take]);
        if let Poll::Ready(Ok(mut written)) = polled {
            for slice in &bufs[..take] {
                let n = written.min(slice.len());
                this.wrote(&slice[..n]);
                written -= n;
                if written == 0 {
                    break;
                }
            }
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A record of `len` body bytes (application data, TLS 1.2 legacy version).
    fn record(len: u16, fill: u8) -> Vec<u8> {
        let mut out = vec![23, 3, 3];
        out.extend_from_slice(&len.to_be_bytes());
        out.resize(RECORD_HEADER_LEN + usize::from(len), fill);
        out
    }

    fn stream(lens: &[u16]) -> Vec<u8> {
        lens.iter().enumerate().flat_map(|(i, &len)| record(len, i as u8)).collect()
    }

    #[test]
    fn counts_records_however_the_bytes_are_cut() {
        let lens = [0, 1, 5, 16384 + 256, 300, 16384, 7];
        let bytes = stream(&lens);
        for piece in [1, 2, 3, 4, 5, 6, 7, 100, 4096, bytes.len()] {
            let mut counter = RecordCounter::default();
            for chunk in bytes.chunks(piece) {
                counter.feed(chunk);
            }
            assert_eq!(counter.records(), lens.len() as u64, "cut into pieces of {piece}");
            assert!(counter.at_boundary());
        }
        // Half a header is not a record yet; its fifth byte makes it one.
        let mut counter = RecordCounter::default();
        counter.feed(&bytes[..4]);
        assert_eq!((counter.records(), counter.at_boundary()), (0, false));
        counter.feed(&bytes[4..5]);
        assert_eq!((counter.records(), counter.at_boundary()), (1, true), "an empty record ends with its header");
    }

    #[test]
    fn admissible_stops_at_the_boundary_before_the_cap() {
        let bytes = stream(&[10, 20, 30]);
        let counter = RecordCounter::default();
        assert_eq!(counter.admissible(&bytes, 0), 0);
        assert_eq!(counter.admissible(&bytes, 1), 15);
        assert_eq!(counter.admissible(&bytes, 2), 15 + 25);
        assert_eq!(counter.admissible(&bytes, 3), bytes.len());
        // From the middle of a record: the rest of it may go, not the next.
        let mut mid = RecordCounter::default();
        mid.feed(&bytes[..7]);
        assert_eq!(mid.admissible(&bytes[7..], 1), 8);
        assert_eq!(mid, {
            let mut again = RecordCounter::default();
            again.feed(&bytes[..7]);
            again
        });
    }

    #[test]
    fn the_default_limit_is_below_rustls_rekeying_and_rfc_8446() {
        // rustls sends a KeyUpdate once an AES-GCM key has encrypted 2^24
        // records; RFC 8446 §5.5 allows 2^24.5. The hard limit stays at
        // rustls' point, the soft one (where the connection drains) half.
        let limit = RecordLimit::new(DEFAULT_RECORD_LIMIT);
        assert_eq!(limit.soft(), 1 << 23);
        assert_eq!(limit.hard(), 1 << 24);
        assert!((limit.hard() as f64) < 2f64.powf(24.5));
        // What may still be owed when the soft limit is reached: 512 queued
        // replies of 32 MiB, each 2048 full records plus a header's.
        assert!(512 * 2049 < limit.hard() - limit.soft());
    }

    #[tokio::test]
    async fn the_soft_limit_raises_the_signal_and_the_hard_limit_stops_writes() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let limit = RecordLimit::new(2);
        let mut reached = limit.reached();
        let mut counting = RecordCounting::new(near, limit.clone());
        counting.write_all(&record(3, 1)).await.unwrap();
        assert!(!*reached.borrow_and_update());
        counting.write_all(&stream(&[4, 5])).await.unwrap();
        assert!(*reached.borrow_and_update(), "two records sent reach a soft limit of 2");
        assert_eq!(limit.sent(), 3);
        // One more record is within the hard limit (4); the fifth is refused
        // before a byte of it is written.
        let err = counting.write_all(&stream(&[6, 7])).await.unwrap_err();
        assert!(err.to_string().contains("record limit"), "{err}");
        assert_eq!(limit.sent(), 4);
        drop(counting);
        let mut wire = Vec::new();
        far.read_to_end(&mut wire).await.unwrap();
        assert_eq!(wire, [record(3, 1), stream(&[4, 5]), record(6, 0)].concat());
        // Records received count too.
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let limit = RecordLimit::new(3);
        let mut counting = RecordCounting::new(near, limit.clone());
        far.write_all(&stream(&[1, 2, 3])).await.unwrap();
        let mut buf = vec![0; 5 * 3 + 6];
        counting.read_exact(&mut buf).await.unwrap();
        assert_eq!(limit.received(), 3);
        assert!(limit.is_reached());
    }
}
