//! Where a new volume goes in cluster mode, decided from what the storage
//! nodes report: pure functions over [`StorageNode`] views, so that every
//! rule is a unit test and the cluster backend only gathers the views.
//!
//! - A candidate is live (its agent's Lease was renewed within the Lease's
//!   duration), matches the StorageClass's `storageNodeSelector` (labels of
//!   its Node), can serve TLS when the volume's export speaks it (its
//!   certificates load, as its NbdStorageNode reports) and reports at least
//!   the volume's size free: volumes are thin, so this is the same check
//!   its agent makes.
//! - Among candidates, the one with the most room wins, room being the free
//!   bytes it reports minus the bytes of the volumes already placed on it.
//!   Free bytes alone would not spread anything: a thin volume takes no
//!   space when it is created, so every volume of a burst would land on
//!   the same node until the agents' next report. Ties go to the node
//!   with more free bytes, then to the first name, so that two controller
//!   replicas deciding at once pick the same node.
//! - None: RESOURCE_EXHAUSTED, naming how many nodes were considered.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// A StorageClass's `storageNodeSelector`: `key=value` pairs separated by
/// commas, every one required of a storage node's Node labels. Empty:
/// every node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(BTreeMap<String, String>);

/// Longest label key (a 253-character prefix, `/`, a 63-character name)
/// and value Kubernetes allows.
const MAX_KEY: usize = 253 + 1 + 63;
const MAX_VALUE: usize = 63;

impl Selector {
    pub fn parse(text: &str) -> Result<Self> {
        let mut labels = BTreeMap::new();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = |why: &str| Error::invalid(format!("storageNodeSelector {pair:?}: {why}"));
            let (key, value) = pair.split_once('=').ok_or_else(|| bad("not key=value"))?;
            let (key, value) = (key.trim(), value.trim());
            if key.is_empty() || key.len() > MAX_KEY || value.len() > MAX_VALUE {
                return Err(bad("a label key is 1 to 317 characters, a value at most 63"));
            }
            let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/');
            if !key.chars().all(allowed) || !value.chars().all(|c| allowed(c) && c != '/') {
                return Err(bad("labels are letters, digits, '-', '_', '.' (and '/' in a key)"));
            }
            if labels.insert(key.to_owned(), value.to_owned()).is_some_and(|old| old != value) {
                return Err(bad("the key is given twice with different values"));
            }
        }
        Ok(Self(labels))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// One storage node as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageNode {
    pub name: String,
    /// Its agent's Lease is current.
    pub live: bool,
    /// The free bytes it last reported; `None` before its first report.
    pub free_bytes: Option<u64>,
    /// The sizes of the volumes already placed on it, summed.
    pub placed_bytes: u64,
    /// Its Node's labels.
    pub labels: BTreeMap<String, String>,
    /// Its agent reports certificates that load: it can serve volumes whose
    /// export speaks TLS.
    pub serves_tls: bool,
}

impl StorageNode {
    /// Free bytes minus what is already promised; negative when the
    /// node's thin volumes already promise more than it has.
    fn room(&self) -> i128 {
        i128::from(self.free_bytes.unwrap_or(0)) - i128::from(self.placed_bytes)
    }

    fn can_hold(&self, size: u64) -> bool {
        self.live && self.free_bytes.is_some_and(|free| free >= size)
    }
}

/// Whether a Lease renewed at `renewed_ms` (Unix milliseconds) for
/// `duration_ms` is still current at `now_ms`. Never renewed: not live.
pub fn is_live(renewed_ms: Option<i64>, duration_ms: i64, now_ms: i64) -> bool {
    renewed_ms.is_some_and(|renewed| renewed.saturating_add(duration_ms) > now_ms)
}

/// The storage node a new volume of `size` bytes goes to; `needs_tls`:
/// its export speaks TLS, so only nodes that can serve it qualify.
pub fn place<'a>(nodes: &'a [StorageNode], size: u64, selector: &Selector, needs_tls: bool) -> Result<&'a StorageNode> {
    let selected: Vec<&StorageNode> =
        nodes.iter().filter(|n| selector.matches(&n.labels) && (n.serves_tls || !needs_tls)).collect();
    selected
        .iter()
        .copied()
        .filter(|n| n.can_hold(size))
        .max_by(|a, b| {
            (a.room(), a.free_bytes)
                .cmp(&(b.room(), b.free_bytes))
                // The first name wins a tie: max_by keeps the last maximum.
                .then_with(|| b.name.cmp(&a.name))
        })
        .ok_or_else(|| {
            let live = selected.iter().filter(|n| n.live).count();
            let largest = selected.iter().filter(|n| n.live).filter_map(|n| n.free_bytes).max().unwrap_or(0);
            let tls = if needs_tls { " and can serve TLS" } else { "" };
            Error::exhausted(format!(
                "no live storage node can hold {size} bytes: {} storage nodes match the selector{tls}, {live} of \
                 them live, the most free space on one is {largest} bytes",
                selected.len()
            ))
        })
}

