//! A tokio NBD server for one export backed by one file.
//!
//! Every connection shares the same open file, so a FLUSH (fdatasync) or a
//! FUA write on any connection is durable for all of them when it is
//! acknowledged: that is what makes advertising CAN_MULTI_CONN truthful.
//! Connections over the export's or a peer's cap are closed right after
//! accept (see `admission`).
//!
//! An export may speak TLS ([`ExportConfig::tls`]): NBD_OPT_STARTTLS
//! upgrades the connection in the middle of option haggling, and its
//! transmission then runs over rustls in this process. READ data cannot
//! go out with sendfile(2) there; it is read into memory and encrypted (the
//! copy path), and [`ExportStats::tls_userspace_connections`] counts such
//! connections. A TLS connection is closed once it has carried its record
//! limit, before its keys would need renewing (see `crate::tls::records`).

mod access;
mod admission;
mod backend;
pub mod cow;
mod gate;
mod handshake;
mod pool;
mod sink;
mod transmission;

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::error::Error;
use crate::flags::TransmissionFlags;
use crate::tls::records::{RecordCounting, RecordLimit};
use crate::tls::{TlsMode, node_name};

use access::Ticket;
pub use access::{Access, Allowed, Client, Decision, Fence, Gate, ReadOnlyPeers, Stop};
use admission::{AcceptBackoff, ConnectionLimits, RefusalLog, Refused, Slot};
pub use backend::Backend;
pub use cow::CopyBeforeWrite;
pub use gate::{WriteGate, WritesPaused};
use handshake::{Negotiation, Outcome};
pub use sink::ReplySink;

/// How long a stopping server waits for connections to send owed replies.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// TCP keepalive on accepted sockets, so that a peer that vanished (a node
/// partitioned away or powered off) while idle is noticed: first probe after
/// 30 s of silence, then every 10 s. Storage clients reconnect on their own,
/// so dropping a dead one early costs nothing; keeping it costs a socket and
/// the replies it was owed.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 5;
/// TCP_USER_TIMEOUT: data we sent that stays unacknowledged this long ends
/// the connection (and, with keepalive on, so do unanswered probes). Without
/// it a partitioned peer with replies owed holds the connection for the
/// kernel's ~15 minutes of retransmissions. Longer than keepalive's
/// 30 + 5 × 10 s, so probes get their chance, and well beyond a live but slow
/// client, whose ACKs (zero-window probes included) keep resetting it.
const USER_TIMEOUT: Duration = Duration::from_secs(90);

/// Default for [`ExportConfig::max_connections_per_peer`]. The node plugin
/// opens at most 8 connections per volume, and healing opens new ones while
/// the server may still hold the dead ones it has not noticed yet: 32 leaves
/// room for a few generations of those, and no more.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 32;
/// Default for [`ExportConfig::max_connections`]: a volume published to
/// several nodes (read-only or multi-writer) at 8 connections each, with
/// their reconnects; small enough that one volume's clients cannot use up
/// the descriptors the process's other volumes need.
pub const DEFAULT_MAX_CONNECTIONS: usize = 128;

/// How one export behaves.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// The only name a client may ask for. For CSI volumes it is a secret token.
    pub name: String,
    pub description: String,
    pub read_only: bool,
    /// Advertise NBD_FLAG_CAN_MULTI_CONN. Off only for tests and debugging.
    pub multi_conn: bool,
    /// Answer NBD_OPT_LIST with this export's name. Off when the name is a
    /// secret, since listing it would hand the token to any caller.
    pub list_export: bool,
    /// Clients that have not entered transmission by then are dropped.
    pub handshake_timeout: Duration,
    /// Bytes of request and reply payload one connection may hold in memory
    /// at once; the reader waits when it is used up. At least the maximum
    /// payload, so one maximal request always fits.
    pub connection_buffer_budget: usize,
    /// Connections the export holds at once, handshaking ones included;
    /// more are closed right after accept. At least 1.
    pub max_connections: usize,
    /// Connections one source address holds at once, likewise. At least 1.
    pub max_connections_per_peer: usize,
    /// Off, allowed or required (see [`TlsMode`]).
    pub tls: TlsMode,
}

