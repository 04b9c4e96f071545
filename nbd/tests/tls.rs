//! NBD_OPT_STARTTLS against the real server on a loopback TCP port: the
//! option state machine per TLS mode (byte by byte, in plaintext and then
//! over a rustls client stream), certificates refused, the access check by
//! node name at NBD_OPT_GO, the record limit's close, and data through the
//! copy path that replaces sendfile under TLS.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::pki::Pki;
use common::*;
use nbd::client::{HandshakeOptions, handshake, handshake_tls};
use nbd::server::{Allowed, ExportConfig, ReadOnlyPeers};
use nbd::tls::{ClientTls, HandshakeFailure, ServerTls, TlsMode};
use nbd::wire::{InfoReply, InfoRequest, OptionHeader, OptionReplyHeader, Request, SimpleReply};
use nbd::{ClientFlags, CommandFlags, ErrorKind, TransmissionFlags, cmd, info, opt, rep};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

fn tls_config(mode: fn(ServerTls) -> TlsMode, tls: ServerTls) -> ExportConfig {
    ExportConfig { tls: mode(tls), ..config() }
}

async fn send_option<S: AsyncWrite + Unpin>(s: &mut S, option: u32, data: &[u8]) {
    let mut msg = OptionHeader { option, length: data.len() as u32 }.encode().to_vec();
    msg.extend_from_slice(data);
    within(s.write_all(&msg)).await.expect("send option");
    within(s.flush()).await.expect("flush");
}

/// The next option reply: its type and payload, after checking it answers `option`.
async fn reply<S: AsyncRead + Unpin>(s: &mut S, option: u32) -> (u32, Vec<u8>) {
    let mut header = [0u8; OptionReplyHeader::SIZE];
    within(s.read_exact(&mut header)).await.expect("option reply header");
    let header = OptionReplyHeader::decode(&header).expect("option reply magic");
    assert_eq!(header.option, option, "reply to the wrong option");
    assert!(header.length <= 1 << 16, "reply of {} bytes", header.length);
    let mut payload = vec![0; header.length as usize];
    within(s.read_exact(&mut payload)).await.expect("option reply payload");
    (header.reply, payload)
}

/// Replies to `option` up to the final one (ACK or an error), in order.
async fn replies<S: AsyncRead + Unpin>(s: &mut S, option: u32) -> Vec<(u32, Vec<u8>)> {
    let mut all = Vec::new();
    loop {
        let (kind, payload) = reply(s, option).await;
        let last = kind == rep::ACK || kind & rep::ERR_BIT != 0;
        all.push((kind, payload));
        if last {
            return all;
        }
    }
}

/// Connects and answers the greeting with both client flags.
async fn begin(server: &TcpServer) -> TcpStream {
    let mut stream = within(TcpStream::connect(server.addr)).await.expect("connect");
    let mut greeting = [0u8; 18];
    within(stream.read_exact(&mut greeting)).await.expect("greeting");
    let flags = ClientFlags::C_FIXED_NEWSTYLE | ClientFlags::C_NO_ZEROES;
    within(stream.write_all(&flags.bits().to_be_bytes())).await.unwrap();
    stream
}

fn go_request(name: &str) -> Vec<u8> {
    InfoRequest { name: name.into(), requests: vec![info::BLOCK_SIZE] }.encode()
}

/// STARTTLS, acknowledged, then the TLS handshake as `client`.
async fn start_tls(
    mut stream: TcpStream,
    client: &ClientTls,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    send_option(&mut stream, opt::STARTTLS, &[]).await;
    assert_eq!(reply(&mut stream, opt::STARTTLS).await, (rep::ACK, vec![]));
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(client.config()));
    within(connector.connect(client.server_name().clone(), stream)).await
}

/// GO on a stream: the transmission flags, or the error reply and its message.
async fn go<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<TransmissionFlags, (u32, String)> {
    send_option(s, opt::GO, &go_request(NAME)).await;
    let all = replies(s, opt::GO).await;
    let (last, payload) = all.last().cloned().unwrap();
    if last != rep::ACK {
        assert_eq!(all.len(), 1, "an error comes without INFO replies: {all:?}");
        return Err((last, String::from_utf8_lossy(&payload).into_owned()));
    }
    all.iter()
        .find_map(|(_, p)| match InfoReply::decode(p) {
            Ok(InfoReply::Export { size, transmission_flags }) => {
                assert_eq!(size, SIZE);
                Some(transmission_flags)
            }
            _ => None,
        })
        .ok_or((0, "no NBD_INFO_EXPORT".into()))
}

