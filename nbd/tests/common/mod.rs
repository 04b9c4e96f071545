//! Shared harness for the in-process session tests: one `serve_stream` task
//! on one end of a `tokio::io::duplex` pipe, and a raw NBD client on the
//! other end that speaks bytes built with `nbd::wire`.
//!
//! Every read is bounded by a timeout, so a server that stops answering makes
//! a test fail instead of hang.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod pki;

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use nbd::server::{Export, ExportConfig, serve_stream};
use nbd::wire::{
    ChunkHeader, Greeting, InfoReply, InfoRequest, MetaContextReply, MetaContextRequest, OptionHeader,
    OptionReplyHeader, Request, SimpleReply,
};
use nbd::{ClientFlags, CommandFlags, TransmissionFlags, cmd, info, opt, rep};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub const NAME: &str = "pvc-3f1c-secret-token";
pub const DESCRIPTION: &str = "test volume";
/// Export size: sparse, so it costs nothing, and larger than the 32 MiB
/// payload limit so that an oversized READ is refused for its length alone.
pub const SIZE: u64 = 64 << 20;
/// Duplex buffer per direction: large enough that neither side ever blocks
/// on a full pipe in these tests.
pub const PIPE: usize = 64 << 20;
pub const MIB: u64 = 1 << 20;
pub const MAX_PAYLOAD: u32 = 32 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the server advertises by default, spelled out bit by bit:
/// HAS_FLAGS(0) SEND_FLUSH(2) SEND_FUA(3) SEND_TRIM(5) SEND_WRITE_ZEROES(6)
/// CAN_MULTI_CONN(8) SEND_CACHE(10) SEND_FAST_ZERO(11).
pub const DEFAULT_FLAGS: TransmissionFlags = TransmissionFlags::from_bits_retain(0b0000_1101_0110_1101);

/// Awaits `fut`, failing the test if it takes longer than the I/O timeout.
pub async fn within<F: std::future::Future>(fut: F) -> F::Output {
    tokio::time::timeout(IO_TIMEOUT, fut).await.expect("timed out waiting for the server")
}

/// Deterministic, never-all-zero content for byte `pos` of the export.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(|pos| (pos % 251) as u8 ^ 0x5a).collect()
}

pub fn config() -> ExportConfig {
    let mut config = ExportConfig::new(NAME);
    config.description = DESCRIPTION.into();
    config
}

/// A sparse temp file of `SIZE` bytes in the default temp dir (/tmp here,
/// ext4: hole punching and SEEK_DATA/SEEK_HOLE work there).
pub fn backing_file() -> File {
    let file = tempfile::tempfile().expect("temp file");
    file.set_len(SIZE).expect("set_len");
    file
}

/// A backing file with `len` bytes of `pattern` at `offset`, holes elsewhere.
pub fn file_with_data(offset: u64, len: usize) -> File {
    let file = backing_file();
    file.write_all_at(&pattern(offset, len), offset).expect("write");
    file
}

pub fn read_file(file: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, offset).expect("pread");
    buf
}

/// One server session and the client end of its pipe.
pub struct Harness {
    pub client: Client,
    pub server: JoinHandle<nbd::Result<()>>,
    pub stop: watch::Sender<bool>,
    /// A second descriptor on the backing file, to check what reached it.
    pub file: File,
    pub export: Arc<Export>,
}

pub fn start(config: ExportConfig) -> Harness {
    start_with(backing_file(), config)
}

pub fn start_with(file: File, config: ExportConfig) -> Harness {
    let export = Export::from_file(file.try_clone().expect("dup"), config).expect("export");
    let (client, server_end) = tokio::io::duplex(PIPE);
    let (stop, stop_rx) = watch::channel(false);
    let server = tokio::spawn(serve_stream(Arc::clone(&export), server_end, stop_rx));
    Harness { client: Client { io: client, context_id: None }, server, stop, file, export }
}

impl Harness {
    /// Waits for `serve_stream` to return and gives its result.
    pub async fn finish(self) -> nbd::Result<()> {
        within(self.server).await.expect("server task panicked")
    }

    /// The client sees EOF, and the server returns `Ok`.
    pub async fn expect_clean_close(mut self) {
        assert_eq!(self.client.read_to_eof().await, Vec::<u8>::new());
        self.finish().await.expect("server ended with an error");
    }