impl ExportConfig {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            read_only: false,
            multi_conn: true,
            list_export: true,
            handshake_timeout: Duration::from_secs(10),
            connection_buffer_budget: 64 << 20,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            tls: TlsMode::Off,
        }
    }
}

/// Counters for metrics; updated with relaxed atomics on the I/O path.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub flushes: AtomicU64,
    pub in_flight: AtomicU64,
    pub connections: AtomicU64,
    pub errors: AtomicU64,
    /// Open connections in transmission over TLS in this process (rustls):
    /// their READ data is copied through userspace instead of sent with
    /// sendfile(2). There is no kernel TLS on the server's side yet, so
    /// this is every TLS connection; plaintext ones are the rest of
    /// `connections`.
    pub tls_userspace_connections: AtomicU64,
    /// TLS handshakes that failed (no client certificate, another CA, a
    /// protocol error).
    pub tls_handshake_failures: AtomicU64,
    /// TLS connections closed at their record limit; their clients
    /// reconnect with fresh keys.
    pub tls_record_limit_closes: AtomicU64,
}

/// One export: its configuration, backing file and counters, shared by every
/// connection.
#[derive(Debug)]
pub struct Export {
    config: ExportConfig,
    backend: Backend,
    stats: ExportStats,
    access: Access,
    write_gate: WriteGate,
    /// Copies in progress: each saves a chunk's old data before a change.
    copies: RwLock<Vec<Arc<CopyBeforeWrite>>>,
}

impl Export {
    /// Opens `path` (read-only if the export is) and exports its current length.
    pub fn open(path: &Path, config: ExportConfig) -> io::Result<Arc<Self>> {
        let file = File::options().read(true).write(!config.read_only).open(path)?;
        Self::from_file(file, config)
    }

    pub fn from_file(file: File, config: ExportConfig) -> io::Result<Arc<Self>> {
        let budget = config.connection_buffer_budget.max(crate::limits::MAX_PAYLOAD as usize);
        let config = ExportConfig {
            connection_buffer_budget: budget,
            max_connections: config.max_connections.max(1),
            max_connections_per_peer: config.max_connections_per_peer.max(1),
            ..config
        };
        Ok(Arc::new(Self {
            backend: Backend::new(file)?,
            config,
            stats: ExportStats::default(),
            access: Access::default(),
            write_gate: WriteGate::default(),
            copies: RwLock::default(),
        }))
    }

    pub fn config(&self) -> &ExportConfig {
        &self.config
    }

    pub fn stats(&self) -> &ExportStats {
        &self.stats
    }

    /// Which peers may connect; changing it closes connections it no longer admits.
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// Held shared by data-changing commands; [`WriteGate::pause`] stops them.
    pub fn write_gate(&self) -> &WriteGate {
        &self.write_gate
    }

    pub fn size(&self) -> u64 {
        self.backend.size()
    }

    /// From now on, every change to the file first saves the old data of
    /// the chunks it touches into `copy`. Call it while the write gate is
    /// paused: that is the copy's instant.
    pub fn start_copy(&self, copy: Arc<CopyBeforeWrite>) {
        self.copies.write().unwrap_or_else(|p| p.into_inner()).push(copy);
    }

    /// Stops guarding writes for `copy` (complete, or abandoned).
    pub fn end_copy(&self, copy: &Arc<CopyBeforeWrite>) {
        self.copies.write().unwrap_or_else(|p| p.into_inner()).retain(|c| !Arc::ptr_eq(c, copy));
    }