/// A WRITE then a READ of the same bytes in transmission (simple replies).
async fn write_then_read<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, offset: u64, data: &[u8]) -> Vec<u8> {
    let write =
        Request { flags: CommandFlags::empty(), command: cmd::WRITE, cookie: 1, offset, length: data.len() as u32 };
    let read = Request { command: cmd::READ, cookie: 2, ..write };
    let mut msg = write.encode().to_vec();
    msg.extend_from_slice(data);
    msg.extend_from_slice(&read.encode());
    within(s.write_all(&msg)).await.unwrap();
    within(s.flush()).await.unwrap();
    let mut header = [0u8; SimpleReply::SIZE];
    within(s.read_exact(&mut header)).await.unwrap();
    assert_eq!(SimpleReply::decode(&header).unwrap(), SimpleReply { error: 0, cookie: 1 });
    within(s.read_exact(&mut header)).await.unwrap();
    assert_eq!(SimpleReply::decode(&header).unwrap(), SimpleReply { error: 0, cookie: 2 });
    let mut back = vec![0; data.len()];
    within(s.read_exact(&mut back)).await.unwrap();
    back
}

fn stat(server: &TcpServer, pick: fn(&nbd::server::ExportStats) -> &std::sync::atomic::AtomicU64) -> u64 {
    pick(server.export.stats()).load(Ordering::Relaxed)
}

#[tokio::test]
async fn required_answers_every_option_before_tls_with_tls_reqd_and_reveals_nothing() {
    let pki = Pki::new("a");
    let server = TcpServer::start_with(tls_config(TlsMode::Required, pki.server())).await;
    let mut stream = begin(&server).await;
    let meta = nbd::wire::MetaContextRequest { export: NAME.into(), queries: vec!["base:allocation".into()] }.encode();
    let options: [(u32, Vec<u8>); 10] = [
        (opt::LIST, vec![]),
        (opt::INFO, go_request(NAME)),
        (opt::GO, go_request(NAME)),
        (opt::GO, go_request("another")),
        (opt::STRUCTURED_REPLY, vec![]),
        (opt::LIST_META_CONTEXT, meta.clone()),
        (opt::SET_META_CONTEXT, meta),
        (opt::PEEK_EXPORT, vec![]),
        (opt::EXTENDED_HEADERS, vec![]),
        (42, b"unknown".to_vec()),
    ];
    for (option, data) in options {
        send_option(&mut stream, option, &data).await;
        let (kind, payload) = reply(&mut stream, option).await;
        assert_eq!(kind, rep::ERR_TLS_REQD, "option {option}");
        let text = String::from_utf8_lossy(&payload);
        assert!(!text.contains(NAME) && !text.contains(&SIZE.to_string()), "option {option} revealed {text:?}");
    }
    // Even an oversized option, once drained.
    let long = vec![0u8; (nbd::limits::MAX_OPTION_LEN + 1) as usize];
    send_option(&mut stream, opt::LIST, &long).await;
    assert_eq!(reply(&mut stream, opt::LIST).await.0, rep::ERR_TLS_REQD);
    // ABORT is allowed, and ends the session.
    send_option(&mut stream, opt::ABORT, &[]).await;
    assert_eq!(reply(&mut stream, opt::ABORT).await, (rep::ACK, vec![]));
    assert!(closed_without_reply(&mut stream).await);
    server.stop().await;
}

#[tokio::test]
async fn required_closes_on_export_name_before_tls() {
    let pki = Pki::new("a");
    let server = TcpServer::start_with(tls_config(TlsMode::Required, pki.server())).await;
    let mut stream = begin(&server).await;
    send_option(&mut stream, opt::EXPORT_NAME, NAME.as_bytes()).await;
    assert!(closed_without_reply(&mut stream).await, "EXPORT_NAME cannot be refused: the connection closes");
    // A client that never set fixed newstyle cannot start TLS at all.
    let mut stream = within(TcpStream::connect(server.addr)).await.unwrap();
    within(stream.read_exact(&mut [0u8; 18])).await.unwrap();
    within(stream.write_all(&ClientFlags::C_NO_ZEROES.bits().to_be_bytes())).await.unwrap();
    assert!(closed_without_reply(&mut stream).await);
    server.stop().await;
}