    /// The client sees EOF, and the server returns an error.
    pub async fn expect_error_close(mut self) -> nbd::Error {
        self.client.read_to_eof().await;
        self.finish().await.expect_err("server ended cleanly")
    }
}

/// A raw NBD client on the duplex pipe.
pub struct Client {
    pub io: DuplexStream,
    /// The id the server gave `base:allocation`, once selected.
    pub context_id: Option<u32>,
}

impl Client {
    pub async fn send(&mut self, bytes: &[u8]) {
        within(self.io.write_all(bytes)).await.expect("client write");
    }

    pub async fn recv(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        within(self.io.read_exact(&mut buf)).await.expect("client read");
        buf
    }

    async fn recv_array<const N: usize>(&mut self) -> [u8; N] {
        let mut buf = [0; N];
        within(self.io.read_exact(&mut buf)).await.expect("client read");
        buf
    }

    /// Everything the server still sends, until it closes the pipe.
    pub async fn read_to_eof(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        within(self.io.read_to_end(&mut rest)).await.expect("read to EOF");
        rest
    }

    // ------------------------------------------------------------ handshake

    pub async fn greeting(&mut self) -> Greeting {
        Greeting::decode(&self.recv_array().await).expect("greeting")
    }

    /// Reads the greeting and answers with `flags`.
    pub async fn begin(&mut self, flags: u32) {
        self.greeting().await;
        self.send(&flags.to_be_bytes()).await;
    }

    /// Reads the greeting and sets both known client flags.
    pub async fn begin_fixed(&mut self) {
        self.begin((ClientFlags::C_FIXED_NEWSTYLE | ClientFlags::C_NO_ZEROES).bits()).await;
    }

    pub async fn option(&mut self, option: u32, data: &[u8]) {
        let mut msg = OptionHeader { option, length: data.len() as u32 }.encode().to_vec();
        msg.extend_from_slice(data);
        self.send(&msg).await;
    }

    pub async fn reply(&mut self) -> (OptionReplyHeader, Vec<u8>) {
        let header = OptionReplyHeader::decode(&self.recv_array().await).expect("option reply header");
        assert!(header.length <= 1 << 20, "option reply of {} bytes", header.length);
        let payload = self.recv(header.length as usize).await;
        (header, payload)
    }

    /// Reads one option reply, asserts it answers `option` with `reply`,
    /// and returns its payload.
    pub async fn expect_reply(&mut self, option: u32, reply: u32) -> Vec<u8> {
        let (header, payload) = self.reply().await;
        assert_eq!(header.option, option, "reply to the wrong option");
        assert_eq!(header.reply, reply, "reply type for option {option} (payload {payload:?})");
        payload
    }

    pub async fn structured_replies(&mut self) {
        self.option(opt::STRUCTURED_REPLY, &[]).await;
        self.expect_reply(opt::STRUCTURED_REPLY, rep::ACK).await;
    }

    pub async fn set_meta_context(&mut self, queries: &[&str]) -> Vec<(u32, Vec<u8>)> {
        self.meta_context(opt::SET_META_CONTEXT, NAME, queries).await
    }

    /// Sends a LIST/SET_META_CONTEXT and collects the replies up to the
    /// final one (returned last, with its type).
    pub async fn meta_context(&mut self, option: u32, export: &str, queries: &[&str]) -> Vec<(u32, Vec<u8>)> {
        let request =
            MetaContextRequest { export: export.into(), queries: queries.iter().map(|q| q.to_string()).collect() };
        self.option(option, &request.encode()).await;
        self.replies_until_final(option).await
    }

    /// Option replies up to and including the first ACK or error.
    pub async fn replies_until_final(&mut self, option: u32) -> Vec<(u32, Vec<u8>)> {
        let mut replies = Vec::new();
        loop {
            let (header, payload) = self.reply().await;
            assert_eq!(header.option, option);
            let last = header.reply == rep::ACK || header.reply & rep::ERR_BIT != 0;
            replies.push((header.reply, payload));
            if last {
                return replies;
            }
        }
    }

    pub async fn info_or_go(&mut self, option: u32, name: &str, requests: &[u16]) -> Vec<(u32, Vec<u8>)> {
        let request = InfoRequest { name: name.into(), requests: requests.to_vec() };
        self.option(option, &request.encode()).await;
        self.replies_until_final(option).await
    }

