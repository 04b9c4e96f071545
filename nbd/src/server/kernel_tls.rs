//! A server connection's TLS handed to the kernel (kTLS) once the NBD
//! handshake is over, so that READ data keeps going out with sendfile(2)
//! and the kernel encrypts it; where that cannot be, the connection stays
//! on rustls in this process, and the reason is counted.
//!
//! The hand-over happens after NBD_OPT_GO's reply has been flushed and
//! before the first request is read, and only when nothing of the session
//! is left in userspace: rustls holds no plaintext, no unsent record and no
//! part of a record (the raw bytes read so far end with a whole record).
//! Unlike the node's side, bytes still unread on the socket are fine: a
//! client sends its first request as soon as it has GO's reply (qemu does,
//! measured here), and those records wait in the socket's queue, which the
//! kernel parses from its first byte, a record boundary, once `TLS_RX` is
//! set. The server sends no session ticket and no KeyUpdate (`tls::config`),
//! and a client's requests are application data; a client's KeyUpdate or
//! alert would fail the kernel socket's read (EIO) and close the
//! connection, which the client re-establishes. The decision is taken before anything is irreversible:
//! the cipher must be one the kernel takes and `TCP_ULP "tls"` must
//! succeed (a kernel without `tls.ko` refuses it, and the socket is plain
//! TCP still); only then are the secrets extracted and both directions
//! installed with rustls' exact sequence numbers. A failure after that
//! point closes the connection: the session is gone from userspace.
//!
//! The kernel then makes the records: `KernelTlsWriter` and
//! `KernelTlsReader` keep the connection's record limit
//! (`tls::kernel_records`).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_rustls::server::TlsStream;

use super::sink::ReplySink;
use crate::ktls::{self, Direction, KtlsError, kernel_supports};
use crate::tls::kernel_records::{ReceiveCheck, SendBound};
use crate::tls::records::{RecordCounting, RecordLimit};

/// Why a TLS connection stays on userspace TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The kernel has no TLS (`TCP_ULP "tls"` refused with ENOENT: no
    /// `tls.ko`).
    NoKernelTls,
    /// The kernel refused `TCP_ULP "tls"` otherwise.
    KernelRefused,
    /// The negotiated cipher suite is not one kTLS takes.
    Cipher,
    /// Data of the session was still in userspace (rustls held plaintext,
    /// a record not sent, or part of one received).
    NotAtRest,
    /// The connection is not a TCP socket (served in-process).
    NotTcp,
}

impl Fallback {
    pub const ALL: [Fallback; 5] =
        [Self::NoKernelTls, Self::KernelRefused, Self::Cipher, Self::NotAtRest, Self::NotTcp];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::NoKernelTls => "no_kernel_tls",
            Self::KernelRefused => "kernel_refused",
            Self::Cipher => "cipher",
            Self::NotAtRest => "not_at_rest",
            Self::NotTcp => "not_tcp",
        }
    }

    /// This fallback's index in [`Fallback::ALL`].
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|f| *f == self).unwrap_or(0)
    }
}

/// A stream the session runs over, which may be a TCP socket the kernel
/// can take the session on.
pub(super) trait TcpBacked: Sized {
    fn tcp(&self) -> Option<&TcpStream>;
    fn into_tcp(self) -> Option<TcpStream>;
}

impl TcpBacked for TcpStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }

    fn into_tcp(self) -> Option<TcpStream> {
        Some(self)
    }
}

impl<T: ?Sized> TcpBacked for Pin<Box<T>> {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }

    fn into_tcp(self) -> Option<TcpStream> {
        None
    }
}

/// What a connection's transmission runs over after the hand-over.
pub(super) enum Handover<S> {
    Kernel {
        reader: KernelTlsReader,
        writer: KernelTlsWriter,
    },
    /// Boxed: a rustls session is large, and it is the rarer outcome where
    /// the kernel has TLS.
    Userspace(Box<TlsStream<RecordCounting<S>>>, Fallback),
}

/// Whether the session on `stream` may go to the kernel, checked before
/// anything irreversible; `ulp` turns kernel TLS on for the socket (it is
/// [`ktls::enable`] outside tests).
fn decide<S: TcpBacked>(
    stream: &mut TlsStream<RecordCounting<S>>,
    ulp: impl FnOnce(&TcpStream) -> Result<(), KtlsError>,
) -> Result<(), Fallback> {
    let (counting, session) = stream.get_mut();
    let Some(tcp) = counting.get_ref().tcp() else { return Err(Fallback::NotTcp) };
    let suite = session.negotiated_cipher_suite().map(|s| s.suite());
    if !suite.is_some_and(kernel_supports) {
        return Err(Fallback::Cipher);
    }
    let state = session.process_new_packets().map_err(|_| Fallback::NotAtRest)?;
    let held = state.plaintext_bytes_to_read() > 0 || state.tls_bytes_to_write() > 0;
    if held || !counting.received_whole_records() {
        return Err(Fallback::NotAtRest);
    }
    match ulp(tcp) {
        Ok(()) => Ok(()),
        Err(KtlsError::Unavailable) => Err(Fallback::NoKernelTls),
        Err(_) => Err(Fallback::KernelRefused),
    }
}

