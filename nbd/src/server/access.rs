//! Who may connect to an export, and fencing the connections of peers that
//! lose that right.
//!
//! The controller narrows an export to the addresses of the nodes a volume
//! is published to, and marks the nodes it is published to read-only: their
//! sessions are READ_ONLY and their writes get EPERM, whatever the node's
//! mount does. Revoking a node, or changing whether it may write, stops its
//! open connections at once: the reader drops the request it is in the
//! middle of (even half a WRITE payload: it was never acknowledged), sends
//! the replies already owed and hangs up. [`Access::set_policy`] returns a
//! [`Fence`] that resolves once every connection it stopped can no longer
//! touch the file, so a caller can tell the next node the volume is its own.
//!
//! Peers are admitted by address, or, with TLS, by the node name their
//! verified client certificate carries ([`Allowed::Nodes`]), wherever they
//! connect from: the address may be a tunnel's or a NAT's. A name is only
//! known once the TLS handshake is done, so the decision is the
//! handshake's: when the client asks for the export (NBD_OPT_GO, INFO or
//! EXPORT_NAME) it asks the connection's [`Gate`], which answers with a
//! [`Decision`] under the policy of that moment. Address policies are
//! also checked at accept, before any protocol work, as before.

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
    /// Only clients whose verified TLS client certificate names one of
    /// these nodes, from any address. A client without TLS is refused
    /// when it asks for the export.
    Nodes(BTreeSet<String>),
}

impl Allowed {
    /// Whether a connection from `peer` may begin (at accept). A node
    /// policy cannot tell yet and lets every address begin.
    pub fn admits(&self, peer: IpAddr) -> bool {
        match self {
            Self::Any | Self::Nodes(_) => true,
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
    /// Clients whose verified certificate names one of these nodes.
    pub nodes: BTreeSet<String>,
}

impl ReadOnlyPeers {
    pub fn covers(&self, peer: IpAddr) -> bool {
        self.all || self.peers.contains(&peer.to_canonical())
    }

    fn covers_client(&self, client: Client<'_>) -> bool {
        self.covers(client.address) || client.node.is_some_and(|node| self.nodes.contains(node))
    }
}

/// What the access check knows of a client that asks for the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client<'a> {
    pub address: IpAddr,
    /// The node its verified TLS client certificate names; `None` without
    /// TLS, or when the certificate names no node.
    pub node: Option<&'a str>,
}

/// The access check's answer to a client that asks for the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Admit {
        read_only: bool,
    },
    /// The policy admits clients by node name, and this one has shown none.
    NeedsNodeName,
    Refuse,
}

fn decide(allowed: &Allowed, read_only: &ReadOnlyPeers, client: Client<'_>) -> Decision {
    let admitted = match allowed {
        Allowed::Any => true,
        Allowed::Only(set) => set.contains(&client.address.to_canonical()),
        Allowed::Nodes(nodes) => match client.node {
            None => return Decision::NeedsNodeName,
            Some(node) => nodes.contains(node),
        },
    };
    if admitted { Decision::Admit { read_only: read_only.covers_client(client) } } else { Decision::Refuse }
}

/// One open connection in the registry.
#[derive(Debug)]
struct Live {
    peer: IpAddr,
    /// The node it proved to be (TLS), once its handshake asked for the export.
    node: Option<String>,
    /// Decided: it may use the export, only reading if true. Undecided
    /// (`None`): admitted at accept under a node policy, its name not
    /// known yet; its handshake asks the policy of that moment.
    read_only: Option<bool>,
    /// Turns true to stop it.
    stop: watch::Sender<bool>,
    /// Closed (its sender dropped) once the connection can no longer touch
    /// the file.
    touching: watch::Receiver<()>,
}