    /// A whole handshake ending with a successful GO; returns the
    /// transmission flags from NBD_INFO_EXPORT.
    pub async fn negotiate(&mut self, structured: bool, base_allocation: bool) -> TransmissionFlags {
        self.begin_fixed().await;
        if structured {
            self.structured_replies().await;
        }
        if base_allocation {
            let replies = self.set_meta_context(&["base:allocation"]).await;
            assert_eq!(replies.len(), 2, "one META_CONTEXT then ACK: {replies:?}");
            let context = MetaContextReply::decode(&replies[0].1).expect("META_CONTEXT");
            assert_eq!(context.name, "base:allocation");
            self.context_id = Some(context.id);
        }
        self.go().await
    }

    /// GO for the export on a client already past the greeting; returns
    /// the transmission flags from NBD_INFO_EXPORT.
    pub async fn go(&mut self) -> TransmissionFlags {
        let replies = self.info_or_go(opt::GO, NAME, &[info::BLOCK_SIZE]).await;
        assert_eq!(replies.last().map(|r| r.0), Some(rep::ACK), "GO refused: {replies:?}");
        let export = replies.iter().find_map(|(reply, payload)| match InfoReply::decode(payload) {
            Ok(InfoReply::Export { size, transmission_flags }) if *reply == rep::INFO => {
                Some((size, transmission_flags))
            }
            _ => None,
        });
        let (size, flags) = export.expect("GO sent NBD_INFO_EXPORT");
        assert_eq!(size, SIZE);
        flags
    }

    // --------------------------------------------------------- transmission

    pub async fn request(&mut self, flags: CommandFlags, command: u16, cookie: u64, offset: u64, length: u32) {
        self.send(&Request { flags, command, cookie, offset, length }.encode()).await;
    }

    pub async fn write(&mut self, flags: CommandFlags, cookie: u64, offset: u64, data: &[u8]) {
        let mut msg =
            Request { flags, command: cmd::WRITE, cookie, offset, length: data.len() as u32 }.encode().to_vec();
        msg.extend_from_slice(data);
        self.send(&msg).await;
    }

    pub async fn simple(&mut self) -> SimpleReply {
        SimpleReply::decode(&self.recv_array().await).expect("simple reply")
    }

    /// Reads a simple reply for `cookie` and returns its error.
    pub async fn simple_error(&mut self, cookie: u64) -> u32 {
        let reply = self.simple().await;
        assert_eq!(reply.cookie, cookie, "cookie echoed");
        reply.error
    }

    /// A command without payload in either direction; returns its error.
    pub async fn command(&mut self, flags: CommandFlags, command: u16, offset: u64, length: u32) -> u32 {
        let cookie = 0xc0de_0000 + u64::from(command);
        self.request(flags, command, cookie, offset, length).await;
        self.simple_error(cookie).await
    }

    /// WRITE with a simple reply; returns its error.
    pub async fn write_simple(&mut self, flags: CommandFlags, offset: u64, data: &[u8]) -> u32 {
        self.write(flags, 0x7717e, offset, data).await;
        self.simple_error(0x7717e).await
    }

    /// READ with simple replies: the data, or the error.
    pub async fn read_simple(&mut self, flags: CommandFlags, offset: u64, length: u32) -> Result<Vec<u8>, u32> {
        self.request(flags, cmd::READ, 0x4ead, offset, length).await;
        match self.simple_error(0x4ead).await {
            0 => Ok(self.recv(length as usize).await),
            error => Err(error),
        }
    }

    pub async fn chunk(&mut self) -> (ChunkHeader, Vec<u8>) {
        let header = ChunkHeader::decode(&self.recv_array().await).expect("structured reply chunk");
        assert!(header.length <= MAX_PAYLOAD + 8, "chunk of {} bytes", header.length);
        let payload = self.recv(header.length as usize).await;
        (header, payload)
    }

    /// All chunks of one structured reply, up to the one flagged DONE.
    pub async fn chunks(&mut self, cookie: u64) -> Vec<(ChunkHeader, Vec<u8>)> {
        let mut chunks = Vec::new();
        loop {
            let (header, payload) = self.chunk().await;
            assert_eq!(header.cookie, cookie, "cookie echoed");
            let done = header.is_done();
            chunks.push((header, payload));
            if done {
                return chunks;
            }
        }
    }

