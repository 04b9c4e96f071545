//! One client cannot starve the others: a flood of connections to one
//! export is cut at the per-peer cap right after accept (no handshake
//! bytes), other addresses still get in up to the per-export cap, and
//! another export of the same process keeps answering its handshake
//! promptly throughout. Real TCP on 127.0.0.0/8; every loopback address is
//! local on Linux, so clients bind 127.0.0.2 and up to be other peers.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use nbd::client::{HandshakeOptions, handshake};
use nbd::server::{Export, ExportConfig, Server};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// The defaults of ExportConfig, stated here independently.
const PER_PEER: usize = 32;
const PER_EXPORT: usize = 128;
const FLOOD: usize = 1000;
/// How long another export's handshake may take during the flood.
const PROMPT: Duration = Duration::from_secs(1);

async fn serve(name: &str) -> (SocketAddr, oneshot::Sender<()>) {
    let file = tempfile::tempfile().unwrap();
    file.set_len(1 << 20).unwrap();
    let export = Export::from_file(file, ExportConfig::new(name)).unwrap();
    let server = Server::bind(export, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = server.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    (addr, stop)
}

async fn connect_from(source: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).unwrap();
    tokio::time::timeout(Duration::from_secs(10), socket.connect(addr)).await.expect("connect in time").unwrap()
}

/// True if the server greets on `stream`; false if it closes it without
/// sending a byte. Anything else fails the test.
async fn greeted(mut stream: TcpStream) -> (bool, TcpStream) {
    let mut buf = [0u8; 18];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await;
    let greeted = match read.expect("the server neither greeted nor closed within 10 s") {
        Ok(0) => false,
        Ok(n) => {
            assert_eq!(&buf[..8], b"NBDMAGIC", "greeting ({n} bytes)");
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => false,
        Err(e) => panic!("reading the greeting: {e}"),
    };
    (greeted, stream)
}

/// Connections from `source`; returns the greeted ones and how many were
/// closed unserved.
async fn open_many(source: Ipv4Addr, addr: SocketAddr, count: usize) -> (Vec<TcpStream>, usize) {
    let mut opened = Vec::with_capacity(count);
    for _ in 0..count {
        opened.push(connect_from(source, addr).await);
    }
    let mut checks: JoinSet<_> = opened.into_iter().map(greeted).collect();
    let (mut kept, mut refused) = (Vec::new(), 0);
    while let Some(result) = checks.join_next().await {
        match result.unwrap() {
            (true, stream) => kept.push(stream),
            (false, _) => refused += 1,
        }
    }
    (kept, refused)
}

/// A whole handshake with export `name` at `addr`; how long it took.
async fn handshake_time(addr: SocketAddr, name: &str) -> Duration {
    let started = Instant::now();
    let opts = HandshakeOptions { export_name: name.into(), structured_replies: false };
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await?;
        handshake(&mut stream, &opts).await.map_err(std::io::Error::other)
    };
    let export = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .expect("export B's handshake did not finish within 10 s")
        .expect("export B's handshake");
    assert_eq!(export.size, 1 << 20);
    started.elapsed()
}

/// The flood holds a thousand sockets here and up to the caps in the
/// server: more than the usual soft limit of 1024 descriptors.
fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_to_one_export_is_capped_and_leaves_the_other_export_answering() {
    raise_descriptor_limit();
    let (a, _stop_a) = serve("a").await;
    let (b, _stop_b) = serve("b").await;
    let flooder = Ipv4Addr::new(127, 0, 0, 1);

    // The flood, while export B is asked for a handshake again and again.
    let flood = tokio::spawn(open_many(flooder, a, FLOOD));
    let mut slowest = Duration::ZERO;
    let mut handshakes = 0;
    while !flood.is_finished() || handshakes < 5 {
        slowest = slowest.max(handshake_time(b, "b").await);
        handshakes += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (flooded, refused) = flood.await.unwrap();
    // Once more with the flood's connections all held open.
    slowest = slowest.max(handshake_time(b, "b").await);
    eprintln!(
        "export B: slowest of {} handshakes during and after a flood of {FLOOD} to A: {slowest:?}",
        handshakes + 1
    );
    assert!(slowest < PROMPT, "export B's handshake took {slowest:?} during the flood");
    assert_eq!(flooded.len(), PER_PEER, "connections from the flooding address that were greeted");
    assert_eq!(refused, FLOOD - PER_PEER, "connections closed without a handshake byte");

    // Other addresses still get in, up to the export's cap, and no further.
    let mut others = Vec::new();
    for host in 2..=4 {
        let (kept, refused) = open_many(Ipv4Addr::new(127, 0, 0, host), a, PER_PEER).await;
        assert_eq!((kept.len(), refused), (PER_PEER, 0), "peer 127.0.0.{host}");
        others.extend(kept);
    }
    assert_eq!(flooded.len() + others.len(), PER_EXPORT);
    let late = Ipv4Addr::new(127, 0, 0, 5);
    let (kept, refused) = open_many(late, a, 1).await;
    assert_eq!((kept.len(), refused), (0, 1), "a connection over the export's cap is refused");

    // A closed connection frees its slot for anyone.
    drop(flooded);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (kept, _) = open_many(late, a, 1).await;
        if kept.len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "slots of closed connections were not freed within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(others);
}