#[derive(Debug, Default)]
struct State {
    allowed: Allowed,
    read_only: ReadOnlyPeers,
    next_id: u64,
    live: HashMap<u64, Live>,
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
    pub fn set_allowed(&self, allowed: Allowed) -> Fence {
        let read_only = self.lock().read_only.clone();
        self.set_policy(allowed, read_only)
    }

    /// Replaces the policy and stops open connections it no longer admits
    /// or whose right to write it changes (a session's flags are fixed at
    /// its handshake). The returned fence covers every such connection still
    /// open, including ones an earlier call already stopped: applying the
    /// same policy again waits for the stragglers of the last change.
    pub fn set_policy(&self, allowed: Allowed, read_only: ReadOnlyPeers) -> Fence {
        let canonical = |set: BTreeSet<IpAddr>| set.into_iter().map(|ip| ip.to_canonical()).collect();
        let allowed = match allowed {
            Allowed::Only(set) => Allowed::Only(canonical(set)),
            other => other,
        };
        let read_only = ReadOnlyPeers { peers: canonical(read_only.peers), ..read_only };
        let mut state = self.lock();
        let mut fence = Fence::default();
        for live in state.live.values() {
            let Some(was_read_only) = live.read_only else { continue };
            let client = Client { address: live.peer, node: live.node.as_deref() };
            if decide(&allowed, &read_only, client) != (Decision::Admit { read_only: was_read_only }) {
                let _ = live.stop.send(true);
                fence.touching.push(live.touching.clone());
            }
        }
        state.allowed = allowed;
        state.read_only = read_only;
        fence
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
        // An address policy decides now, as before any protocol work; a
        // node policy once the handshake has the name.
        let read_only = match decide(&state.allowed, &state.read_only, Client { address: peer, node: None }) {
            Decision::Admit { read_only } => Some(read_only),
            Decision::NeedsNodeName | Decision::Refuse => None,
        };
        let (stop, revoked) = watch::channel(false);
        let (touching_tx, touching) = watch::channel(());
        state.live.insert(id, Live { peer, node: None, read_only, stop, touching });
        Some(Ticket {
            access: self.clone(),
            id,
            revoked,
            read_only: read_only.unwrap_or(false),
            touching: Some(touching_tx),
        })
    }
}

/// A connection's way back to the access check, for its handshake to ask
/// when the client wants the export.
#[derive(Debug, Clone)]
pub struct Gate {
    access: Access,
    id: u64,
}

impl Gate {
    /// Decides under the current policy whether this connection's client,
    /// now known as `node` (or as no node), may use the export, and
    /// records the answer: a later policy change that reverses it stops
    /// the connection.
    pub fn decide(&self, node: Option<&str>) -> Decision {
        let mut guard = self.access.lock();
        let state = &mut *guard;
        let Some(live) = state.live.get_mut(&self.id) else { return Decision::Refuse };
        let decision = decide(&state.allowed, &state.read_only, Client { address: live.peer, node });
        if let Decision::Admit { read_only } = decision {
            live.node = node.map(str::to_owned);
            live.read_only = Some(read_only);
        }
        decision
    }
}

/// The connections one policy change stopped. [`Fence::wait`] resolves once
/// none of them can reach the file any more: each one's reader has ended,
/// and with it every pwrite, trim and write-zeroes it could still do.
#[derive(Debug, Default)]
#[must_use = "a fence says when the stopped connections are gone; drop it explicitly if nobody waits"]
pub struct Fence {
    touching: Vec<watch::Receiver<()>>,
}

impl Fence {
    /// How many connections the change stopped.
    pub fn stopped(&self) -> usize {
        self.touching.len()
    }

    /// Of those, how many may still touch the file.
    pub fn remaining(&self) -> usize {
        self.touching.iter().filter(|t| t.has_changed().is_ok()).count()
    }

    /// Resolves once every stopped connection is done with the file.
    /// Cancel-safe: after a timeout, [`Fence::remaining`] says how many
    /// were not, and waiting again goes on where it stopped.
    pub async fn wait(&mut self) {
        for touching in &mut self.touching {
            // Nothing is ever sent: this returns when the sender is dropped.
            while touching.changed().await.is_ok() {}
        }
    }
}

