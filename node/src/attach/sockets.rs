//! Opening the connections to an export: handshake in userspace, then as
//! many sockets as the connection-count rule allows, ready for the kernel.

use std::net::TcpStream;
use std::time::Duration;

use nbd::client::{Export, HandshakeOptions, handshake};
use nix::sys::socket::{setsockopt, sockopt};

use crate::connections::connection_count;
use crate::error::{Context, Error, ErrorKind, Result};
use crate::uri::NbdUri;

/// Connect + handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

async fn open_one(uri: &NbdUri) -> Result<(Export, TcpStream)> {
    let work = async {
        let mut stream = tokio::net::TcpStream::connect(uri.authority())
            .await
            .ctx(ErrorKind::Unavailable, || format!("connecting to {uri}"))?;
        // The kernel speaks simple replies only: no structured replies.
        let opts = HandshakeOptions { export_name: uri.export.clone(), structured_replies: false };
        let export =
            handshake(&mut stream, &opts).await.ctx(ErrorKind::Unavailable, || format!("handshake with {uri}"))?;
        let stream = stream.into_std().ctx(ErrorKind::Io, || "detaching the socket from tokio")?;
        Ok::<_, Error>((export, stream))
    };
    let (export, stream) = tokio::time::timeout(HANDSHAKE_TIMEOUT, work)
        .await
        .map_err(|_| Error::new(ErrorKind::Unavailable, format!("handshake with {uri} timed out")))??;
    stream.set_nonblocking(false).ctx(ErrorKind::Io, || "making the socket blocking")?;
    stream.set_nodelay(true).ctx(ErrorKind::Io, || "TCP_NODELAY")?;
    // Keepalive finds a peer that vanished without a FIN or RST.
    let _ = setsockopt(&stream, sockopt::KeepAlive, &true);
    let _ = setsockopt(&stream, sockopt::TcpKeepIdle, &10);
    let _ = setsockopt(&stream, sockopt::TcpKeepInterval, &5);
    let _ = setsockopt(&stream, sockopt::TcpKeepCount, &3);
    Ok((export, stream))
}

/// The export as the first connection saw it, and the sockets: `wanted`
/// of them only if the server set CAN_MULTI_CONN (bit 8), else exactly one.
pub async fn open(uri: &NbdUri, wanted: usize) -> Result<(Export, Vec<TcpStream>)> {
    let (export, first) = open_one(uri).await?;
    let count = connection_count(export.transmission_flags, wanted);
    let mut sockets = vec![first];
    let rest = futures_join((1..count).map(|_| {
        let uri = uri.clone();
        async move { open_one(&uri).await }
    }))
    .await;
    for result in rest {
        let (other, sock) = result?;
        if other.size != export.size || other.transmission_flags != export.transmission_flags {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!("{uri}: connections disagree on the export (size or flags changed)"),
            ));
        }
        sockets.push(sock);
    }
    Ok((export, sockets))
}

/// Runs the futures concurrently and collects their results in order.
async fn futures_join<F, T>(futs: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("connection task panicked"));
    }
    out
}

/// The block size handed to the kernel: the server's preferred size within
/// what the kernel accepts (a power of two in 512..=4096), no smaller than
/// the server's minimum, and dividing the export size when possible.
pub fn block_size(export: &Export) -> Result<u64> {
    let (min, preferred) = export.block_size.map_or((1, 4096), |(min, pref, _)| (min, pref));
    if min > 4096 {
        return Err(Error::new(ErrorKind::InvalidArgument, format!("server minimum block size {min} exceeds 4096")));
    }
    let floor = u64::from(min).max(512).next_power_of_two();
    let mut bs = u64::from(preferred).clamp(floor, 4096).next_power_of_two().min(4096);
    while bs > floor && !export.size.is_multiple_of(bs) {
        bs /= 2;
    }
    Ok(bs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(size: u64, block_size: Option<(u32, u32, u32)>) -> Export {
        Export { size, transmission_flags: nbd::TransmissionFlags::HAS_FLAGS, block_size, structured_replies: false }
    }

    #[test]
    fn block_size_prefers_the_servers_choice_within_kernel_limits() {
        assert_eq!(block_size(&export(64 << 20, Some((1, 4096, 1 << 25)))).unwrap(), 4096);
        assert_eq!(block_size(&export(64 << 20, None)).unwrap(), 4096);
        assert_eq!(block_size(&export(64 << 20, Some((1, 65536, 1 << 25)))).unwrap(), 4096);
        assert_eq!(block_size(&export(64 << 20, Some((512, 512, 1 << 25)))).unwrap(), 512);
        assert_eq!(block_size(&export(1536, Some((1, 4096, 1 << 25)))).unwrap(), 512);
        assert_eq!(block_size(&export(4096 + 1024, Some((1024, 4096, 1 << 25)))).unwrap(), 1024);
        assert!(block_size(&export(1 << 20, Some((8192, 8192, 1 << 25)))).is_err());
    }
}