    /// Copies still guarding writes.
    pub fn copies_in_progress(&self) -> usize {
        self.copies.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Called with the write gate held, before `len` bytes at `offset`
    /// change: every copy in progress saves what they hold now.
    fn before_change(&self, offset: u64, len: u64) {
        let copies = self.copies.read().unwrap_or_else(|p| p.into_inner());
        for copy in copies.iter() {
            copy.preserve(self.backend.file(), offset, len);
        }
    }

    /// Grows (or shrinks) the backing file; connected clients see the new
    /// size on their next bounds check.
    pub fn resize(&self, size: u64) -> io::Result<()> {
        self.backend.resize(size)
    }

    /// Makes every write acknowledged so far durable.
    pub fn flush(&self) -> io::Result<()> {
        self.backend.flush()
    }

    /// The transmission flags for a session. SEND_DF is only set once
    /// structured replies are negotiated, as the spec requires.
    pub fn transmission_flags(&self, structured_replies: bool, read_only: bool) -> TransmissionFlags {
        use TransmissionFlags as tf;
        let mut flags = tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_FUA | tf::SEND_CACHE;
        if read_only {
            flags |= tf::READ_ONLY;
        } else {
            flags |= tf::SEND_TRIM | tf::SEND_WRITE_ZEROES | tf::SEND_FAST_ZERO;
        }
        if self.config.multi_conn {
            flags |= tf::CAN_MULTI_CONN;
        }
        if structured_replies {
            flags |= tf::SEND_DF;
        }
        flags
    }
}

/// Serves one client on an already-accepted stream until it disconnects,
/// breaks the protocol, or `shutdown` turns true. The export's access
/// policy is not consulted (no registry, no peer address).
pub async fn serve_stream<S>(export: Arc<Export>, stream: S, shutdown: watch::Receiver<bool>) -> crate::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    // Boxed and pinned: the TLS upgrade needs an `Unpin` stream.
    let stream = Box::pin(stream);
    let split = |stream| tokio::io::split(stream);
    let join = |rd: tokio::io::ReadHalf<_>, wr| Ok(rd.unsplit(wr));
    serve(Negotiation::new(export, None), stream, split, join, Stop::new(shutdown)).await
}

/// One connection from greeting to close: the handshake, a TLS upgrade
/// if the client starts one, the transmission. `split` cuts the stream
/// into what the handshake and transmission read from and reply to;
/// `join` puts it back together for the upgrade. `shutdown` is dropped
/// once this session can no longer touch the file.
async fn serve<S, R, W>(
    mut negotiation: Negotiation,
    stream: S,
    split: impl FnOnce(S) -> (R, W),
    join: impl FnOnce(R, W) -> io::Result<S>,
    mut shutdown: Stop,
) -> crate::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    R: AsyncRead + Unpin + Send + 'static,
    W: ReplySink,
{
    let export = Arc::clone(negotiation.export());
    let limit = export.config().handshake_timeout;
    // One deadline for the whole handshake, TLS included.
    let deadline = Instant::now() + limit;
    let (mut rd, mut wr) = split(stream);
    let haggled = async {
        negotiation.greet(&mut rd, &mut wr).await?;
        negotiation.haggle(&mut rd, &mut wr).await
    };
    let outcome = tokio::select! {
        outcome = tokio::time::timeout_at(deadline, haggled) => outcome.map_err(|_| Error::HandshakeTimeout(limit))??,
        () = shutdown.requested() => return Ok(()),
    };
    match outcome {
        Outcome::Close => Ok(()),
        Outcome::Transmission(session) => transmission::run(export, session, rd, wr, shutdown).await,
        Outcome::StartTls => serve_tls(negotiation, join(rd, wr)?, deadline, shutdown).await,
    }
}

