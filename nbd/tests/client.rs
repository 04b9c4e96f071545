//! `nbd::client::handshake` against the real server and against tiny fake
//! servers that answer exactly what a test needs.

mod common;

use common::*;
use nbd::client::{HandshakeOptions, handshake};
use nbd::wire::{ExportNameReply, Greeting, InfoReply, InfoRequest, OptionHeader, OptionReplyHeader};
use nbd::{ClientFlags, Error, HandshakeFlags, TransmissionFlags as tf, info, opt, rep};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

fn options(structured_replies: bool) -> HandshakeOptions {
    HandshakeOptions { export_name: NAME.into(), structured_replies }
}

#[tokio::test]
async fn client_negotiates_size_flags_and_block_size() {
    for structured in [false, true] {
        let mut h = start(config());
        let export = within(handshake(&mut h.client.io, &options(structured))).await.expect("handshake");
        assert_eq!(export.size, SIZE);
        let df = if structured { tf::SEND_DF } else { tf::empty() };
        assert_eq!(export.transmission_flags, DEFAULT_FLAGS | df);
        assert_eq!(export.block_size, Some((1, 4096, 32 << 20)));
        assert_eq!(export.structured_replies, structured);
        assert!(export.can_multi_conn());
        assert!(!export.read_only());
        // The stream is left at the start of transmission.
        h.client.still_works(structured).await;
    }
}

#[tokio::test]
async fn client_sees_multi_conn_off_and_read_only() {
    let mut h = start(nbd::server::ExportConfig { multi_conn: false, read_only: true, ..config() });
    let export = within(handshake(&mut h.client.io, &options(false))).await.expect("handshake");
    assert!(!export.can_multi_conn());
    assert!(export.read_only());
    assert!(export.transmission_flags.contains(tf::SEND_CACHE));
}

#[tokio::test]
async fn client_reports_an_unknown_export_as_refused() {
    let mut h = start(config());
    let opts = HandshakeOptions { export_name: "wrong".into(), structured_replies: false };
    match within(handshake(&mut h.client.io, &opts)).await {
        Err(Error::Refused { option, reply, .. }) => {
            assert_eq!((option, reply), (opt::GO, rep::ERR_UNKNOWN));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

// ------------------------------------------------------------ fake servers

/// The server end of a fake session: just enough NBD to answer one client.
struct Fake {
    io: DuplexStream,
}

impl Fake {
    /// Sends the greeting with `handshake_flags`; returns the client flags
    /// as they came on the wire.
    async fn greet(&mut self, handshake_flags: HandshakeFlags) -> u32 {
        self.io.write_all(&Greeting { handshake_flags }.encode()).await.unwrap();
        self.io.read_u32().await.unwrap()
    }

    async fn option(&mut self) -> (u32, Vec<u8>) {
        let mut header = [0; OptionHeader::SIZE];
        self.io.read_exact(&mut header).await.unwrap();
        let header = OptionHeader::decode(&header).unwrap();
        let mut data = vec![0; header.length as usize];
        self.io.read_exact(&mut data).await.unwrap();
        (header.option, data)
    }

    async fn reply(&mut self, option: u32, reply: u32, payload: &[u8]) {
        let header = OptionReplyHeader { option, reply, length: payload.len() as u32 };
        self.io.write_all(&header.encode()).await.unwrap();
        self.io.write_all(payload).await.unwrap();
    }
}

fn fake_pair() -> (DuplexStream, Fake) {
    let (client, server) = tokio::io::duplex(PIPE);
    (client, Fake { io: server })
}

#[tokio::test]
async fn send_cache_alone_is_not_multi_conn() {
    // qemu 3.0 put SEND_CACHE on bit 8; a correct client only trusts bit 8.
    let (mut client, mut fake) = fake_pair();
    let server = tokio::spawn(async move {
        let flags = fake.greet(HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES).await;
        assert_eq!(flags, (ClientFlags::C_FIXED_NEWSTYLE | ClientFlags::C_NO_ZEROES).bits());
        let (option, data) = fake.option().await;
        assert_eq!(option, opt::GO);
        let request = InfoRequest::decode(&data).unwrap();
        assert_eq!(request.name, NAME);
        assert!(request.requests.contains(&info::BLOCK_SIZE), "the client asks for size constraints");
        let export = InfoReply::Export { size: 1 << 30, transmission_flags: tf::HAS_FLAGS | tf::SEND_CACHE };
        fake.reply(opt::GO, rep::INFO, &export.encode()).await;
        fake.reply(opt::GO, rep::ACK, &[]).await;
    });
    let export = within(handshake(&mut client, &options(false))).await.expect("handshake");
    within(server).await.unwrap();
    assert_eq!(export.transmission_flags.bits(), 1 << 10 | 1);
    assert!(!export.can_multi_conn());
    assert_eq!(export.size, 1 << 30);
    assert_eq!(export.block_size, None);
}

/// A fake server that answers GO with ERR_UNSUP, then accepts EXPORT_NAME.
async fn old_server(mut fake: Fake, handshake_flags: HandshakeFlags) {
    let client_flags = fake.greet(handshake_flags).await;
    let no_zeroes = client_flags & ClientFlags::C_NO_ZEROES.bits() != 0;
    assert_eq!(no_zeroes, handshake_flags.contains(HandshakeFlags::NO_ZEROES), "C_NO_ZEROES only when offered");
    let (option, _) = fake.option().await;
    assert_eq!(option, opt::GO);
    fake.reply(opt::GO, rep::ERR_UNSUP, b"what is GO?").await;
    let (option, name) = fake.option().await;
    assert_eq!(option, opt::EXPORT_NAME);
    assert_eq!(name, NAME.as_bytes());
    let reply = ExportNameReply { size: 12345 << 9, transmission_flags: tf::HAS_FLAGS | tf::CAN_MULTI_CONN };
    fake.io.write_all(&reply.encode(no_zeroes)).await.unwrap();
    // A byte of "transmission" right after, to prove the client consumed
    // exactly the reply (and its padding), no more and no less.
    fake.io.write_all(&[0xee]).await.unwrap();
}

#[tokio::test]
async fn client_falls_back_to_export_name_when_go_is_unsupported() {
    for flags in [HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES, HandshakeFlags::FIXED_NEWSTYLE] {
        let (mut client, fake) = fake_pair();
        let server = tokio::spawn(old_server(fake, flags));
        let export = within(handshake(&mut client, &options(false))).await.expect("handshake");
        within(server).await.unwrap();
        assert_eq!(export.size, 12345 << 9);
        assert_eq!(export.transmission_flags, tf::HAS_FLAGS | tf::CAN_MULTI_CONN);
        assert!(export.can_multi_conn());
        assert_eq!(export.block_size, None);
        assert_eq!(within(client.read_u8()).await.unwrap(), 0xee, "handshake flags {flags:#x}");
    }
}

#[tokio::test]
async fn client_refuses_a_server_without_fixed_newstyle() {
    let (mut client, mut fake) = fake_pair();
    tokio::spawn(async move {
        fake.io.write_all(&Greeting { handshake_flags: HandshakeFlags::empty() }.encode()).await.unwrap();
        let _ = fake.io.read_u32().await;
    });
    let result = within(handshake(&mut client, &options(false))).await;
    assert!(matches!(result, Err(Error::NotFixedNewstyle)), "{result:?}");
}