/// Hands the session on `stream` to the kernel if it can go (see the module
/// doc); an error only past the point of no return.
pub(super) fn hand_over<S: TcpBacked>(
    mut stream: TlsStream<RecordCounting<S>>,
    limit: &RecordLimit,
) -> Result<Handover<S>, KtlsError> {
    if let Err(fallback) = decide(&mut stream, ktls::enable) {
        return Ok(Handover::Userspace(Box::new(stream), fallback));
    }
    let (counting, session) = stream.into_inner();
    let secrets = session.dangerous_extract_secrets()?;
    let tcp = counting.into_inner().into_tcp().ok_or(KtlsError::NotAtRest("the stream is no TCP socket"))?;
    let cipher = ktls::install(&tcp, &secrets)?;
    let (read, write) = tcp.into_split();
    let reader = KernelTlsReader { half: read, cipher, check: ReceiveCheck::new(limit.clone(), secrets.rx.0) };
    let writer =
        KernelTlsWriter { half: write, cipher, bound: SendBound::new(limit.clone(), secrets.tx.0), logged: false };
    Ok(Handover::Kernel { reader, writer })
}

/// The read side of a kernel TLS socket: plaintext, whose records are
/// counted by the kernel and read back every so often.
#[derive(Debug)]
pub(super) struct KernelTlsReader {
    half: OwnedReadHalf,
    cipher: u16,
    check: ReceiveCheck,
}

impl AsyncRead for KernelTlsReader {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.half).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && this.check.read(buf.filled().len() - before)
        {
            let records =
                ktls::record_sequence(this.half.as_ref(), Direction::Receive, this.cipher).map_err(io::Error::other)?;
            this.check.checked(records);
        }
        polled
    }
}

/// The write side of a kernel TLS socket: READ data still goes out with
/// sendfile(2); every send call is bounded by the record limit.
#[derive(Debug)]
pub(super) struct KernelTlsWriter {
    half: OwnedWriteHalf,
    cipher: u16,
    bound: SendBound,
    /// The records sent were logged (once, at shutdown).
    logged: bool,
}

impl KernelTlsWriter {
    /// The kernel's own count of records sent, beside the bound kept here.
    fn records(&self) -> (io::Result<u64>, u64) {
        let exact = ktls::record_sequence(self.half.as_ref(), Direction::Transmit, self.cipher);
        (exact.map_err(io::Error::other), self.bound.records())
    }
}

impl AsyncWrite for KernelTlsWriter {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let n = match this.bound.admit(buf.len()) {
            Ok(n) => n,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let polled = Pin::new(&mut this.half).poll_write(cx, &buf[..n]);
        if let Poll::Ready(Ok(written)) = polled {
            this.bound.sent(written);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        match this.bound.admit(total) {
            Ok(n) if n == total => {}
            // Near the limit: one slice at a time, cut as it must be.
            Ok(_) => {
                let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
                return Pin::new(this).poll_write(cx, first);
            }
            Err(e) => return Poll::Ready(Err(e)),
        }
        let polled = Pin::new(&mut this.half).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(written)) = polled {
            this.bound.sent(written);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.half.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.half).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.logged {
            self.logged = true;
            let (exact, bound) = self.records();
            // The figures in the message itself: the VM suite reads them.
            match exact {
                Ok(exact) => tracing::info!("kernel TLS connection closing: records sent {exact} (bound {bound})"),
                Err(e) => {
                    tracing::warn!(error = %e, "kernel TLS connection closing: records sent unknown (bound {bound})")
                }
            }
        }
        Pin::new(&mut self.half).poll_shutdown(cx)
    }
}

impl ReplySink for KernelTlsWriter {
    fn socket(&self) -> Option<&TcpStream> {
        Some(self.half.as_ref())
    }

    fn admit(&mut self, len: usize) -> io::Result<usize> {
        self.bound.admit(len)
    }

    fn sent(&mut self, bytes: usize) {
        self.bound.sent(bytes);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use nix::errno::Errno;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::tls::{ClientTls, ServerTls};

    fn pki() -> (ServerTls, ClientTls) {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap().der().clone();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf = |name: &str| -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
            (vec![cert.der().clone()], PrivateKeyDer::try_from(key.serialize_der()).unwrap())
        };
        let (chain, key) = leaf("127.0.0.1");
        let server = ServerTls::new(chain, key, vec![ca_cert.clone()]).unwrap();
        let (chain, key) = leaf("node-1");
        let client = ClientTls::new(vec![ca_cert], chain, key, "127.0.0.1").unwrap();
        (server, client)
    }

