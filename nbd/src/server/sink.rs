//! Where a connection's replies go. A TCP socket takes large READ data
//! straight from the page cache with sendfile(2): no copy into our memory and
//! none out of it; so does a kernel TLS socket, whose kernel encrypts it
//! (`kernel_tls`), each call bounded by the connection's record limit. Any
//! other writer (an in-memory duplex in tests, a rustls stream) gets the
//! data read and written as usual.

use std::fs::File;
use std::io;

use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;

pub trait ReplySink: AsyncWrite + Unpin + Send + 'static {
    /// The TCP socket under this writer, if READ data may be sent to it
    /// with sendfile(2).
    fn socket(&self) -> Option<&TcpStream> {
        None
    }

    /// How many of `len` bytes the next sendfile(2) call may carry (all,
    /// unless a record limit is near); an error when none may go.
    fn admit(&mut self, len: usize) -> io::Result<usize> {
        Ok(len)
    }

    /// A sendfile(2) call sent `bytes`.
    fn sent(&mut self, bytes: usize) {
        let _ = bytes;
    }
}

impl ReplySink for OwnedWriteHalf {
    fn socket(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> ReplySink for tokio::io::WriteHalf<S> {}

/// Sends `len` bytes of `file` at `offset` on the socket under `sink`,
/// waiting for room in the socket buffer as a write would. The file ending
/// early (it shrank after the request was checked) is an error: the reply
/// header promised the length, so only closing the connection is left. So
/// is a sink without a socket.
pub async fn send_file<W: ReplySink>(sink: &mut W, file: &File, offset: u64, len: usize) -> io::Result<()> {
    let mut offset = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut left = len;
    while left > 0 {
        let most = sink.admit(left)?;
        let socket = sink.socket().ok_or_else(|| io::Error::other("sendfile without a socket"))?;
        socket.writable().await?;
        let sent = socket.try_io(Interest::WRITABLE, || {
            nix::sys::sendfile::sendfile64(socket, file, Some(&mut offset), most).map_err(io::Error::from)
        });
        match sent {
            Ok(0) => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the export file ended before the reply"));
            }
            Ok(n) => {
                left -= n;
                sink.sent(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
