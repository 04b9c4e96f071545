//! Placements this process has made whose volumes its watch has not
//! brought back yet.
//!
//! Placement sums the sizes already promised on each storage node from the
//! watch of every NbdVolume. A volume just placed reaches that watch only
//! after its POST has gone through the API server and etcd and the event has
//! come back: tens of milliseconds. Holding the placement lock across that
//! round trip made concurrent CreateVolume calls (the provisioner sends them
//! in parallel) wait for each other's, one after another. Instead, a
//! placement records itself here under the lock, the lock is let go, and the
//! POST and its wait run in parallel with other placements, which count the
//! recorded size until the watch has the volume (then the watch counts it,
//! and this record is skipped so nothing counts twice).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// The placements made and not yet seen in the watch.
#[derive(Debug, Default)]
pub struct InFlight {
    placements: Arc<Mutex<Placements>>,
}

#[derive(Debug, Default)]
struct Placements {
    next: u64,
    /// Token → (volume id, storage node, size in bytes). A token, not the
    /// id, keys it: two calls with one request name may be in flight at
    /// once, and the first to finish must not take the other's record.
    by_token: HashMap<u64, (String, String, u64)>,
}

/// One recorded placement; dropping it (the volume seen, or its creation
/// failed or abandoned) removes the record.
#[derive(Debug)]
pub struct Reservation {
    placements: Arc<Mutex<Placements>>,
    token: u64,
}

impl InFlight {
    /// Records that volume `id` of `size` bytes was placed on `node`.
    pub fn reserve(&self, id: &str, node: &str, size: u64) -> Reservation {
        let mut placements = lock(&self.placements);
        let token = placements.next;
        placements.next = placements.next.wrapping_add(1);
        placements.by_token.insert(token, (id.to_owned(), node.to_owned(), size));
        Reservation { placements: Arc::clone(&self.placements), token }
    }

    /// Adds to `placed` (storage node → bytes) the recorded placements whose
    /// volume `seen` does not know yet.
    pub fn add_unseen(&self, placed: &mut HashMap<String, u64>, seen: impl Fn(&str) -> bool) {
        for (id, node, size) in lock(&self.placements).by_token.values() {
            if !seen(id) {
                let sum = placed.entry(node.clone()).or_default();
                *sum = sum.saturating_add(*size);
            }
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        lock(&self.placements).by_token.remove(&self.token);
    }
}

/// The records stay consistent even if a holder panicked: each change is a
/// single map operation.
fn lock(placements: &Mutex<Placements>) -> std::sync::MutexGuard<'_, Placements> {
    placements.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(in_flight: &InFlight, seen: &[&str]) -> HashMap<String, u64> {
        let mut placed = HashMap::from([("a".to_owned(), 10)]);
        in_flight.add_unseen(&mut placed, |id| seen.contains(&id));
        placed
    }

    #[test]
    fn a_reservation_counts_until_its_volume_is_seen_or_it_is_dropped() {
        let in_flight = InFlight::default();
        let first = in_flight.reserve("vol-1", "a", 5);
        let second = in_flight.reserve("vol-2", "b", 7);
        assert_eq!(placed(&in_flight, &[]), HashMap::from([("a".to_owned(), 15), ("b".to_owned(), 7)]));
        // The watch has vol-1 (and counts it itself): not counted twice.
        assert_eq!(placed(&in_flight, &["vol-1"]), HashMap::from([("a".to_owned(), 10), ("b".to_owned(), 7)]));
        drop(second);
        assert_eq!(placed(&in_flight, &[]), HashMap::from([("a".to_owned(), 15)]));
        drop(first);
        assert_eq!(placed(&in_flight, &[]), HashMap::from([("a".to_owned(), 10)]));
    }

    #[test]
    fn two_calls_for_one_volume_keep_their_own_records() {
        let in_flight = InFlight::default();
        let first = in_flight.reserve("vol-1", "a", 5);
        let retry = in_flight.reserve("vol-1", "a", 5);
        drop(first);
        assert_eq!(placed(&in_flight, &[]), HashMap::from([("a".to_owned(), 15)]));
        drop(retry);
        assert_eq!(placed(&in_flight, &[]), HashMap::from([("a".to_owned(), 10)]));
    }
}
