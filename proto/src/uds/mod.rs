//! Serving gRPC on a Unix socket so that every gRPC client can call it.
//!
//! Go clients name a Unix-socket peer `localhost`; gRPC C-core and Java
//! clients send the socket path as `:authority`, which our HTTP/2 server
//! rejects (see [`AuthorityRewriter`]). Operators poke CSI sockets with whatever
//! client they have (grpcurl, Python, csc), so both binaries accept their
//! connections through [`incoming`], which fixes the authority on the way in.

mod rewrite;

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::Connected;

pub use rewrite::{AuthorityRewriter, LOCAL_AUTHORITY, RewriteError};

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 16 << 10;

/// Accepted connections of `listener`, each wrapped in [`LocalAuthority`],
/// for `tonic::transport::Server::serve_with_incoming*`.
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<LocalAuthority<UnixStream>>> {
    tokio_stream::wrappers::UnixListenerStream::new(listener).map(|accepted| accepted.map(LocalAuthority::new))
}

/// Binds `path` for a gRPC server: creates its directory and replaces a
/// stale socket left by an earlier process, but nothing that is not a socket.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} is not a socket", path.display())));
        }
        Err(_) => {}
    }
    UnixListener::bind(path)
}

/// A server-side connection whose incoming HTTP/2 requests carry an
/// `:authority` the server accepts. Writes go through unchanged.
#[derive(Debug)]
pub struct LocalAuthority<S> {
    inner: S,
    rewriter: AuthorityRewriter,
    /// Rewritten bytes not yet handed to the reader, from `read_at`.
    ready: Vec<u8>,
    read_at: usize,
    eof: bool,
}

impl<S> LocalAuthority<S> {
    pub fn new(inner: S) -> Self {
        Self { inner, rewriter: AuthorityRewriter::default(), ready: Vec::new(), read_at: 0, eof: false }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for LocalAuthority<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.read_at < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.read_at);
                buf.put_slice(&this.ready[this.read_at..this.read_at + n]);
                this.read_at += n;
                if this.read_at == this.ready.len() {
                    this.ready.clear();
                    this.read_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut chunk = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk))?;
            if chunk.filled().is_empty() {
                this.eof = true;
                this.rewriter.finish(&mut this.ready);
            } else {
                this.rewriter
                    .feed(chunk.filled(), &mut this.ready)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for LocalAuthority<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for LocalAuthority<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
