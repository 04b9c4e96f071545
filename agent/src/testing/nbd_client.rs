//! A minimal NBD client for tests: handshake (in plaintext, or through
//! NBD_OPT_STARTTLS with a node's certificate), then simple-reply
//! READ/WRITE.

use nbd::client::{HandshakeOptions, handshake, handshake_tls};
use nbd::consts::cmd;
use nbd::tls::ClientTls;
use nbd::wire::{Request, SimpleReply};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug)]
pub struct Client<S = TcpStream> {
    stream: S,
    pub size: u64,
    pub transmission_flags: nbd::TransmissionFlags,
    cookie: u64,
}

impl Client {
    /// STARTTLS first, the TLS handshake with `tls`'s certificate, then the
    /// export over TLS (never plaintext).
    pub async fn connect_tls(
        addr: &str,
        export_name: &str,
        tls: &ClientTls,
    ) -> nbd::Result<Client<impl AsyncRead + AsyncWrite + Unpin + use<>>> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let opts = HandshakeOptions { export_name: export_name.into(), structured_replies: false };
        let (stream, export) = handshake_tls(stream, &opts, tls).await?;
        Ok(Client { stream, size: export.size, transmission_flags: export.transmission_flags, cookie: 0 })
    }

    pub async fn connect(addr: &str, export_name: &str) -> nbd::Result<Self> {
        let mut stream = TcpStream::connect(addr).await?;
        // A request's header and payload go out in two writes: without
        // this, Nagle holds the payload for the server's delayed ACK.
        stream.set_nodelay(true)?;
        let opts = HandshakeOptions { export_name: export_name.into(), structured_replies: false };
        let export = handshake(&mut stream, &opts).await?;
        Ok(Self { stream, size: export.size, transmission_flags: export.transmission_flags, cookie: 0 })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    async fn request(&mut self, command: u16, offset: u64, length: u32, payload: &[u8]) -> std::io::Result<u32> {
        self.cookie += 1;
        let request = Request { flags: nbd::CommandFlags::empty(), command, cookie: self.cookie, offset, length };
        self.stream.write_all(&request.encode()).await?;
        self.stream.write_all(payload).await?;
        let mut reply = [0u8; SimpleReply::SIZE];
        self.stream.read_exact(&mut reply).await?;
        let reply = SimpleReply::decode(&reply).map_err(std::io::Error::other)?;
        assert_eq!(reply.cookie, self.cookie);
        Ok(reply.error)
    }

    /// Sends a WRITE header for `length` bytes and only the first part of
    /// its payload; the rest is for [`Client::send_raw`].
    pub async fn start_write(&mut self, offset: u64, length: u32, first_part: &[u8]) -> std::io::Result<()> {
        self.cookie += 1;
        let request =
            Request { flags: nbd::CommandFlags::empty(), command: cmd::WRITE, cookie: self.cookie, offset, length };
        self.stream.write_all(&request.encode()).await?;
        self.stream.write_all(first_part).await
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    pub async fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<u32> {
        self.request(cmd::WRITE, offset, data.len() as u32, data).await
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        let error = self.request(cmd::READ, offset, len, &[]).await?;
        assert_eq!(error, 0, "read failed");
        let mut buf = vec![0u8; len as usize];
        self.stream.read_exact(&mut buf).await?;
        Ok(buf)
    }

    pub async fn flush(&mut self) -> std::io::Result<u32> {
        self.request(cmd::FLUSH, 0, 0, &[]).await
    }

    /// True when the server has closed the connection.
    pub async fn is_closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(std::time::Duration::from_secs(5), self.stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }
}