    /// A finished TLS session over loopback TCP, the server's end counted
    /// as the server counts it; and the client's end.
    async fn session() -> (TlsStream<RecordCounting<TcpStream>>, tokio_rustls::client::TlsStream<TcpStream>) {
        let (server, client) = pki();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connecting = TcpStream::connect(listener.local_addr().unwrap());
        let (connected, accepted) = tokio::join!(connecting, listener.accept());
        let counting = RecordCounting::new(accepted.unwrap().0, RecordLimit::new(1 << 20));
        let acceptor = tokio_rustls::TlsAcceptor::from(server.config());
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(client.config()));
        let (server, client) = tokio::join!(
            acceptor.accept(counting),
            connector.connect(client.server_name().clone(), connected.unwrap())
        );
        (server.unwrap(), client.unwrap())
    }

    #[test]
    fn the_kernel_takes_the_tls_1_3_ciphers_rustls_offers() {
        for suite in rustls::crypto::ring::DEFAULT_CIPHER_SUITES {
            let tls13 = suite.tls13().is_some();
            assert_eq!(kernel_supports(suite.suite()), tls13, "{:?}", suite.suite());
        }
        assert!(!kernel_supports(rustls::CipherSuite::TLS13_AES_128_CCM_SHA256));
    }

    /// The decision, on a real session over loopback: the kernel's answer
    /// to `TCP_ULP` decides once the session is at rest; a session still
    /// holding data in rustls stays there whatever the kernel says; a
    /// stream that is no socket stays too. Records waiting on the socket
    /// do not hold the hand-over back.
    #[tokio::test]
    async fn the_session_goes_to_the_kernel_only_at_rest_and_when_the_kernel_takes_it() {
        let (mut server, mut client) = session().await;
        assert_eq!(decide(&mut server, |_| Ok(())), Ok(()));
        assert_eq!(decide(&mut server, |_| Err(KtlsError::Unavailable)), Err(Fallback::NoKernelTls));
        let refused = |_: &TcpStream| Err(KtlsError::Sockopt { what: "TCP_ULP", errno: Errno::EEXIST });
        assert_eq!(decide(&mut server, refused), Err(Fallback::KernelRefused));

        // A request sent right after GO's reply waits on the socket: fine.
        client.write_all(b"first request").await.unwrap();
        client.flush().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(decide(&mut server, |_| Ok(())), Ok(()));
        // Once rustls has read it and holds plaintext, it must stay.
        let mut first = [0u8; 5];
        server.read_exact(&mut first).await.unwrap();
        let mut asked = false;
        assert_eq!(
            decide(&mut server, |_| {
                asked = true;
                Ok(())
            }),
            Err(Fallback::NotAtRest)
        );
        assert!(!asked, "nothing irreversible is tried on a session not at rest");
        let mut rest = [0u8; 8];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(decide(&mut server, |_| Ok(())), Ok(()), "all read: at rest again");
        // A reply written and not flushed is held by rustls.
        std::io::Write::write_all(&mut server.get_mut().1.writer(), b"reply").unwrap();
        assert_eq!(decide(&mut server, |_| Ok(())), Err(Fallback::NotAtRest));
    }

    #[tokio::test]
    async fn a_stream_that_is_no_socket_stays_in_userspace() {
        let (server, client) = pki();
        let (near, far) = tokio::io::duplex(1 << 16);
        let counting = RecordCounting::new(Box::pin(near), RecordLimit::new(1 << 20));
        let acceptor = tokio_rustls::TlsAcceptor::from(server.config());
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(client.config()));
        let (server, client) =
            tokio::join!(acceptor.accept(counting), connector.connect(client.server_name().clone(), far));
        let (mut server, _client) = (server.unwrap(), client.unwrap());
        assert_eq!(decide(&mut server, |_| Ok(())), Err(Fallback::NotTcp));
        let limit = RecordLimit::new(1 << 20);
        assert!(matches!(hand_over(server, &limit), Ok(Handover::Userspace(_, Fallback::NotTcp))));
    }

    #[test]
    fn fallback_labels_and_indexes() {
        let labels = Fallback::ALL.map(Fallback::label);
        assert_eq!(labels, ["no_kernel_tls", "kernel_refused", "cipher", "not_at_rest", "not_tcp"]);
        assert!(Fallback::ALL.iter().enumerate().all(|(i, f)| f.index() == i));
    }
}
