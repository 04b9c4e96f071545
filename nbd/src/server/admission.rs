//! Who gets a connection slot, before any protocol work: at most so many
//! connections per export and per source address, counted from accept
//! (a client still in its handshake holds its slot) to close.
//!
//! Every export of a process shares its descriptor limit, so without caps
//! one client opening idle connections to one volume makes every other
//! volume unreachable. A connection over a cap is closed right after
//! accept, before the greeting: a flood costs an accept and a close per
//! connection, and refusals are logged once per burst with a count, not
//! once per connection. Accept errors (out of descriptors) back off instead
//! of spinning on a listener that stays readable.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// At most one refusal line per this interval; the next one counts what
/// was refused meanwhile.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Why a connection was closed unserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The export holds its maximum number of connections.
    ExportFull,
    /// The peer's address holds its maximum number of connections.
    PeerFull,
    /// The access policy does not admit the peer.
    NotAllowed,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// Open connections of one export, by peer address.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    counts: Arc<Mutex<Counts>>,
    max_total: usize,
    max_per_peer: usize,
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_peer: usize) -> Self {
        Self { counts: Arc::default(), max_total, max_per_peer }
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        // Plain counters: a panic elsewhere leaves them consistent.
        self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A slot for a new connection from `peer`, held until it closes.
    pub fn admit(&self, peer: IpAddr) -> Result<Slot, Refused> {
        let peer = peer.to_canonical();
        let mut counts = self.lock();
        if counts.total >= self.max_total {
            return Err(Refused::ExportFull);
        }
        let of_peer = counts.per_peer.entry(peer).or_default();
        if *of_peer >= self.max_per_peer {
            return Err(Refused::PeerFull);
        }
        *of_peer += 1;
        counts.total += 1;
        Ok(Slot { limits: self.clone(), peer })
    }
}

/// One counted connection; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    limits: ConnectionLimits,
    peer: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.limits.lock();
        counts.total -= 1;
        if let Some(of_peer) = counts.per_peer.get_mut(&self.peer) {
            *of_peer -= 1;
            if *of_peer == 0 {
                counts.per_peer.remove(&self.peer);
            }
        }
    }
}

/// Refusals since the last line, by reason.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RefusalReport {
    pub export_full: u64,
    pub peer_full: u64,
    pub not_allowed: u64,
    /// The last peer refused, as an example.
    pub last_peer: Option<SocketAddr>,
}

impl RefusalReport {
    fn total(&self) -> u64 {
        self.export_full + self.peer_full + self.not_allowed
    }

    fn log(&self) {
        let peer = self.last_peer.map(|p| p.to_string()).unwrap_or_default();
        let (refused, export_full, peer_full, not_allowed) =
            (self.total(), self.export_full, self.peer_full, self.not_allowed);
        if export_full + peer_full > 0 {
            tracing::warn!(refused, export_full, peer_full, not_allowed, last_peer = %peer,
                "connections refused: over the connection limits (closed before the handshake)");
        } else {
            tracing::info!(refused, last_peer = %peer, "connection refused: peer not allowed");
        }
    }
}

/// Rate-limits refusal lines: the first refusal after a quiet interval is
/// logged at once, later ones are counted and logged together when the
/// interval is over.
#[derive(Debug, Default)]
pub struct RefusalLog {
    pending: RefusalReport,
    last_line: Option<Instant>,
}

impl RefusalLog {
    /// Counts a refusal at `now`; returns the report to log now, if one is due.
    fn refused(&mut self, peer: SocketAddr, reason: Refused, now: Instant) -> Option<RefusalReport> {
        match reason {
            Refused::ExportFull => self.pending.export_full += 1,
            Refused::PeerFull => self.pending.peer_full += 1,
            Refused::NotAllowed => self.pending.not_allowed += 1,
        }
        self.pending.last_peer = Some(peer);
        let quiet = self.last_line.is_none_or(|at| now >= at + REFUSAL_LOG_INTERVAL);
        quiet.then(|| self.take(now))
    }

    /// When the counted refusals are to be logged, if there are any.
    pub fn due(&self) -> Option<Instant> {
        (self.pending.total() > 0).then(|| self.last_line.map_or_else(Instant::now, |at| at + REFUSAL_LOG_INTERVAL))
    }

    /// The counted refusals, logged at `now`.
    fn take(&mut self, now: Instant) -> RefusalReport {
        self.last_line = Some(now);
        std::mem::take(&mut self.pending)
    }

    /// [`refused`](Self::refused), logging what is due.
    pub fn note(&mut self, peer: SocketAddr, reason: Refused) {
        if let Some(report) = self.refused(peer, reason, Instant::now()) {
            report.log();
        }
    }

    /// Logs the counted refusals (call at [`due`](Self::due)).
    pub fn flush(&mut self) {
        let report = self.take(Instant::now());
        if report.total() > 0 {
            report.log();
        }
    }
}

