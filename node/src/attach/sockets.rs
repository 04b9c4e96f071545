//! Opening the connections to an export: handshake in userspace, then as
//! many sockets as the connection-count rule allows, ready for the kernel.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use nbd::client::{Export, HandshakeOptions, handshake};
use nix::sys::socket::{setsockopt, sockopt};

use crate::connections::connection_count;
use crate::error::{Context, Error, ErrorKind, Result};
use crate::uri::NbdUri;

/// Connect + handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Connects to the export's address, from `source` when given. The server
/// admits connections by the node's address (its Node InternalIP); the
/// kernel would otherwise pick the source by route, and a route to a pod
/// network usually goes out a bridge or tunnel whose own address the server
/// does not know (a bridge CNI's gateway, Calico's tunl0, Cilium's
/// cilium_host): every handshake would then be refused.
pub async fn connect(uri: &NbdUri, source: Option<IpAddr>) -> Result<tokio::net::TcpStream> {
    let connecting = || format!("connecting to {uri}");
    let Some(source) = source else {
        return tokio::net::TcpStream::connect(uri.authority()).await.ctx(ErrorKind::Unavailable, connecting);
    };
    let addresses = tokio::net::lookup_host(uri.authority()).await.ctx(ErrorKind::Unavailable, connecting)?;
    let Some(target) = addresses.into_iter().find(|a| a.is_ipv4() == source.is_ipv4()) else {
        return Err(Error::new(ErrorKind::Unavailable, format!("{uri} has no address of the family of {source}")));
    };
    let socket = if source.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
        .ctx(ErrorKind::Io, || "creating a socket")?;
    socket.bind(SocketAddr::new(source, 0)).ctx(ErrorKind::Unavailable, || format!("binding to {source}"))?;
    socket.connect(target).await.ctx(ErrorKind::Unavailable, connecting)
}

async fn open_one(uri: &NbdUri, source: Option<IpAddr>) -> Result<(Export, TcpStream)> {
    let work = async {
        let mut stream = connect(uri, source).await?;
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
/// of them only if the server set CAN_MULTI_CONN (bit 8), else exactly one;
/// each from `source` when given.
pub async fn open(uri: &NbdUri, wanted: usize, source: Option<IpAddr>) -> Result<(Export, Vec<TcpStream>)> {
    let (export, first) = open_one(uri, source).await?;
    let count = connection_count(export.transmission_flags, wanted);
    let mut sockets = vec![first];
    let rest = futures_join((1..count).map(|_| {
        let uri = uri.clone();
        async move { open_one(&uri, source).await }
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
    use std::collections::BTreeSet;

    use nbd::server::{Allowed, ExportConfig, Server};

    use super::*;

    /// Our server on 127.0.0.1 admitting only 127.0.0.2, as the controller
    /// admits only a Node's InternalIP.
    async fn server_admitting_only_127_0_0_2(file: &std::path::Path) -> NbdUri {
        let export = nbd::server::Export::open(file, ExportConfig::new("vol")).unwrap();
        let _fence = export.access().set_allowed(Allowed::Only(BTreeSet::from(["127.0.0.2".parse().unwrap()])));
        let server = Server::bind(export, "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let uri = NbdUri::new(server.local_addr().unwrap(), "vol");
        tokio::spawn(server.run(std::future::pending()));
        uri
    }

    #[tokio::test]
    async fn connections_come_from_the_source_address_the_server_admits() {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let uri = server_admitting_only_127_0_0_2(file.path()).await;
        // By route, the source is 127.0.0.1: refused during the handshake.
        let refused = open(&uri, 1, None).await.expect_err("a peer outside the allowlist must be refused");
        assert!(refused.to_string().contains("handshake"), "{refused}");
        // From the admitted address, every connection gets through.
        let (export, sockets) = open(&uri, 1, Some("127.0.0.2".parse().unwrap())).await.unwrap();
        assert_eq!(export.size, 1 << 20);
        for socket in &sockets {
            assert_eq!(socket.local_addr().unwrap().ip(), "127.0.0.2".parse::<IpAddr>().unwrap());
        }
        // A source of the other family than the server's address is a clear error.
        let wrong = open(&uri, 1, Some("::1".parse().unwrap())).await.expect_err("no IPv6 address to reach");
        assert!(wrong.to_string().contains("no address of the family"), "{wrong}");
    }

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