/// The rest of a connection after NBD_OPT_STARTTLS was acknowledged: the
/// TLS handshake (the client's certificate must chain to the export's CA),
/// haggling on over TLS, and a transmission that ends at the record limit.
async fn serve_tls<S>(
    mut negotiation: Negotiation,
    stream: S,
    deadline: Instant,
    mut shutdown: Stop,
) -> crate::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let export = Arc::clone(negotiation.export());
    let limit = export.config().handshake_timeout;
    let tls = export.config().tls.server().cloned().ok_or_else(|| Error::Protocol("STARTTLS without TLS".into()))?;
    let records = RecordLimit::new(tls.record_limit());
    // From files, this looks whether they changed: a renewed certificate
    // serves from the next connection on.
    let config = tokio::task::spawn_blocking(move || tls.config()).await.map_err(io::Error::other)?;
    let accepting = tokio_rustls::TlsAcceptor::from(config).accept(RecordCounting::new(stream, records.clone()));
    let accepted = tokio::select! {
        accepted = tokio::time::timeout_at(deadline, accepting) => accepted.map_err(|_| Error::HandshakeTimeout(limit))?,
        () = shutdown.requested() => return Ok(()),
    };
    let stream = accepted.map_err(|e| {
        export.stats.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
        Error::TlsHandshake(e)
    })?;
    negotiation.tls_established(node_name(stream.get_ref().1.peer_certificates()));
    let (mut rd, mut wr) = tokio::io::split(stream);
    let outcome = tokio::select! {
        outcome = tokio::time::timeout_at(deadline, negotiation.haggle(&mut rd, &mut wr)) => {
            outcome.map_err(|_| Error::HandshakeTimeout(limit))??
        }
        () = shutdown.requested() => return Ok(()),
    };
    match outcome {
        Outcome::Close => {
            // close_notify, as the spec asks of whoever ends a TLS session.
            let _ = wr.shutdown().await;
            Ok(())
        }
        // The handshake answers a second STARTTLS with an error.
        Outcome::StartTls => Err(Error::Protocol("NBD_OPT_STARTTLS under TLS".into())),
        Outcome::Transmission(session) => {
            let _counted = Counted::tls_userspace(&export);
            let stop = shutdown.drain_when(records.reached());
            let result = transmission::run(Arc::clone(&export), session, rd, wr, stop).await;
            if records.is_reached() {
                export.stats.tls_record_limit_closes.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    sent = records.sent(),
                    received = records.received(),
                    limit = records.soft(),
                    "TLS connection closed at its record limit; the client reconnects with fresh keys"
                );
            }
            result
        }
    }
}

async fn serve_tcp(export: Arc<Export>, stream: TcpStream, gate: Gate, shutdown: Stop) -> crate::Result<()> {
    tune_socket(&stream)?;
    let split = TcpStream::into_split;
    let join = |rd: tokio::net::tcp::OwnedReadHalf, wr| rd.reunite(wr).map_err(io::Error::other);
    serve(Negotiation::new(export, Some(gate)), stream, split, join, shutdown).await
}

/// Socket options for an accepted client: no Nagle (replies are batched by
/// the writer; Nagle would only add latency), keepalive and a user timeout
/// so that a peer gone silent does not hold its connection forever.
fn tune_socket(stream: &TcpStream) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    stream.set_nodelay(true)?;
    let secs = |d: Duration| d.as_secs() as u32;
    setsockopt(stream, sockopt::KeepAlive, &true)?;
    setsockopt(stream, sockopt::TcpKeepIdle, &secs(KEEPALIVE_IDLE))?;
    setsockopt(stream, sockopt::TcpKeepInterval, &secs(KEEPALIVE_INTERVAL))?;
    setsockopt(stream, sockopt::TcpKeepCount, &KEEPALIVE_PROBES)?;
    setsockopt(stream, sockopt::TcpUserTimeout, &(USER_TIMEOUT.as_millis() as u32))?;
    Ok(())
}

/// Counts one connection in a gauge of [`ExportStats`] for as long as it
/// lives, however its task ends: a stopping server aborts the ones that do
/// not drain, and those must leave the count too.
struct Counted {
    export: Arc<Export>,
    gauge: fn(&ExportStats) -> &AtomicU64,
}

impl Counted {
    /// In [`ExportStats::connections`].
    fn connection(export: &Arc<Export>) -> Self {
        Self::new(export, |stats| &stats.connections)
    }

    /// In [`ExportStats::tls_userspace_connections`].
    fn tls_userspace(export: &Arc<Export>) -> Self {
        Self::new(export, |stats| &stats.tls_userspace_connections)
    }

    fn new(export: &Arc<Export>, gauge: fn(&ExportStats) -> &AtomicU64) -> Self {
        gauge(&export.stats).fetch_add(1, Ordering::Relaxed);
        Self { export: Arc::clone(export), gauge }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        (self.gauge)(&self.export.stats).fetch_sub(1, Ordering::Relaxed);
    }
}

/// A listening export server.
#[derive(Debug)]
pub struct Server {
    export: Arc<Export>,
    listener: TcpListener,
}

