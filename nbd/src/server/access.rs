//! Who may connect to an export, and closing the connections of peers that
//! lose that right.
//!
//! The controller narrows an export to the addresses of the nodes a volume
//! is published to; revoking a node closes its open connections: each one
//! stops reading requests, sends the replies it owes and hangs up, just as
//! when the whole server stops.

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

#[derive(Debug, Default)]
struct State {
    allowed: Allowed,
    next_id: u64,
    /// Open connections: peer address and the switch that stops them.
    live: HashMap<u64, (IpAddr, watch::Sender<bool>)>,
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

    /// Replaces the policy and closes open connections it no longer admits.
    /// Returns how many were told to close.
    pub fn set_allowed(&self, allowed: Allowed) -> usize {
        let allowed = match allowed {
            Allowed::Only(set) => Allowed::Only(set.into_iter().map(|ip| ip.to_canonical()).collect()),
            Allowed::Any => Allowed::Any,
        };
        let mut state = self.lock();
        let mut closed = 0;
        for (peer, stop) in state.live.values() {
            if !allowed.admits(*peer) {
                let _ = stop.send(true);
                closed += 1;
            }
        }
        state.allowed = allowed;
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
        let (tx, rx) = watch::channel(false);
        state.live.insert(id, (peer, tx));
        Some(Ticket { access: self.clone(), id, revoked: rx })
    }
}

/// One admitted connection; dropping it unregisters the connection.
#[derive(Debug)]
pub struct Ticket {
    access: Access,
    id: u64,
    revoked: watch::Receiver<bool>,
}

impl Ticket {
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
}
