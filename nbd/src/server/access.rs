//! Who may connect to an export, and closing the connections of peers that
//! lose that right.
//!
//! The controller narrows an export to the addresses of the nodes a volume
//! is published to, and marks the nodes it is published to read-only: their
//! sessions are READ_ONLY and their writes get EPERM, whatever the node's
//! mount does. Revoking a node, or changing whether it may write, closes its
//! open connections: each one stops reading requests, sends the replies it
//! owes and hangs up, just as when the whole server stops.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

/// The peers an export accepts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Allowed {
    /// Any peer (the export name is then the only guard).
    #[default]
    Any,
    /// Only these addresses; an empty set refuses everyone.
    Only(BTreeSet<IpAddr>),
}

impl Allowed {
    pub fn admits(&self, peer: IpAddr) -> bool {
        match self {
            Self::Any => true,
            Self::Only(set) => set.contains(&peer.to_canonical()),
        }
    }
}

/// Peers that may only read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadOnlyPeers {
    /// Every peer (when the writers' addresses are unknown but nobody writes).
    pub all: bool,
    pub peers: BTreeSet<IpAddr>,
}

impl ReadOnlyPeers {
    pub fn covers(&self, peer: IpAddr) -> bool {
        self.all || self.peers.contains(&peer.to_canonical())
    }
}

#[derive(Debug, Default)]
struct State {
    allowed: Allowed,
    read_only: ReadOnlyPeers,
    next_id: u64,
    /// Open connections: peer address, whether it was admitted read-only,
    /// and the switch that stops it.
    live: HashMap<u64, (IpAddr, bool, watch::Sender<bool>)>,
}

/// Per-export access policy and registry of open connections.
#[derive(Debug, Default, Clone)]
pub struct Access {
    state: Arc<Mutex<State>>,
}

impl Access {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn allowed(&self) -> Allowed {
        self.lock().allowed.clone()
    }

    /// Replaces who may connect, keeping who may only read.
    pub fn set_allowed(&self, allowed: Allowed) -> usize {
        let read_only = self.lock().read_only.clone();
        self.set_policy(allowed, read_only)
    }

    /// Replaces the policy and closes open connections it no longer admits
    /// or whose right to write it changes (a session's flags are fixed at
    /// its handshake). Returns how many were told to close.
    pub fn set_policy(&self, allowed: Allowed, read_only: ReadOnlyPeers) -> usize {
        let canonical = |set: BTreeSet<IpAddr>| set.into_iter().map(|ip| ip.to_canonical()).collect();
        let allowed = match allowed {
            Allowed::Only(set) => Allowed::Only(canonical(set)),
            Allowed::Any => Allowed::Any,
        };
        let read_only = ReadOnlyPeers { all: read_only.all, peers: canonical(read_only.peers) };
        let mut state = self.lock();
        let mut closed = 0;
        for (peer, was_read_only, stop) in state.live.values() {
            if !allowed.admits(*peer) || read_only.covers(*peer) != *was_read_only {
                let _ = stop.send(true);
                closed += 1;
            }
        }
        state.allowed = allowed;
        state.read_only = read_only;
        closed
    }

    /// Open connections right now.
    pub fn connections(&self) -> usize {
        self.lock().live.len()
    }

    /// Registers a new connection from `peer`, or `None` if it is not admitted.
    pub fn admit(&self, peer: IpAddr) -> Option<Ticket> {
        let peer = peer.to_canonical();
        let mut state = self.lock();
        if !state.allowed.admits(peer) {
            return None;
        }
        let id = state.next_id;
        state.next_id += 1;
        let read_only = state.read_only.covers(peer);
        let (tx, rx) = watch::channel(false);
        state.live.insert(id, (peer, read_only, tx));
        Some(Ticket { access: self.clone(), id, revoked: rx, read_only })
    }
}

/// One admitted connection; dropping it unregisters the connection.
#[derive(Debug)]
pub struct Ticket {
    access: Access,
    id: u64,
    revoked: watch::Receiver<bool>,
    read_only: bool,
}

