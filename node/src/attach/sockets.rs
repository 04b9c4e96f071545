//! Opening the connections to an export: handshake in userspace, then as
//! many sockets as the connection-count rule allows, ready for the kernel.
//!
//! An `nbds://` export (TLS required) gets, on every connection, the whole
//! handshake in userspace over TLS (NBD_OPT_STARTTLS, rustls with the
//! node's certificate from [`TlsDir`], NBD_OPT_GO), then its session handed
//! to the kernel (`nbd::ktls`: TCP_ULP "tls", TLS_TX/TLS_RX with the exact
//! sequence numbers), so the socket the NBD driver gets encrypts by itself.
//! Nothing falls back to plaintext: without `--tls-dir` such an export is
//! refused before any connection, and a kernel without the `tls` module
//! fails the attach ([`ErrorKind::Unsupported`], naming `tls.ko`).

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use nbd::client::{Export, HandshakeOptions, handshake, handshake_tls};
use nix::sys::socket::{setsockopt, sockopt};

use super::tls::TlsDir;
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

/// The TLS configuration for `uri`: none for a plaintext export; for an
/// `nbds://` one, the node's certificates (a clear error without them).
fn client_tls(uri: &NbdUri, tls: Option<&TlsDir>) -> Result<Option<nbd::tls::ClientTls>> {
    if !uri.tls {
        return Ok(None);
    }
    let Some(dir) = tls else {
        // The volume is fine; this node lacks what it needs: a precondition.
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("{uri} requires TLS, and the node plugin has no certificates: start it with --tls-dir"),
        ));
    };
    dir.client(&uri.host).map(Some)
}