impl Server {
    pub async fn bind(export: Arc<Export>, addr: SocketAddr) -> io::Result<Self> {
        Ok(Self { export, listener: TcpListener::bind(addr).await? })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }

    /// Accepts clients until `shutdown` resolves, then stops reading new
    /// requests, lets every connection finish and send the replies it owes,
    /// flushes the file and returns.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> io::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        let config = self.export.config();
        let limits = ConnectionLimits::new(config.max_connections, config.max_connections_per_peer);
        let mut refusals = RefusalLog::default();
        let mut backoff = AcceptBackoff::default();
        let far = || tokio::time::Instant::now() + Duration::from_secs(86_400);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept(), if backoff.ready() => match accepted {
                    Ok((stream, peer)) => {
                        backoff.succeeded();
                        match self.admit(&limits, peer) {
                            Ok(admitted) => {
                                let export = Arc::clone(&self.export);
                                connections.spawn(serve_admitted(export, stream, peer, admitted, stop_rx.clone()));
                            }
                            // Dropping the stream closes it: no greeting, no handshake.
                            Err(reason) => refusals.note(peer, reason),
                        }
                    }
                    // Out of descriptors and similar: keep serving the
                    // clients we have rather than dying or spinning.
                    Err(e) => backoff.failed(&e),
                },
                () = tokio::time::sleep_until(backoff.resume_at()), if !backoff.ready() => backoff.resume(),
                () = tokio::time::sleep_until(refusals.due().unwrap_or_else(far)), if refusals.due().is_some() => {
                    refusals.flush();
                }
                // A closed connection frees a descriptor: try accepting again.
                Some(_) = connections.join_next(), if !connections.is_empty() => backoff.resume(),
            }
        }
        refusals.flush();
        drop(self.listener);
        let _ = stop_tx.send(true);
        // Connections stop reading at once; give them a moment to send what
        // they owe, then drop any whose client has stopped reading replies.
        let drained = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, drained).await.is_err() {
            tracing::warn!(left = connections.len(), "closing connections that did not drain");
            connections.shutdown().await;
        }
        let backend = self.export.clone();
        tokio::task::spawn_blocking(move || backend.flush()).await.map_err(io::Error::other)?
    }

    /// A slot under the connection caps, then the access policy's ticket.
    fn admit(&self, limits: &ConnectionLimits, peer: SocketAddr) -> Result<(Slot, Ticket), Refused> {
        let slot = limits.admit(peer.ip())?;
        let ticket = self.export.access.admit(peer.ip()).ok_or(Refused::NotAllowed)?;
        Ok((slot, ticket))
    }
}

/// One admitted connection, from handshake to close; its slot is freed
/// when it ends.
async fn serve_admitted(
    export: Arc<Export>,
    stream: TcpStream,
    peer: SocketAddr,
    (slot, ticket): (Slot, Ticket),
    stop: watch::Receiver<bool>,
) {
    let counted = Counted::connection(&export);
    let gate = ticket.gate();
    let result = ticket.run(stop, |stop| serve_tcp(export, stream, gate, stop)).await;
    drop(counted);
    drop(slot);
    match result {
        Ok(()) => tracing::debug!(%peer, "client disconnected"),
        Err(e) => tracing::info!(%peer, error = %e, "connection closed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{getsockopt, sockopt};

    #[tokio::test]
    async fn accepted_sockets_get_keepalive_and_a_user_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        tune_socket(&accepted).unwrap();
        assert!(accepted.nodelay().unwrap());
        assert!(getsockopt(&accepted, sockopt::KeepAlive).unwrap());
        assert_eq!(getsockopt(&accepted, sockopt::TcpKeepIdle).unwrap(), 30);
        assert_eq!(getsockopt(&accepted, sockopt::TcpKeepInterval).unwrap(), 10);
        assert_eq!(getsockopt(&accepted, sockopt::TcpKeepCount).unwrap(), KEEPALIVE_PROBES);
        assert_eq!(getsockopt(&accepted, sockopt::TcpUserTimeout).unwrap(), 90_000);
        // Probes get their whole chance before the user timeout cuts in.
        assert!(KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_PROBES < USER_TIMEOUT);
    }
}