impl Ticket {
    /// The peer may only read.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Runs `serve` with a stop signal that turns true when either the
    /// server stops (`server_stop`) or this peer is revoked.
    pub async fn run<F, Fut, T>(mut self, mut server_stop: watch::Receiver<bool>, serve: F) -> T
    where
        F: FnOnce(watch::Receiver<bool>) -> Fut,
        Fut: Future<Output = T>,
    {
        let (stop_tx, stop_rx) = watch::channel(false);
        let serving = serve(stop_rx);
        tokio::pin!(serving);
        tokio::select! {
            result = &mut serving => return result,
            _ = server_stop.wait_for(|stop| *stop) => {}
            _ = self.revoked.wait_for(|revoked| *revoked) => {
                tracing::info!("access revoked, closing connection");
            }
        }
        let _ = stop_tx.send(true);
        serving.await
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.access.lock().live.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn policy_admits_only_listed_addresses_including_v4_mapped() {
        let access = Access::default();
        assert!(access.admit(ip("192.0.2.7")).is_some());
        access.set_allowed(Allowed::Only([ip("192.0.2.7")].into()));
        assert!(access.admit(ip("192.0.2.7")).is_some());
        assert!(access.admit(ip("::ffff:192.0.2.7")).is_some());
        assert!(access.admit(ip("192.0.2.8")).is_none());
        access.set_allowed(Allowed::Only(BTreeSet::new()));
        assert!(access.admit(ip("192.0.2.7")).is_none());
    }

    #[tokio::test]
    async fn revoking_a_peer_stops_only_its_connections() {
        let access = Access::default();
        let a = access.admit(ip("192.0.2.1")).unwrap();
        let b = access.admit(ip("192.0.2.2")).unwrap();
        assert_eq!(access.connections(), 2);
        let (_server_tx, server_rx) = watch::channel(false);
        let serve = |mut stop: watch::Receiver<bool>| async move { stop.wait_for(|s| *s).await.map(|_| ()).is_ok() };
        let ta = tokio::spawn(a.run(server_rx.clone(), serve));
        let tb = tokio::spawn(b.run(server_rx, serve));
        tokio::task::yield_now().await;
        assert_eq!(access.set_allowed(Allowed::Only([ip("192.0.2.2")].into())), 1);
        assert!(ta.await.unwrap(), "revoked connection saw its stop signal");
        assert_eq!(access.connections(), 1);
        assert!(!tb.is_finished());
        tb.abort();
    }

    #[tokio::test]
    async fn read_only_peers_are_marked_and_a_change_closes_their_connections() {
        let access = Access::default();
        let everyone = Allowed::Only([ip("192.0.2.1"), ip("192.0.2.2")].into());
        let reader = ReadOnlyPeers { all: false, peers: [ip("::ffff:192.0.2.2")].into() };
        assert_eq!(access.set_policy(everyone.clone(), reader.clone()), 0);
        let writer = access.admit(ip("192.0.2.1")).unwrap();
        let ro = access.admit(ip("192.0.2.2")).unwrap();
        assert!(!writer.read_only() && ro.read_only());
        // The same policy again closes nothing; making the writer a reader
        // closes its connection only.
        assert_eq!(access.set_policy(everyone.clone(), reader), 0);
        let (_server_tx, server_rx) = watch::channel(false);
        let serve = |mut stop: watch::Receiver<bool>| async move { stop.wait_for(|s| *s).await.map(|_| ()).is_ok() };
        let tw = tokio::spawn(writer.run(server_rx.clone(), serve));
        let tr = tokio::spawn(ro.run(server_rx, serve));
        tokio::task::yield_now().await;
        let both = ReadOnlyPeers { all: false, peers: [ip("192.0.2.1"), ip("192.0.2.2")].into() };
        assert_eq!(access.set_policy(everyone.clone(), both), 1);
        assert!(tw.await.unwrap());
        assert!(!tr.is_finished());
        tr.abort();
        assert!(access.set_allowed(everyone) == 0 && access.admit(ip("192.0.2.1")).unwrap().read_only());
        access.set_policy(Allowed::Any, ReadOnlyPeers { all: true, peers: BTreeSet::new() });
        assert!(access.admit(ip("203.0.113.9")).unwrap().read_only());
    }
}