    /// After a request that must not have broken the session: a 512-byte
    /// READ still gets a normal reply (simple or structured).
    pub async fn still_works(&mut self, structured: bool) {
        self.request(CommandFlags::empty(), cmd::READ, 0x57111, 0, 512).await;
        if structured {
            let chunks = self.chunks(0x57111).await;
            assert!(chunks.iter().all(|(h, _)| h.kind & 0x8000 == 0), "READ failed: {chunks:?}");
        } else {
            assert_eq!(self.simple_error(0x57111).await, 0);
            self.recv(512).await;
        }
    }
}

/// Asserts every bit in `set` is set and every bit in `clear` is clear.
pub fn assert_flags(flags: TransmissionFlags, set: TransmissionFlags, clear: TransmissionFlags) {
    assert!(flags.contains(set), "flags {flags:#06x} lack {:#06x}", set.difference(flags));
    assert!(!flags.intersects(clear), "flags {flags:#06x} have {:#06x}", flags.intersection(clear));
}

/// Cookies echoed by a batch of replies must be exactly the ones sent.
pub fn assert_each_cookie_once(sent: &[u64], echoed: &[u64]) {
    assert_eq!(echoed.len(), sent.len(), "number of replies");
    let unique: HashSet<u64> = echoed.iter().copied().collect();
    assert_eq!(unique.len(), echoed.len(), "a cookie was echoed twice");
    assert_eq!(unique, sent.iter().copied().collect::<HashSet<u64>>());
}

pub const ALL_WRITE_FLAGS: TransmissionFlags =
    TransmissionFlags::SEND_TRIM.union(TransmissionFlags::SEND_WRITE_ZEROES).union(TransmissionFlags::SEND_FAST_ZERO);

/// A real export server on a loopback TCP port, over a sparse temp file of
/// `SIZE` bytes: for what only `Server::run` does (access control, socket
/// options, counting connections).
pub struct TcpServer {
    pub addr: std::net::SocketAddr,
    pub export: Arc<Export>,
    /// A second descriptor on the backing file, to check what reached it.
    pub file: File,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl TcpServer {
    pub async fn start() -> Self {
        Self::start_with(config()).await
    }

    pub async fn start_with(config: ExportConfig) -> Self {
        let file = backing_file();
        let export = Export::from_file(file.try_clone().expect("dup"), config).expect("export");
        let server = nbd::server::Server::bind(Arc::clone(&export), "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = server.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        Self { addr, export, file, stop: Some(stop), task }
    }

    /// A client past the handshake (simple replies).
    pub async fn connect(&self) -> tokio::net::TcpStream {
        let mut stream = within(tokio::net::TcpStream::connect(self.addr)).await.expect("connect");
        let opts = nbd::client::HandshakeOptions { export_name: NAME.into(), structured_replies: false };
        within(nbd::client::handshake(&mut stream, &opts)).await.expect("handshake");
        stream
    }

    pub fn in_flight(&self) -> u64 {
        self.export.stats().in_flight.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn connections(&self) -> u64 {
        self.export.stats().connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the server as SIGTERM does and waits for `Server::run` to return.
    pub async fn stop(mut self) {
        drop(self.stop.take());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("server stopped in time")
            .expect("server task")
            .expect("server run");
    }
}

/// Polls `cond` every 10 ms until it holds, failing the test after `IO_TIMEOUT`.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// True when the peer has closed `stream` (EOF or reset) without sending a
/// single byte first; false if anything arrives or nothing happens in time.
pub async fn closed_without_reply(stream: &mut tokio::net::TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(tokio::time::timeout(IO_TIMEOUT, stream.read(&mut byte)).await, Ok(Ok(0) | Err(_)))
}

/// Whether this kernel runs TLS on sockets (kTLS: the `tls` module is
/// loaded or loadable), probed on a loopback connection as the server
/// would. The server then hands TLS connections to the kernel; elsewhere
/// (this project's build host has no tls.ko) they stay on rustls.
pub fn kernel_has_tls() -> bool {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let _accepted = listener.accept().unwrap();
    match nbd::ktls::enable(&client) {
        Ok(()) => true,
        Err(nbd::ktls::KtlsError::Unavailable) => false,
        Err(e) => panic!("probing kernel TLS: {e}"),
    }
}

/// The gauge a TLS connection in transmission counts in on this kernel:
/// kernel TLS where it has it, userspace TLS elsewhere.
pub fn tls_gauge() -> fn(&nbd::server::ExportStats) -> &std::sync::atomic::AtomicU64 {
    if kernel_has_tls() { |s| &s.tls_kernel_connections } else { |s| &s.tls_userspace_connections }
}