#[tokio::test]
async fn required_starttls_then_everything_over_tls_and_a_second_starttls_is_invalid() {
    let pki = Pki::new("a");
    let server = TcpServer::start_with(tls_config(TlsMode::Required, pki.server())).await;
    let stream = begin(&server).await;
    let mut tls = start_tls(stream, &pki.client("node-a", &pki.ca_path())).await.expect("TLS handshake");
    // No TLS_REQD once TLS is on; STARTTLS again is invalid, with or without data.
    for data in [&b""[..], b"x"] {
        send_option(&mut tls, opt::STARTTLS, data).await;
        assert_eq!(reply(&mut tls, opt::STARTTLS).await.0, rep::ERR_INVALID);
    }
    send_option(&mut tls, opt::LIST, &[]).await;
    assert_eq!(reply(&mut tls, opt::LIST).await.0, rep::SERVER);
    assert_eq!(reply(&mut tls, opt::LIST).await.0, rep::ACK);
    send_option(&mut tls, opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(reply(&mut tls, opt::STRUCTURED_REPLY).await.0, rep::ACK);
    let flags = go(&mut tls).await.expect("GO over TLS");
    assert!(flags.contains(TransmissionFlags::SEND_DF), "structured replies negotiated over TLS count");
    eventually("the connection counts as TLS", || stat(&server, tls_gauge()) == 1).await;
    server.stop().await;
}

#[tokio::test]
async fn starttls_forgets_what_was_negotiated_before_it() {
    let pki = Pki::new("a");
    let server = TcpServer::start_with(tls_config(TlsMode::Allowed, pki.server())).await;
    let mut stream = begin(&server).await;
    send_option(&mut stream, opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(reply(&mut stream, opt::STRUCTURED_REPLY).await.0, rep::ACK);
    let mut tls = start_tls(stream, &pki.client("node-a", &pki.ca_path())).await.expect("TLS handshake");
    let flags = go(&mut tls).await.expect("GO over TLS");
    assert!(!flags.contains(TransmissionFlags::SEND_DF), "structured replies from before TLS were dropped");
    server.stop().await;
}

#[tokio::test]
async fn starttls_with_data_is_invalid_and_haggling_goes_on_in_plaintext() {
    let pki = Pki::new("a");
    let server = TcpServer::start_with(tls_config(TlsMode::Allowed, pki.server())).await;
    let mut stream = begin(&server).await;
    send_option(&mut stream, opt::STARTTLS, b"data").await;
    assert_eq!(reply(&mut stream, opt::STARTTLS).await.0, rep::ERR_INVALID);
    // Allowed: plaintext clients are served as without TLS.
    go(&mut stream).await.expect("plaintext GO on an export that allows TLS");
    assert_eq!(write_then_read(&mut stream, 4096, b"plain").await, b"plain");
    assert_eq!(stat(&server, tls_gauge()), 0);
    server.stop().await;
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let pki = Pki::new("a");
    let other = Pki::new("b");
    let server = TcpServer::start_with(tls_config(TlsMode::Required, pki.server())).await;
    // Another CA's certificate, though the client trusts our server.
    let stream = begin(&server).await;
    let outcome = async {
        let mut tls = start_tls(stream, &other.client("node-a", &pki.ca_path())).await?;
        // TLS 1.3: the server judges the client's certificate after the
        // client has finished, so the refusal may arrive as the answer to GO.
        send_option(&mut tls, opt::GO, &go_request(NAME)).await;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map(|_| ())
    };
    within(outcome).await.expect_err("a certificate of another CA is refused");
    eventually("the failure is counted", || {
        stat(&server, |s| &s.tls_handshake_failures[HandshakeFailure::Certificate.index()]) == 1
    })
    .await;
    // And a client that does not trust our server's CA gives up itself.
    let stream = begin(&server).await;
    let err = start_tls(stream, &pki.client("node-a", &other.ca_path())).await.expect_err("server not trusted");
    assert!(err.to_string().contains("certificate"), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let pki = Pki::new("a");
    let server = TcpServer::start_with(tls_config(TlsMode::Required, pki.server())).await;
    let roots = {
        let mut roots = rustls::RootCertStore::empty();
        for ca in nbd::tls::config::certificates_from_pem_file(&pki.ca_path()).unwrap() {
            roots.add(ca).unwrap();
        }
        roots
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut stream = begin(&server).await;
    send_option(&mut stream, opt::STARTTLS, &[]).await;
    assert_eq!(reply(&mut stream, opt::STARTTLS).await.0, rep::ACK);
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let outcome = async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, stream).await?;
        send_option(&mut tls, opt::GO, &go_request(NAME)).await;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map(|_| ())
    };
    within(outcome).await.expect_err("no client certificate, no session");
    eventually("the failure is counted", || {
        stat(&server, |s| &s.tls_handshake_failures[HandshakeFailure::Certificate.index()]) == 1
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn the_access_check_admits_by_node_name_at_go() {
    let pki = Pki::new("a");
    let server = TcpServer::start_with(tls_config(TlsMode::Required, pki.server())).await;
    let read_only = ReadOnlyPeers { nodes: ["node-r".to_owned()].into(), ..Default::default() };
    drop(server.export.access().set_policy(Allowed::Nodes(["node-a".into(), "node-r".into()].into()), read_only));

    // A node the policy does not name: INFO and GO refused by policy, and
    // not a word about the export.
    let mut tls = start_tls(begin(&server).await, &pki.client("node-b", &pki.ca_path())).await.unwrap();
    send_option(&mut tls, opt::INFO, &go_request(NAME)).await;
    assert_eq!(replies(&mut tls, opt::INFO).await.len(), 1, "INFO refused before any NBD_REP_INFO");
    let (error, message) = go(&mut tls).await.expect_err("node-b is not admitted");
    assert_eq!(error, rep::ERR_POLICY, "{message}");
    // Haggling goes on: ABORT still works.
    send_option(&mut tls, opt::ABORT, &[]).await;
    assert_eq!(reply(&mut tls, opt::ABORT).await.0, rep::ACK);

    // The named nodes get in, the reader read-only.
    let mut tls = start_tls(begin(&server).await, &pki.client("node-a", &pki.ca_path())).await.unwrap();
    let flags = go(&mut tls).await.expect("node-a is admitted");
    assert!(!flags.contains(TransmissionFlags::READ_ONLY));
    assert_eq!(write_then_read(&mut tls, 8192, b"node-a was here").await, b"node-a was here");
    let mut reader = start_tls(begin(&server).await, &pki.client("node-r", &pki.ca_path())).await.unwrap();
    assert!(go(&mut reader).await.expect("node-r is admitted").contains(TransmissionFlags::READ_ONLY));

    // Revoking node-a stops its session.
    let mut fence = server.export.access().set_allowed(Allowed::Nodes(["node-r".into()].into()));
    assert_eq!(fence.stopped(), 1);
    within(fence.wait()).await;
    let mut rest = Vec::new();
    let _ = within(tls.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "nothing after the stop");
    server.stop().await;
}

#[tokio::test]
async fn a_node_policy_sends_plaintext_clients_of_an_allowed_export_to_tls() {
    let pki = Pki::new("a");
    let server = TcpServer::start_with(tls_config(TlsMode::Allowed, pki.server())).await;
    drop(server.export.access().set_allowed(Allowed::Nodes(["node-a".into()].into())));
    let mut stream = begin(&server).await;
    assert_eq!(go(&mut stream).await.expect_err("no name in plaintext").0, rep::ERR_TLS_REQD);
    let mut tls = start_tls(stream, &pki.client("node-a", &pki.ca_path())).await.unwrap();
    go(&mut tls).await.expect("the same connection after STARTTLS");
    server.stop().await;
}

#[tokio::test]
async fn the_repo_client_negotiates_over_tls_and_never_falls_back() {
    let pki = Pki::new("a");
    let server = TcpServer::start_with(tls_config(TlsMode::Required, pki.server())).await;
    let opts = HandshakeOptions { export_name: NAME.into(), structured_replies: false };
    let stream = within(TcpStream::connect(server.addr)).await.unwrap();
    let (mut tls, export) =
        within(handshake_tls(stream, &opts, &pki.client("node-a", &pki.ca_path()))).await.expect("handshake over TLS");
    assert_eq!(export.size, SIZE);
    assert!(export.can_multi_conn());
    assert_eq!(write_then_read(&mut tls, 0, b"over TLS").await, b"over TLS");
    assert_eq!(read_file(&server.file, 0, 8), b"over TLS");
    // The plaintext handshake against the same export is told TLS is required.
    let mut stream = within(TcpStream::connect(server.addr)).await.unwrap();
    let err = within(handshake(&mut stream, &opts)).await.expect_err("plaintext refused");
    assert!(matches!(err, nbd::Error::Refused { reply: rep::ERR_TLS_REQD, .. }), "{err}");
    drop(tls);
    server.stop().await;

    // And against an export with TLS off, the TLS handshake stops at STARTTLS.
    let server = TcpServer::start().await;
    let stream = within(TcpStream::connect(server.addr)).await.unwrap();
    let err = within(handshake_tls(stream, &opts, &pki.client("node-a", &pki.ca_path())))
        .await
        .expect_err("no fallback to plaintext");
    assert!(matches!(err, nbd::Error::Refused { option: opt::STARTTLS, reply: rep::ERR_POLICY, .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::Refused);
    server.stop().await;
}

/// The server closes a TLS connection once it has carried its record
/// limit (here 40 records each way): the client gets every reply it is
/// owed, then the end of the TLS stream, and reconnects.
#[tokio::test]
async fn the_record_limit_closes_the_connection_and_the_client_reconnects() {
    const LIMIT: u64 = 40;
    let pki = Pki::new("a");
    let tls = pki.server().with_record_limit(LIMIT);
    let server = TcpServer::start_with(tls_config(TlsMode::Required, tls)).await;
    let opts = HandshakeOptions { export_name: NAME.into(), structured_replies: false };
    let client = pki.client("node-a", &pki.ca_path());
    let connect = || async {
        let stream = within(TcpStream::connect(server.addr)).await.unwrap();
        within(handshake_tls(stream, &opts, &client)).await.expect("handshake").0
    };
    let mut stream = connect().await;
    let mut answered = 0u64;
    // One request at a time, far more than the limit allows: each is at
    // least one record each way.
    for cookie in 0..(4 * LIMIT) {
        let request = Request { flags: CommandFlags::empty(), command: cmd::READ, cookie, offset: 512, length: 512 };
        if stream.write_all(&request.encode()).await.is_err() || stream.flush().await.is_err() {
            break;
        }
        let mut header = [0u8; SimpleReply::SIZE];
        match within(stream.read_exact(&mut header)).await {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "a clean end, not {e}");
                break;
            }
        }
        assert_eq!(SimpleReply::decode(&header).unwrap(), SimpleReply { error: 0, cookie });
        let mut data = vec![0u8; 512];
        within(stream.read_exact(&mut data)).await.expect("the data of an answered READ");
        answered += 1;
    }
    assert!(answered > 0 && answered < LIMIT, "{answered} READs answered before the close");
    eventually("the close is counted", || stat(&server, |s| &s.tls_record_limit_closes) == 1).await;
    eventually("the connection is gone", || server.connections() == 0).await;
    // A new connection, new keys, a new budget.
    let mut again = connect().await;
    assert_eq!(write_then_read(&mut again, 0, b"fresh keys").await, b"fresh keys");
    server.stop().await;
}

/// Under TLS there is no sendfile: READ data of every size around the
/// zero-copy threshold comes through the copy path intact, pipelined,
/// with simple and with structured replies.
#[tokio::test]
async fn reads_over_tls_take_the_copy_path_intact() {
    let pki = Pki::new("a");
    let server = TcpServer::start_with(tls_config(TlsMode::Required, pki.server())).await;
    let data = pattern(0, 8 << 20);
    std::os::unix::fs::FileExt::write_all_at(&server.file, &data, 0).unwrap();
    for structured in [false, true] {
        let opts = HandshakeOptions { export_name: NAME.into(), structured_replies: structured };
        let stream = within(TcpStream::connect(server.addr)).await.unwrap();
        let (mut tls, export) =
            within(handshake_tls(stream, &opts, &pki.client("node-a", &pki.ca_path()))).await.expect("handshake");
        assert_eq!(export.structured_replies, structured);
        let reads: [(u64, u32); 6] = [(0, 4096), (1, 65535), (3, 65536), (12345, 65537), (1 << 20, 4 << 20), (7, 512)];
        let mut batch = Vec::new();
        for (cookie, (offset, length)) in reads.iter().enumerate() {
            let request = Request {
                flags: CommandFlags::empty(),
                command: cmd::READ,
                cookie: cookie as u64,
                offset: *offset,
                length: *length,
            };
            batch.extend_from_slice(&request.encode());
        }
        within(tls.write_all(&batch)).await.unwrap();
        within(tls.flush()).await.unwrap();
        eventually("the connection counts as TLS", || stat(&server, tls_gauge()) == 1).await;
        for (cookie, (offset, length)) in reads.into_iter().enumerate() {
            let want = &data[offset as usize..offset as usize + length as usize];
            let got = if structured {
                let mut header = [0u8; nbd::wire::ChunkHeader::SIZE];
                within(tls.read_exact(&mut header)).await.unwrap();
                let header = nbd::wire::ChunkHeader::decode(&header).unwrap();
                assert_eq!((header.cookie, header.kind), (cookie as u64, nbd::reply_type::OFFSET_DATA));
                let mut body = vec![0u8; header.length as usize];
                within(tls.read_exact(&mut body)).await.unwrap();
                assert_eq!(u64::from_be_bytes(body[..8].try_into().unwrap()), offset);
                body.split_off(8)
            } else {
                let mut header = [0u8; SimpleReply::SIZE];
                within(tls.read_exact(&mut header)).await.unwrap();
                assert_eq!(SimpleReply::decode(&header).unwrap(), SimpleReply { error: 0, cookie: cookie as u64 });
                let mut body = vec![0u8; length as usize];
                within(tls.read_exact(&mut body)).await.unwrap();
                body
            };
            assert!(got == want, "READ {cookie} at {offset} ({length} bytes) differs");
        }
        drop(tls);
        eventually("the TLS connection is no longer counted", || stat(&server, tls_gauge()) == 0).await;
    }
    server.stop().await;
}

/// The handshake timeout covers the TLS handshake: a client that sends
/// STARTTLS and then nothing is dropped.
#[tokio::test]
async fn a_client_stalling_after_starttls_is_dropped_at_the_handshake_timeout() {
    let pki = Pki::new("a");
    let config = ExportConfig {
        handshake_timeout: std::time::Duration::from_millis(300),
        ..tls_config(TlsMode::Required, pki.server())
    };
    let server = TcpServer::start_with(config).await;
    let mut stream = begin(&server).await;
    send_option(&mut stream, opt::STARTTLS, &[]).await;
    assert_eq!(reply(&mut stream, opt::STARTTLS).await.0, rep::ACK);
    assert!(closed_without_reply(&mut stream).await, "dropped without a TLS byte");
    eventually("the timeout is counted", || {
        stat(&server, |s| &s.tls_handshake_failures[HandshakeFailure::Timeout.index()]) == 1
    })
    .await;
    server.stop().await;
}

/// After NBD_OPT_GO over TLS the client's session is at rest and its
/// secrets come out; the kernel takes them if it has TLS. This host has no
/// tls module: the error names it. Where the kernel has one, a READ then
/// goes through the kernel's TLS on the bare socket.
#[tokio::test]
async fn the_session_goes_to_the_kernel_as_far_as_the_kernel_allows() {
    let pki = Pki::new("a");
    let server = TcpServer::start_with(tls_config(TlsMode::Required, pki.server())).await;
    std::os::unix::fs::FileExt::write_all_at(&server.file, b"kernel TLS", 4096).unwrap();
    let opts = HandshakeOptions { export_name: NAME.into(), structured_replies: false };
    let stream = within(TcpStream::connect(server.addr)).await.unwrap();
    let (tls, _) = within(handshake_tls(stream, &opts, &pki.client("node-a", &pki.ca_path()))).await.unwrap();
    match nbd::ktls::into_kernel(tls) {
        Err(nbd::ktls::KtlsError::Unavailable) => {
            let message = nbd::ktls::KtlsError::Unavailable.to_string();
            assert!(message.contains("tls.ko"), "{message}");
        }
        Ok(mut socket) => {
            let read =
                Request { flags: CommandFlags::empty(), command: cmd::READ, cookie: 7, offset: 4096, length: 10 };
            within(socket.write_all(&read.encode())).await.unwrap();
            let mut reply = [0u8; SimpleReply::SIZE + 10];
            within(socket.read_exact(&mut reply)).await.unwrap();
            assert_eq!(&reply[SimpleReply::SIZE..], b"kernel TLS");
        }
        Err(other) => panic!("the session should reach the kernel: {other}"),
    }
    server.stop().await;
}