/// A volume cloned or restored goes where its source is: that node must
/// be live, hold the size, and serve TLS if the new volume needs it.
pub fn check_source_node(nodes: &[StorageNode], name: &str, size: u64, needs_tls: bool) -> Result<()> {
    let Some(node) = nodes.iter().find(|n| n.name == name) else {
        return Err(Error::unavailable(format!("storage node {name:?} of the source has no NbdStorageNode")));
    };
    if !node.live {
        return Err(Error::unavailable(format!("storage node {name:?} of the source is not live (its Lease expired)")));
    }
    if needs_tls && !node.serves_tls {
        return Err(Error::precondition(format!(
            "storage node {name:?} of the source cannot serve TLS (its agent reports no certificates that load)"
        )));
    }
    if !node.can_hold(size) {
        return Err(Error::exhausted(format!(
            "storage node {name:?} of the source has {} bytes free, {size} needed",
            node.free_bytes.unwrap_or(0)
        )));
    }
    Ok(())
}

/// GetCapacity over the live nodes the selector matches (and that serve
/// TLS, when `needs_tls`): the sum of their free bytes and the most free
/// on one of them.
pub fn capacity(nodes: &[StorageNode], selector: &Selector, needs_tls: bool) -> (u64, u64) {
    nodes
        .iter()
        .filter(|n| n.live && selector.matches(&n.labels) && (n.serves_tls || !needs_tls))
        .filter_map(|n| n.free_bytes)
        .fold((0u64, 0u64), |(sum, largest), free| (sum.saturating_add(free), largest.max(free)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn node(name: &str, live: bool, free: Option<u64>, placed: u64, labels: &[(&str, &str)]) -> StorageNode {
        StorageNode {
            name: name.into(),
            live,
            free_bytes: free,
            placed_bytes: placed,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            serves_tls: false,
        }
    }

    #[test]
    fn the_node_with_the_most_room_wins() {
        let nodes = [node("a", true, Some(10 * GIB), 0, &[]), node("b", true, Some(20 * GIB), 0, &[])];
        assert_eq!(place(&nodes, GIB, &Selector::default(), false).unwrap().name, "b");
        // What is already placed counts against a node's free bytes.
        let nodes = [node("a", true, Some(10 * GIB), 0, &[]), node("b", true, Some(20 * GIB), 15 * GIB, &[])];
        assert_eq!(place(&nodes, GIB, &Selector::default(), false).unwrap().name, "a");
    }

    #[test]
    fn a_burst_spreads_by_free_space() {
        let mut nodes = [
            node("a", true, Some(GIB), 0, &[]),
            node("b", true, Some(2 * GIB), 0, &[]),
            node("c", true, Some(3 * GIB), 0, &[]),
        ];
        let mut counts = BTreeMap::new();
        for _ in 0..30 {
            let name = place(&nodes, 128 << 20, &Selector::default(), false).unwrap().name.clone();
            *counts.entry(name.clone()).or_insert(0) += 1;
            nodes.iter_mut().find(|n| n.name == name).unwrap().placed_bytes += 128 << 20;
        }
        // c alone until its room is b's, then b and c until theirs is a's,
        // then all three.
        assert_eq!(counts, BTreeMap::from([("a".into(), 2), ("b".into(), 10), ("c".into(), 18)]));
    }

    #[test]
    fn dead_unreported_too_small_and_unselected_nodes_are_not_candidates() {
        let nodes = [
            node("dead", false, Some(100 * GIB), 0, &[("zone", "a")]),
            node("new", true, None, 0, &[("zone", "a")]),
            node("small", true, Some(GIB / 2), 0, &[("zone", "a")]),
            node("elsewhere", true, Some(50 * GIB), 0, &[("zone", "b")]),
            node("fits", true, Some(2 * GIB), 0, &[("zone", "a"), ("disk", "ssd")]),
        ];
        let zone_a = Selector::parse("zone=a").unwrap();
        assert_eq!(place(&nodes, GIB, &zone_a, false).unwrap().name, "fits");
        assert_eq!(place(&nodes, GIB, &Selector::default(), false).unwrap().name, "elsewhere");
        let e = place(&nodes, 3 * GIB, &zone_a, false).unwrap_err();
        assert_eq!(e.kind(), crate::error::Kind::ResourceExhausted);
        assert!(e.to_string().contains("4 storage nodes match the selector, 3 of them live"), "{e}");
        let none = Selector::parse("zone=c").unwrap();
        assert_eq!(place(&nodes, 1, &none, false).unwrap_err().kind(), crate::error::Kind::ResourceExhausted);
        // Over-committed nodes still take volumes that fit their free bytes.
        let full = [node("x", true, Some(GIB), 10 * GIB, &[])];
        assert_eq!(place(&full, GIB, &Selector::default(), false).unwrap().name, "x");
    }

    #[test]
    fn ties_go_to_the_first_name() {
        let nodes = [node("b", true, Some(GIB), 0, &[]), node("a", true, Some(GIB), 0, &[])];
        assert_eq!(place(&nodes, 1, &Selector::default(), false).unwrap().name, "a");
    }

    #[test]
    fn leases_are_live_until_their_duration_passes() {
        assert!(is_live(Some(1_000), 40_000, 40_999));
        assert!(!is_live(Some(1_000), 40_000, 41_000));
        assert!(!is_live(None, 40_000, 0));
        assert!(is_live(Some(i64::MAX), 40_000, 0), "a renew time far ahead does not overflow");
    }

    #[test]
    fn selectors_parse_strictly() {
        let s = Selector::parse(" zone=a , nbd.csi.dev/storage=true ").unwrap();
        let labels: BTreeMap<String, String> =
            [("zone", "a"), ("nbd.csi.dev/storage", "true"), ("other", "x")].map(|(k, v)| (k.into(), v.into())).into();
        assert!(s.matches(&labels));
        assert!(!s.matches(&BTreeMap::from([("zone".into(), "a".into())])));
        assert!(Selector::parse("").unwrap().is_empty());
        for bad in ["zone", "=a", "zone=a,zone=b", "zone=a b", "k=v/x", &format!("k={}", "v".repeat(64))] {
            assert_eq!(Selector::parse(bad).unwrap_err().kind(), crate::error::Kind::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn capacity_is_the_sum_and_the_largest_of_live_selected_nodes() {
        let nodes = [
            node("a", true, Some(3 * GIB), 0, &[("zone", "a")]),
            node("b", true, Some(5 * GIB), 0, &[("zone", "b")]),
            node("c", false, Some(9 * GIB), 0, &[("zone", "a")]),
            node("d", true, None, 0, &[("zone", "a")]),
        ];
        assert_eq!(capacity(&nodes, &Selector::default(), false), (8 * GIB, 5 * GIB));
        assert_eq!(capacity(&nodes, &Selector::parse("zone=a").unwrap(), false), (3 * GIB, 3 * GIB));
    }

    /// A class whose volumes speak TLS counts only the nodes that serve it:
    /// CreateVolume would place its volume on no other.
    #[test]
    fn capacity_for_tls_counts_only_nodes_that_serve_it() {
        let mut serving = node("a", true, Some(3 * GIB), 0, &[]);
        serving.serves_tls = true;
        let nodes = [serving, node("b", true, Some(5 * GIB), 0, &[])];
        assert_eq!(capacity(&nodes, &Selector::default(), true), (3 * GIB, 3 * GIB));
        assert_eq!(capacity(&nodes, &Selector::default(), false), (8 * GIB, 5 * GIB));
        assert_eq!(capacity(&nodes[1..], &Selector::default(), true), (0, 0));
    }

    #[test]
    fn a_source_node_must_be_live_and_hold_the_size() {
        let nodes = [node("a", true, Some(GIB), 0, &[]), node("b", false, Some(GIB), 0, &[])];
        assert!(check_source_node(&nodes, "a", GIB, false).is_ok());
        assert_eq!(
            check_source_node(&nodes, "a", 2 * GIB, false).unwrap_err().kind(),
            crate::error::Kind::ResourceExhausted
        );
        assert_eq!(check_source_node(&nodes, "b", 1, false).unwrap_err().kind(), crate::error::Kind::Unavailable);
        assert_eq!(check_source_node(&nodes, "z", 1, false).unwrap_err().kind(), crate::error::Kind::Unavailable);
    }

    /// A volume whose export speaks TLS goes only to a node that can serve
    /// it, even with less room; none: RESOURCE_EXHAUSTED saying so. Its
    /// clone's source node must serve TLS too.
    #[test]
    fn a_volume_that_speaks_tls_goes_to_a_node_that_serves_it() {
        let mut tls = node("tls", true, Some(2 * GIB), 0, &[]);
        tls.serves_tls = true;
        let nodes = [node("plain", true, Some(20 * GIB), 0, &[]), tls];
        assert_eq!(place(&nodes, GIB, &Selector::default(), false).unwrap().name, "plain");
        assert_eq!(place(&nodes, GIB, &Selector::default(), true).unwrap().name, "tls");
        let e = place(&nodes, 4 * GIB, &Selector::default(), true).unwrap_err();
        assert_eq!(e.kind(), crate::error::Kind::ResourceExhausted);
        assert!(e.to_string().contains("1 storage nodes match the selector and can serve TLS"), "{e}");
        let e = check_source_node(&nodes, "plain", GIB, true).unwrap_err();
        assert_eq!(e.kind(), crate::error::Kind::FailedPrecondition);
        assert!(check_source_node(&nodes, "tls", GIB, true).is_ok());
    }
}