/// Pauses accepting after an error, doubling up to [`MAX_BACKOFF`]: a
/// listener out of descriptors stays readable, and retrying at once would
/// spin a core and flood the log.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    delay: Option<Duration>,
    resume_at: Option<Instant>,
    failures: u64,
}

impl AcceptBackoff {
    /// Accepting is not paused.
    pub fn ready(&self) -> bool {
        self.resume_at.is_none()
    }

    /// When accepting resumes (far off when not paused).
    pub fn resume_at(&self) -> Instant {
        self.resume_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400))
    }

    /// Ends the pause: its time is up, or a connection closed and freed a
    /// descriptor.
    pub fn resume(&mut self) {
        self.resume_at = None;
    }

    pub fn failed(&mut self, error: &io::Error) {
        self.failed_at(error, Instant::now());
    }

    fn failed_at(&mut self, error: &io::Error, now: Instant) {
        if self.failures == 0 {
            tracing::warn!(%error, "accept failed; backing off until it works again");
        }
        self.failures += 1;
        let delay = self.delay.map_or(FIRST_BACKOFF, |d| (d * 2).min(MAX_BACKOFF));
        self.delay = Some(delay);
        self.resume_at = Some(now + delay);
    }

    pub fn succeeded(&mut self) {
        if self.failures > 0 {
            tracing::info!(failures = self.failures, "accepting connections again");
        }
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_per_peer_and_per_export_and_frees_slots_on_drop() {
        let limits = ConnectionLimits::new(5, 3);
        let a: Vec<_> = (0..3).map(|_| limits.admit(ip("192.0.2.1")).unwrap()).collect();
        assert_eq!(limits.admit(ip("192.0.2.1")).unwrap_err(), Refused::PeerFull);
        // The same peer spelled as a v4-mapped address is the same peer.
        assert_eq!(limits.admit(ip("::ffff:192.0.2.1")).unwrap_err(), Refused::PeerFull);
        let b: Vec<_> = (0..2).map(|_| limits.admit(ip("192.0.2.2")).unwrap()).collect();
        assert_eq!(limits.admit(ip("192.0.2.3")).unwrap_err(), Refused::ExportFull);
        drop(a);
        assert!(limits.admit(ip("192.0.2.1")).is_ok());
        drop(b);
        assert!(limits.lock().per_peer.is_empty(), "no entry left for peers without connections");
        assert_eq!(limits.lock().total, 0);
    }

    #[test]
    fn refusals_make_one_line_per_interval_with_a_count() {
        let peer: SocketAddr = "192.0.2.9:4000".parse().unwrap();
        let start = Instant::now();
        let mut log = RefusalLog::default();
        let first =
            log.refused(peer, Refused::PeerFull, start).expect("the first refusal of a burst is logged at once");
        assert_eq!((first.peer_full, first.last_peer), (1, Some(peer)));
        assert_eq!(log.due(), None);
        for i in 0..999 {
            assert_eq!(log.refused(peer, Refused::PeerFull, start + Duration::from_millis(i)), None);
        }
        assert_eq!(log.refused(peer, Refused::ExportFull, start + Duration::from_secs(1)), None);
        assert_eq!(log.due(), Some(start + REFUSAL_LOG_INTERVAL), "counted refusals are due an interval later");
        let burst = log.take(start + REFUSAL_LOG_INTERVAL);
        assert_eq!((burst.peer_full, burst.export_full, burst.not_allowed), (999, 1, 0));
        assert_eq!(log.due(), None);
        // Within the next interval a refusal waits; after a quiet one it is
        // logged at once, with whatever was still counted.
        assert_eq!(log.refused(peer, Refused::NotAllowed, start + REFUSAL_LOG_INTERVAL * 3 / 2), None);
        let late = log.refused(peer, Refused::NotAllowed, start + REFUSAL_LOG_INTERVAL * 2).expect("due again");
        assert_eq!(late.not_allowed, 2);
    }

    #[test]
    fn accept_errors_back_off_doubling_up_to_a_limit() {
        let mut backoff = AcceptBackoff::default();
        let emfile = io::Error::from_raw_os_error(24);
        let now = Instant::now();
        let mut delays = Vec::new();
        for _ in 0..10 {
            backoff.failed_at(&emfile, now);
            assert!(!backoff.ready());
            delays.push(backoff.resume_at() - now);
            backoff.resume();
            assert!(backoff.ready());
        }
        assert_eq!(delays[0], FIRST_BACKOFF);
        assert_eq!(delays[1], FIRST_BACKOFF * 2);
        assert_eq!(*delays.last().unwrap(), MAX_BACKOFF);
        backoff.succeeded();
        backoff.failed_at(&emfile, now);
        assert_eq!(backoff.resume_at() - now, FIRST_BACKOFF, "a success starts over");
    }
}