async fn open_one(
    uri: &NbdUri,
    source: Option<IpAddr>,
    tls: Option<&nbd::tls::ClientTls>,
) -> Result<(Export, TcpStream)> {
    let work = async {
        let mut stream = connect(uri, source).await?;
        // The kernel speaks simple replies only: no structured replies.
        let opts = HandshakeOptions { export_name: uri.export.clone(), structured_replies: false };
        let (export, stream) = match tls {
            None => {
                let export = handshake(&mut stream, &opts)
                    .await
                    .ctx(ErrorKind::Unavailable, || format!("handshake with {uri}"))?;
                (export, stream)
            }
            Some(tls) => {
                let (session, export) = handshake_tls(stream, &opts, tls)
                    .await
                    .ctx(ErrorKind::Unavailable, || format!("TLS handshake with {uri}"))?;
                let stream = nbd::ktls::into_kernel(session)?;
                tracing::info!(%uri, "TLS handshake done; session handed to the kernel (kTLS)");
                (export, stream)
            }
        };
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
/// each from `source` when given, each its own TLS session when the export
/// requires TLS (certificates from `tls`).
pub async fn open(
    uri: &NbdUri,
    wanted: usize,
    source: Option<IpAddr>,
    tls: Option<&TlsDir>,
) -> Result<(Export, Vec<TcpStream>)> {
    let tls = client_tls(uri, tls)?;
    let (export, first) = open_one(uri, source, tls.as_ref()).await?;
    let count = connection_count(export.transmission_flags, wanted);
    let mut sockets = vec![first];
    let rest = futures_join((1..count).map(|_| {
        let (uri, tls) = (uri.clone(), tls.clone());
        async move { open_one(&uri, source, tls.as_ref()).await }
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
        let refused = open(&uri, 1, None, None).await.expect_err("a peer outside the allowlist must be refused");
        assert!(refused.to_string().contains("handshake"), "{refused}");
        // From the admitted address, every connection gets through.
        let (export, sockets) = open(&uri, 1, Some("127.0.0.2".parse().unwrap()), None).await.unwrap();
        assert_eq!(export.size, 1 << 20);
        for socket in &sockets {
            assert_eq!(socket.local_addr().unwrap().ip(), "127.0.0.2".parse::<IpAddr>().unwrap());
        }
        // A source of the other family than the server's address is a clear error.
        let wrong = open(&uri, 1, Some("::1".parse().unwrap()), None).await.expect_err("no IPv6 address to reach");
        assert!(wrong.to_string().contains("no address of the family"), "{wrong}");
    }

    /// A CA, a server certificate for 127.0.0.1 and a node certificate, the
    /// node's written as `--tls-dir` holds them; the server's TLS side.
    fn pki(dir: &std::path::Path) -> nbd::tls::ServerTls {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join(super::super::tls::CA_FILE), ca_cert.pem()).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
            (cert, key)
        };
        let (node, node_key) = leaf("node-1");
        std::fs::write(dir.join(super::super::tls::CERT_FILE), node.pem()).unwrap();
        std::fs::write(dir.join(super::super::tls::KEY_FILE), node_key.serialize_pem()).unwrap();
        let (server, server_key) = leaf("127.0.0.1");
        let server_dir = dir.join("server");
        std::fs::create_dir(&server_dir).unwrap();
        std::fs::write(server_dir.join("tls.crt"), server.pem()).unwrap();
        std::fs::write(server_dir.join("tls.key"), server_key.serialize_pem()).unwrap();
        let ca = dir.join(super::super::tls::CA_FILE);
        nbd::tls::ServerTls::from_pem_files(&server_dir.join("tls.crt"), &server_dir.join("tls.key"), &ca).unwrap()
    }

    /// Our server on 127.0.0.1 with an export that requires TLS.
    async fn server_requiring_tls(file: &std::path::Path, tls: nbd::tls::ServerTls) -> NbdUri {
        let config = ExportConfig { tls: nbd::tls::TlsMode::Required(tls), ..ExportConfig::new("vol") };
        let export = nbd::server::Export::open(file, config).unwrap();
        let server = Server::bind(export, "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let uri = NbdUri::new(server.local_addr().unwrap(), "vol").with_tls(true);
        tokio::spawn(server.run(std::future::pending()));
        uri
    }

    /// An nbds:// export: every connection runs STARTTLS, the TLS handshake
    /// and GO in userspace, then its session goes to the kernel. Where the
    /// kernel has kTLS, a request written in plaintext on the handed socket
    /// is encrypted by the kernel and answered with the file's bytes; where
    /// it has not (no tls.ko), the attach fails as a precondition naming the
    /// module, after the whole handshake (never falling back to plaintext).
    #[tokio::test]
    async fn an_nbds_export_is_handshaken_over_tls_and_handed_to_kernel_tls() {
        let dir = tempfile::tempdir().unwrap();
        let tls = pki(dir.path());
        let file = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..1u32 << 16).map(|i| (i * 7 + i / 251) as u8).collect();
        std::fs::write(file.path(), &data).unwrap();
        let uri = server_requiring_tls(file.path(), tls).await;
        let tls_dir = TlsDir::new(dir.path());

        // Without certificates: a clear error, before any connection.
        let refused = open(&uri, 2, None, None).await.expect_err("no certificates");
        assert_eq!(refused.kind, ErrorKind::Unsupported, "{}", refused.chain());
        assert!(refused.chain().contains("--tls-dir"), "{}", refused.chain());
        // In plaintext, the required export refuses (ERR_TLS_REQD).
        let plain = NbdUri { tls: false, ..uri.clone() };
        let refused = open(&plain, 1, None, Some(&tls_dir)).await.expect_err("plaintext to a required export");
        assert_eq!(refused.kind, ErrorKind::Unavailable, "{}", refused.chain());

        match open(&uri, 2, None, Some(&tls_dir)).await {
            Ok((export, sockets)) => {
                assert_eq!((export.size, sockets.len()), (data.len() as u64, 2));
                for (n, mut socket) in sockets.into_iter().enumerate() {
                    use std::io::{Read, Write};
                    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let offset = 4096 * (n as u64 + 1);
                    // NBD_CMD_READ of 4096 bytes: magic, flags, type, handle, offset, length.
                    let mut request = Vec::new();
                    request.extend_from_slice(&0x2560_9513u32.to_be_bytes());
                    request.extend_from_slice(&0u16.to_be_bytes());
                    request.extend_from_slice(&0u16.to_be_bytes());
                    request.extend_from_slice(&(n as u64 + 1).to_be_bytes());
                    request.extend_from_slice(&offset.to_be_bytes());
                    request.extend_from_slice(&4096u32.to_be_bytes());
                    socket.write_all(&request).unwrap();
                    let mut reply = [0u8; 16 + 4096];
                    socket.read_exact(&mut reply).unwrap();
                    assert_eq!(reply[..4], 0x6744_6698u32.to_be_bytes(), "simple reply magic");
                    assert_eq!(reply[4..8], [0; 4], "no error");
                    assert_eq!(reply[8..16], (n as u64 + 1).to_be_bytes(), "handle");
                    assert_eq!(&reply[16..], &data[offset as usize..offset as usize + 4096]);
                }
            }
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::Unsupported, "{}", e.chain());
                assert!(e.chain().contains("tls.ko"), "{}", e.chain());
                assert_eq!(crate::csi::status(e).code(), tonic::Code::FailedPrecondition);
            }
        }
    }

    /// A pod certificate's credential bundle (key, then chain, one file, as
    /// the kubelet projects it) is what the handshake uses, ahead of any
    /// tls.crt and tls.key beside it: here those are another CA's, which
    /// the server would refuse.
    #[tokio::test]
    async fn a_pod_certificate_bundle_is_the_node_certificate() {
        use super::super::tls::{CA_FILE, CERT_FILE, CREDENTIAL_BUNDLE_FILE, KEY_FILE};
        let dir = tempfile::tempdir().unwrap();
        let tls = pki(dir.path());
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), vec![7u8; 1 << 16]).unwrap();
        let uri = server_requiring_tls(file.path(), tls).await;
        let pod = dir.path().join("pod");
        std::fs::create_dir(&pod).unwrap();
        std::fs::copy(dir.path().join(CA_FILE), pod.join(CA_FILE)).unwrap();
        let bundle =
            [std::fs::read(dir.path().join(KEY_FILE)).unwrap(), std::fs::read(dir.path().join(CERT_FILE)).unwrap()];
        std::fs::write(pod.join(CREDENTIAL_BUNDLE_FILE), bundle.concat()).unwrap();
        let stranger = tempfile::tempdir().unwrap();
        drop(pki(stranger.path()));
        std::fs::copy(stranger.path().join(CERT_FILE), pod.join(CERT_FILE)).unwrap();
        std::fs::copy(stranger.path().join(KEY_FILE), pod.join(KEY_FILE)).unwrap();

        let pod_dir = TlsDir::new(&pod);
        pod_dir.check().unwrap();
        match open(&uri, 1, None, Some(&pod_dir)).await {
            Ok((export, _)) => assert_eq!(export.size, 1 << 16),
            // The whole handshake passed; only the kernel lacks kTLS here.
            Err(e) => assert!(e.kind == ErrorKind::Unsupported && e.chain().contains("tls.ko"), "{}", e.chain()),
        }
        // Without the bundle, the stranger's pair is used, and refused.
        std::fs::remove_file(pod.join(CREDENTIAL_BUNDLE_FILE)).unwrap();
        let refused = open(&uri, 1, None, Some(&pod_dir)).await.expect_err("another CA's certificate");
        assert!(!refused.chain().contains("tls.ko"), "refused at the handshake: {}", refused.chain());
        // A bundle without a key is named in the error.
        std::fs::write(pod.join(CREDENTIAL_BUNDLE_FILE), &bundle[1]).unwrap();
        let e = pod_dir.check().expect_err("no key in the bundle");
        assert!(e.chain().contains(CREDENTIAL_BUNDLE_FILE), "{}", e.chain());
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