/// What a connection's serving code gets: the signal to stop, and, for as
/// long as it is held, the mark that the connection may still touch the
/// file. The reader drops it when it stops: that is what [`Fence::wait`]
/// waits for.
#[derive(Debug)]
pub struct Stop {
    requested: watch::Receiver<bool>,
    /// A reason to stop between two requests, never inside one (a TLS
    /// connection's record limit).
    drain: Option<watch::Receiver<bool>>,
    _touching: Option<watch::Sender<()>>,
}

/// Resolves once `signal` turns true; never if its sender went away
/// without it (a dropped sender is not a stop).
async fn raised(signal: &mut watch::Receiver<bool>) {
    if signal.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Stop {
    /// A stop signal no fence waits on (sessions outside [`Access`]).
    pub fn new(requested: watch::Receiver<bool>) -> Self {
        Self { requested, drain: None, _touching: None }
    }

    /// This stop, which also ends the session between two requests once
    /// `signal` turns true: the request being read is still answered.
    pub fn drain_when(self, signal: watch::Receiver<bool>) -> Self {
        Self { drain: Some(signal), ..self }
    }

    /// Resolves once a stop is requested.
    pub async fn requested(&mut self) {
        raised(&mut self.requested).await;
    }

    /// Resolves once a stop is requested or the drain signal is raised:
    /// for a reader waiting for the next request.
    pub async fn requested_or_draining(&mut self) {
        match &mut self.drain {
            None => raised(&mut self.requested).await,
            Some(drain) => tokio::select! {
                () = raised(&mut self.requested) => {}
                () = raised(drain) => {}
            },
        }
    }
}

/// One admitted connection; dropping it unregisters the connection.
#[derive(Debug)]
pub struct Ticket {
    access: Access,
    id: u64,
    revoked: watch::Receiver<bool>,
    read_only: bool,
    /// Handed to the serving code inside its [`Stop`].
    touching: Option<watch::Sender<()>>,
}

impl Ticket {
    /// The peer may only read (as decided by address at accept).
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The way back to the access check for this connection's handshake.
    pub fn gate(&self) -> Gate {
        Gate { access: self.access.clone(), id: self.id }
    }

    /// Runs `serve` with a stop signal that turns true when either the
    /// server stops (`server_stop`) or this peer is revoked.
    pub async fn run<F, Fut, T>(mut self, mut server_stop: watch::Receiver<bool>, serve: F) -> T
    where
        F: FnOnce(Stop) -> Fut,
        Fut: Future<Output = T>,
    {
        let (stop_tx, stop_rx) = watch::channel(false);
        let serving = serve(Stop { requested: stop_rx, drain: None, _touching: self.touching.take() });
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
        drop(access.set_allowed(Allowed::Only([ip("192.0.2.7")].into())));
        assert!(access.admit(ip("192.0.2.7")).is_some());
        assert!(access.admit(ip("::ffff:192.0.2.7")).is_some());
        assert!(access.admit(ip("192.0.2.8")).is_none());
        drop(access.set_allowed(Allowed::Only(BTreeSet::new())));
        assert!(access.admit(ip("192.0.2.7")).is_none());
    }

    #[tokio::test]
    async fn revoking_a_peer_stops_only_its_connections() {
        let access = Access::default();
        let a = access.admit(ip("192.0.2.1")).unwrap();
        let b = access.admit(ip("192.0.2.2")).unwrap();
        assert_eq!(access.connections(), 2);
        let (_server_tx, server_rx) = watch::channel(false);
        let serve = |mut stop: Stop| async move {
            stop.requested().await;
            true
        };
        let ta = tokio::spawn(a.run(server_rx.clone(), serve));
        let tb = tokio::spawn(b.run(server_rx, serve));
        tokio::task::yield_now().await;
        assert_eq!(access.set_allowed(Allowed::Only([ip("192.0.2.2")].into())).stopped(), 1);
        assert!(ta.await.unwrap(), "revoked connection saw its stop signal");
        assert_eq!(access.connections(), 1);
        assert!(!tb.is_finished());
        tb.abort();
    }

    #[tokio::test]
    async fn read_only_peers_are_marked_and_a_change_closes_their_connections() {
        let access = Access::default();
        let everyone = Allowed::Only([ip("192.0.2.1"), ip("192.0.2.2")].into());
        let reader = ReadOnlyPeers { peers: [ip("::ffff:192.0.2.2")].into(), ..Default::default() };
        assert_eq!(access.set_policy(everyone.clone(), reader.clone()).stopped(), 0);
        let writer = access.admit(ip("192.0.2.1")).unwrap();
        let ro = access.admit(ip("192.0.2.2")).unwrap();
        assert!(!writer.read_only() && ro.read_only());
        // The same policy again closes nothing; making the writer a reader
        // closes its connection only.
        assert_eq!(access.set_policy(everyone.clone(), reader).stopped(), 0);
        let (_server_tx, server_rx) = watch::channel(false);
        let serve = |mut stop: Stop| async move {
            stop.requested().await;
            true
        };
        let tw = tokio::spawn(writer.run(server_rx.clone(), serve));
        let tr = tokio::spawn(ro.run(server_rx, serve));
        tokio::task::yield_now().await;
        let both = ReadOnlyPeers { peers: [ip("192.0.2.1"), ip("192.0.2.2")].into(), ..Default::default() };
        assert_eq!(access.set_policy(everyone.clone(), both).stopped(), 1);
        assert!(tw.await.unwrap());
        assert!(!tr.is_finished());
        tr.abort();
        assert!(access.set_allowed(everyone).stopped() == 0 && access.admit(ip("192.0.2.1")).unwrap().read_only());
        drop(access.set_policy(Allowed::Any, ReadOnlyPeers { all: true, ..Default::default() }));
        assert!(access.admit(ip("203.0.113.9")).unwrap().read_only());
    }

    /// The fence resolves only once the stopped connection's serving code
    /// has let go of its [`Stop`], not when the stop is sent; the same
    /// policy applied again waits for that straggler too.
    #[tokio::test]
    async fn fence_resolves_only_after_the_stopped_connection_lets_go() {
        let access = Access::default();
        let ticket = access.admit(ip("192.0.2.1")).unwrap();
        let (_server_tx, server_rx) = watch::channel(false);
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel::<()>();
        // Stands for a reader busy in the middle of a request: it saw the
        // stop but holds on until released.
        let serve = |mut stop: Stop| async move {
            stop.requested().await;
            let _ = seen_tx.send(());
            let _ = release_rx.await;
            drop(stop);
        };
        let task = tokio::spawn(ticket.run(server_rx, serve));
        tokio::task::yield_now().await;
        let mut fence = access.set_allowed(Allowed::Only(BTreeSet::new()));
        assert_eq!(fence.stopped(), 1);
        seen_rx.await.unwrap();
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), fence.wait()).await;
        assert!(waited.is_err(), "the fence resolved while the connection still held its stop");
        assert_eq!(fence.remaining(), 1);
        let mut again = access.set_allowed(Allowed::Only(BTreeSet::new()));
        assert_eq!(again.stopped(), 1, "a straggler is fenced again by the same policy");
        release_tx.send(()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), fence.wait()).await.expect("fence resolves");
        assert_eq!(fence.remaining(), 0);
        tokio::time::timeout(std::time::Duration::from_secs(5), again.wait()).await.expect("second fence resolves");
        task.await.unwrap();
        assert_eq!(access.connections(), 0);
        assert_eq!(access.set_allowed(Allowed::Any).stopped(), 0, "a connection that is gone is not fenced");
    }

    fn nodes(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_node_policy_admits_by_certificate_name_from_any_address() {
        let access = Access::default();
        let read_only = ReadOnlyPeers { nodes: nodes(&["reader"]), ..Default::default() };
        drop(access.set_policy(Allowed::Nodes(nodes(&["writer", "reader"])), read_only));
        // Every address may begin: the name comes with the TLS handshake.
        let ticket = access.admit(ip("203.0.113.50")).expect("a node policy admits any address at accept");
        let gate = ticket.gate();
        assert_eq!(gate.decide(None), Decision::NeedsNodeName);
        assert_eq!(gate.decide(Some("stranger")), Decision::Refuse);
        assert_eq!(gate.decide(Some("writer")), Decision::Admit { read_only: false });
        let other = access.admit(ip("198.51.100.7")).unwrap();
        assert_eq!(other.gate().decide(Some("reader")), Decision::Admit { read_only: true });
        // An address policy ignores the name, as before.
        drop(access.set_allowed(Allowed::Only([ip("198.51.100.7")].into())));
        let third = access.admit(ip("198.51.100.7")).unwrap();
        assert_eq!(third.gate().decide(Some("stranger")), Decision::Admit { read_only: false });
        assert!(access.admit(ip("203.0.113.50")).is_none());
        // A connection that is gone is refused.
        let gone = third.gate();
        drop(third);
        assert_eq!(gone.decide(Some("writer")), Decision::Refuse);
    }

    #[tokio::test]
    async fn revoking_a_node_stops_only_its_decided_connections() {
        let access = Access::default();
        drop(access.set_allowed(Allowed::Nodes(nodes(&["a", "b"]))));
        let a = access.admit(ip("192.0.2.1")).unwrap();
        let b = access.admit(ip("192.0.2.1")).unwrap();
        let undecided = access.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(a.gate().decide(Some("a")), Decision::Admit { read_only: false });
        assert_eq!(b.gate().decide(Some("b")), Decision::Admit { read_only: false });
        let (_server_tx, server_rx) = watch::channel(false);
        let serve = |mut stop: Stop| async move {
            stop.requested().await;
            true
        };
        let ta = tokio::spawn(a.run(server_rx.clone(), serve));
        let tb = tokio::spawn(b.run(server_rx.clone(), serve));
        let tu = tokio::spawn(undecided.run(server_rx, serve));
        tokio::task::yield_now().await;
        // Same address, different names: only "a"'s connection stops; the
        // undecided one is asked under the new policy when it gets there.
        assert_eq!(access.set_allowed(Allowed::Nodes(nodes(&["b"]))).stopped(), 1);
        assert!(ta.await.unwrap());
        assert!(!tb.is_finished() && !tu.is_finished());
        // Making "b" a reader changes its right to write: stopped too.
        let read_only = ReadOnlyPeers { nodes: nodes(&["b"]), ..Default::default() };
        assert_eq!(access.set_policy(Allowed::Nodes(nodes(&["b"])), read_only).stopped(), 1);
        assert!(tb.await.unwrap());
        assert!(!tu.is_finished());
        tu.abort();
    }

    #[tokio::test]
    async fn a_drain_signal_stops_between_requests_only() {
        let (_requested_tx, requested) = watch::channel(false);
        let (limit_tx, limit) = watch::channel(false);
        let mut stop = Stop::new(requested).drain_when(limit);
        let short = std::time::Duration::from_millis(20);
        let waiting = tokio::time::timeout(short, stop.requested_or_draining()).await;
        assert!(waiting.is_err(), "no stop yet");
        limit_tx.send(true).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), stop.requested_or_draining()).await.expect("drained");
        let inside = tokio::time::timeout(short, stop.requested()).await;
        assert!(inside.is_err(), "a drain does not stop a request in progress");
    }
}
