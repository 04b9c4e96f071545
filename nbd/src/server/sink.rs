//! Where a connection's replies go. A TCP socket takes large READ data
//! straight from the page cache with sendfile(2): no copy into our memory and
//! none out of it. Any other writer (an in-memory duplex in tests, a TLS
//! stream) gets the data read and written as usual.

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
}

impl ReplySink for OwnedWriteHalf {
    fn socket(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> ReplySink for tokio::io::WriteHalf<S> {}

/// Sends `len` bytes of `file` at `offset` on `socket`, waiting for room in
/// the socket buffer as a write would. The file ending early (it shrank
/// after the request was checked) is an error: the reply header promised
/// the length, so only closing the connection is left.
pub async fn send_file(socket: &TcpStream, file: &File, offset: u64, len: usize) -> io::Result<()> {
    let mut offset = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut left = len;
    while left > 0 {
        socket.writable().await?;
        let sent = socket.try_io(Interest::WRITABLE, || {
            nix::sys::sendfile::sendfile64(socket, file, Some(&mut offset), left).map_err(io::Error::from)
        });
        match sent {
            Ok(0) => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the export file ended before the reply"));
            }
            Ok(n) => left -= n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
