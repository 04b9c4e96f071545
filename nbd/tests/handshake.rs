//! Option haggling against `serve_stream`, byte by byte.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nbd::wire::{ExportNameReply, InfoReply, MetaContextReply, decode_server_reply};
use nbd::{ClientFlags, CommandFlags, ErrorKind, TransmissionFlags as tf, cmd, info, magic, opt, rep};

#[tokio::test]
async fn greeting_is_nbdmagic_ihaveopt_fixed_newstyle_no_zeroes() {
    let mut h = start(config());
    let raw = h.client.recv(18).await;
    assert_eq!(&raw[..8], b"NBDMAGIC");
    assert_eq!(&raw[8..16], b"IHAVEOPT");
    // FIXED_NEWSTYLE (bit 0) | NO_ZEROES (bit 1), big-endian u16.
    assert_eq!(&raw[16..], &[0x00, 0x03]);
    h.client.send(&(ClientFlags::C_FIXED_NEWSTYLE | ClientFlags::C_NO_ZEROES).bits().to_be_bytes()).await;
    h.client.option(opt::ABORT, &[]).await;
    h.client.expect_reply(opt::ABORT, rep::ACK).await;
    h.expect_clean_close().await;
}

#[tokio::test]
async fn unknown_client_flag_bits_close_the_connection() {
    let mut h = start(config());
    h.client.begin(ClientFlags::C_FIXED_NEWSTYLE.bits() | 1 << 2).await;
    let err = h.expect_error_close().await;
    assert_eq!(err.kind(), ErrorKind::Protocol, "{err}");
}

#[tokio::test]
async fn list_sends_the_export_name_then_ack() {
    let mut h = start(config());
    h.client.begin_fixed().await;
    h.client.option(opt::LIST, &[]).await;
    let server = h.client.expect_reply(opt::LIST, rep::SERVER).await;
    assert_eq!(server, [&(NAME.len() as u32).to_be_bytes()[..], NAME.as_bytes()].concat());
    assert_eq!(decode_server_reply(&server).unwrap().0, NAME);
    assert!(h.client.expect_reply(opt::LIST, rep::ACK).await.is_empty());
}

#[tokio::test]
async fn list_with_data_is_invalid() {
    let mut h = start(config());
    h.client.begin_fixed().await;
    h.client.option(opt::LIST, b"x").await;
    h.client.expect_reply(opt::LIST, rep::ERR_INVALID).await;
    // Still haggling: a plain LIST now works.
    h.client.option(opt::LIST, &[]).await;
    h.client.expect_reply(opt::LIST, rep::SERVER).await;
    h.client.expect_reply(opt::LIST, rep::ACK).await;
}

#[tokio::test]
async fn list_is_refused_when_listing_is_off() {
    let mut h = start(nbd::server::ExportConfig { list_export: false, ..config() });
    h.client.begin_fixed().await;
    h.client.option(opt::LIST, &[]).await;
    let message = h.client.expect_reply(opt::LIST, rep::ERR_POLICY).await;
    assert!(!contains(&message, NAME.as_bytes()), "the secret name leaked");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn decode_infos(replies: &[(u32, Vec<u8>)]) -> Vec<InfoReply> {
    let (last, infos) = replies.split_last().expect("replies");
    assert_eq!(last.0, rep::ACK, "the final reply is ACK: {replies:?}");
    assert!(last.1.is_empty());
    infos
        .iter()
        .map(|(kind, payload)| {
            assert_eq!(*kind, rep::INFO);
            InfoReply::decode(payload).expect("INFO payload")
        })
        .collect()
}

#[tokio::test]
async fn info_reports_export_block_size_name_and_description() {
    let mut h = start(config());
    h.client.begin_fixed().await;
    let requests = [info::NAME, info::DESCRIPTION, info::BLOCK_SIZE];
    let replies = h.client.info_or_go(opt::INFO, NAME, &requests).await;
    let infos = decode_infos(&replies);
    assert_eq!(infos.len(), 4, "{infos:?}");
    assert!(infos.contains(&InfoReply::Export { size: SIZE, transmission_flags: DEFAULT_FLAGS }));
    assert!(infos.contains(&InfoReply::BlockSize { minimum: 1, preferred: 4096, maximum: 32 << 20 }));
    assert!(infos.contains(&InfoReply::Name(NAME.into())));
    assert!(infos.contains(&InfoReply::Description(DESCRIPTION.into())));
    // The raw EXPORT item: type 0, size, flags.
    let raw = replies.iter().find(|(_, p)| p.len() == 12).unwrap();
    assert_eq!(raw.1, [&[0u8, 0][..], &SIZE.to_be_bytes(), &DEFAULT_FLAGS.bits().to_be_bytes()].concat());

    // INFO without requests: EXPORT and (unasked) BLOCK_SIZE only.
    let infos = decode_infos(&h.client.info_or_go(opt::INFO, NAME, &[]).await);
    assert!(infos.iter().all(|i| matches!(i, InfoReply::Export { .. } | InfoReply::BlockSize { .. })));

    // INFO does not end the handshake: GO still works.
    let flags = h.client.go().await;
    assert_eq!(flags, DEFAULT_FLAGS);
    h.client.still_works(false).await;
}

#[tokio::test]
async fn info_and_go_for_an_unknown_name_say_unknown_without_the_real_name() {
    let mut h = start(config());
    h.client.begin_fixed().await;
    for option in [opt::INFO, opt::GO] {
        for name in ["", "pvc-3f1c", "other"] {
            let replies = h.client.info_or_go(option, name, &[info::NAME, info::DESCRIPTION]).await;
            assert_eq!(replies.len(), 1, "no INFO before the error: {replies:?}");
            assert_eq!(replies[0].0, rep::ERR_UNKNOWN);
            assert!(!contains(&replies[0].1, NAME.as_bytes()), "the real name leaked");
        }
    }
    assert_eq!(h.client.go().await, DEFAULT_FLAGS);
}

#[tokio::test]
async fn malformed_go_data_is_invalid() {
    let mut h = start(config());
    h.client.begin_fixed().await;
    let truncated_name = [&100u32.to_be_bytes()[..], b"abc"].concat();
    let good = nbd::wire::InfoRequest { name: NAME.into(), requests: vec![] }.encode();
    let trailing = [&good[..], &[0]].concat();
    let missing_count = good[..good.len() - 2].to_vec();
    let odd_request_list = [&good[..good.len() - 2], &1u16.to_be_bytes(), &[3]].concat();
    for data in [vec![], vec![0, 0], truncated_name, trailing, missing_count, odd_request_list] {
        h.client.option(opt::GO, &data).await;
        h.client.expect_reply(opt::GO, rep::ERR_INVALID).await;
    }
    assert_eq!(h.client.go().await, DEFAULT_FLAGS);
}

#[tokio::test]
async fn unknown_options_are_unsupported() {
    let mut h = start(config());
    h.client.begin_fixed().await;
    for option in [42, opt::EXTENDED_HEADERS, opt::PEEK_EXPORT, 0, u32::MAX] {
        h.client.option(option, b"some data").await;
        h.client.expect_reply(option, rep::ERR_UNSUP).await;
    }
    assert_eq!(h.client.go().await, DEFAULT_FLAGS);
}

/// TLS off (the spec's NOTLS mode, the default): STARTTLS is a known
/// option the export's policy refuses, and nothing else changes.
#[tokio::test]
async fn starttls_is_refused_by_policy_when_tls_is_off() {
    let mut h = start(config());
    h.client.begin_fixed().await;
    for data in [&b""[..], b"some data"] {
        h.client.option(opt::STARTTLS, data).await;
        h.client.expect_reply(opt::STARTTLS, rep::ERR_POLICY).await;
    }
    assert_eq!(h.client.go().await, DEFAULT_FLAGS);
}

#[tokio::test]
async fn option_over_64_kib_is_too_big_and_the_session_continues() {
    let mut h = start(config());
    h.client.begin_fixed().await;
    for option in [opt::INFO, 42] {
        h.client.option(option, &vec![0xab; (64 << 10) + 1]).await;
        h.client.expect_reply(option, rep::ERR_TOO_BIG).await;
    }
    // Exactly 64 KiB is not too big, merely malformed.
    h.client.option(opt::GO, &vec![0; 64 << 10]).await;
    h.client.expect_reply(opt::GO, rep::ERR_INVALID).await;
    assert_eq!(h.client.go().await, DEFAULT_FLAGS);
    h.client.still_works(false).await;
}

#[tokio::test]
async fn structured_reply_is_acked_and_turns_on_send_df() {
    let mut h = start(config());
    h.client.begin_fixed().await;
    h.client.option(opt::STRUCTURED_REPLY, b"junk").await;
    h.client.expect_reply(opt::STRUCTURED_REPLY, rep::ERR_INVALID).await;
    h.client.option(opt::STRUCTURED_REPLY, &[]).await;
    assert!(h.client.expect_reply(opt::STRUCTURED_REPLY, rep::ACK).await.is_empty());
    assert_eq!(h.client.go().await, DEFAULT_FLAGS | tf::SEND_DF);
    h.client.still_works(true).await;
}

#[tokio::test]
async fn set_meta_context_before_structured_reply_is_invalid() {
    let mut h = start(config());
    h.client.begin_fixed().await;
    let replies = h.client.set_meta_context(&["base:allocation"]).await;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, rep::ERR_INVALID);
}

#[tokio::test]
async fn list_meta_context_lists_base_allocation() {
    let mut h = start(config());
    h.client.begin_fixed().await;
    h.client.structured_replies().await;
    let expected = MetaContextReply { id: 0, name: "base:allocation".into() };
    for queries in [&[][..], &["base:"], &["base:allocation"], &["x-other:thing", "base:allocation"]] {
        let replies = h.client.meta_context(opt::LIST_META_CONTEXT, NAME, queries).await;
        assert_eq!(replies.len(), 2, "{queries:?}: {replies:?}");
        assert_eq!(replies[0].0, rep::META_CONTEXT);
        assert_eq!(replies[0].1, [&[0u8; 4][..], b"base:allocation"].concat());
        assert_eq!(MetaContextReply::decode(&replies[0].1).unwrap(), expected);
        assert_eq!(replies[1], (rep::ACK, vec![]));
    }
    // A query that matches nothing: only ACK.
    let replies = h.client.meta_context(opt::LIST_META_CONTEXT, NAME, &["x-other:"]).await;
    assert_eq!(replies, [(rep::ACK, vec![])]);
    let replies = h.client.meta_context(opt::LIST_META_CONTEXT, "nope", &[]).await;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, rep::ERR_UNKNOWN);
}

#[tokio::test]
async fn set_meta_context_selects_base_allocation_with_an_id() {
    let mut h = start(config());
    h.client.begin_fixed().await;
    h.client.structured_replies().await;
    let replies = h.client.set_meta_context(&["base:allocation"]).await;
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(replies[0].0, rep::META_CONTEXT);
    let ctx = MetaContextReply::decode(&replies[0].1).unwrap();
    assert_eq!(ctx.name, "base:allocation");
    assert_eq!(&replies[0].1[..4], &ctx.id.to_be_bytes());
    assert_eq!(replies[1], (rep::ACK, vec![]));
    // `base:` is ignored by SET; unknown namespaces too.
    let replies = h.client.set_meta_context(&["base:", "x-other:thing"]).await;
    assert_eq!(replies, [(rep::ACK, vec![])]);
}

#[tokio::test]
async fn export_name_without_zeroes_is_ten_bytes() {
    let mut h = start(config());
    h.client.begin_fixed().await;
    h.client.option(opt::EXPORT_NAME, NAME.as_bytes()).await;
    let raw = h.client.recv(ExportNameReply::SIZE).await;
    assert_eq!(raw, [&SIZE.to_be_bytes()[..], &DEFAULT_FLAGS.bits().to_be_bytes()].concat());
    // No padding: the very next bytes are the reply to a first request.
    h.client.request(CommandFlags::empty(), cmd::READ, 77, 0, 4).await;
    let next = h.client.recv(16 + 4).await;
    assert_eq!(&next[..4], &magic::SIMPLE_REPLY.to_be_bytes());
    assert_eq!(&next[8..16], &77u64.to_be_bytes());
}

#[tokio::test]
async fn export_name_with_zeroes_is_134_bytes() {
    let mut h = start(config());
    h.client.begin(ClientFlags::C_FIXED_NEWSTYLE.bits()).await;
    h.client.option(opt::EXPORT_NAME, NAME.as_bytes()).await;
    let raw = h.client.recv(134).await;
    assert_eq!(&raw[..8], &SIZE.to_be_bytes());
    assert_eq!(&raw[8..10], &DEFAULT_FLAGS.bits().to_be_bytes());
    assert!(raw[10..].iter().all(|&b| b == 0));
    h.client.request(CommandFlags::empty(), cmd::READ, 78, 0, 4).await;
    let next = h.client.recv(16 + 4).await;
    assert_eq!(&next[..4], &magic::SIMPLE_REPLY.to_be_bytes());
    assert_eq!(&next[8..16], &78u64.to_be_bytes());
}

#[tokio::test]
async fn export_name_unknown_closes_the_connection() {
    let mut h = start(config());
    h.client.begin_fixed().await;
    h.client.option(opt::EXPORT_NAME, b"guess").await;
    assert_eq!(h.client.read_to_eof().await, Vec::<u8>::new(), "nothing, not even an error");
    let err = h.finish().await.expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::Protocol);
}

#[tokio::test]
async fn abort_is_acked_then_the_connection_closes() {
    let mut h = start(config());
    h.client.begin_fixed().await;
    h.client.option(opt::ABORT, &[]).await;
    assert!(h.client.expect_reply(opt::ABORT, rep::ACK).await.is_empty());
    h.expect_clean_close().await;
}

async fn go_flags(config: nbd::server::ExportConfig, structured: bool) -> tf {
    let mut h = start(config);
    h.client.negotiate(structured, false).await
}

async fn export_name_flags(config: nbd::server::ExportConfig) -> tf {
    let mut h = start(config);
    h.client.begin_fixed().await;
    h.client.option(opt::EXPORT_NAME, NAME.as_bytes()).await;
    ExportNameReply::decode(&h.client.recv(10).await.try_into().unwrap()).transmission_flags
}

#[tokio::test]
async fn transmission_flags_by_default() {
    for flags in [go_flags(config(), false).await, export_name_flags(config()).await] {
        assert_eq!(flags, DEFAULT_FLAGS, "{flags:#06x}");
        assert_eq!(flags.bits() & 1 << 8, 1 << 8, "CAN_MULTI_CONN is bit 8");
        assert_eq!(flags.bits() & 1 << 10, 1 << 10, "SEND_CACHE is bit 10");
        assert_flags(flags, tf::empty(), tf::SEND_DF | tf::READ_ONLY | tf::SEND_RESIZE | tf::ROTATIONAL);
    }
    assert_eq!(go_flags(config(), true).await, DEFAULT_FLAGS | tf::SEND_DF);
}

#[tokio::test]
async fn multi_conn_off_clears_only_bit_8() {
    let config = || nbd::server::ExportConfig { multi_conn: false, ..config() };
    for flags in [go_flags(config(), false).await, export_name_flags(config()).await] {
        assert_eq!(flags.bits(), DEFAULT_FLAGS.bits() & !(1 << 8), "{flags:#06x}");
        assert_flags(flags, tf::SEND_CACHE, tf::CAN_MULTI_CONN);
    }
}

#[tokio::test]
async fn read_only_export_flags() {
    let config = || nbd::server::ExportConfig { read_only: true, ..config() };
    for flags in [go_flags(config(), false).await, export_name_flags(config()).await, go_flags(config(), true).await] {
        assert_flags(flags, tf::HAS_FLAGS | tf::READ_ONLY | tf::SEND_FLUSH | tf::SEND_CACHE, ALL_WRITE_FLAGS);
    }
}

#[tokio::test]
async fn handshake_timeout_drops_a_stalled_client() {
    let timeout = Duration::from_millis(200);
    // Stalled after the greeting, and stalled in the middle of an option.
    for stall_mid_option in [false, true] {
        let mut h = start(nbd::server::ExportConfig { handshake_timeout: timeout, ..config() });
        let began = Instant::now();
        h.client.begin_fixed().await;
        if stall_mid_option {
            h.client.send(&b"IHAVEOPT"[..]).await;
        }
        assert_eq!(h.client.read_to_eof().await, Vec::<u8>::new());
        let err = h.finish().await.expect_err("timed out");
        let elapsed = began.elapsed();
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
        assert!(elapsed >= timeout, "dropped after {elapsed:?}");
        assert!(elapsed < Duration::from_secs(3), "dropped only after {elapsed:?}");
    }
}

#[tokio::test]
async fn handshake_timeout_does_not_apply_to_transmission() {
    let mut h = start(nbd::server::ExportConfig { handshake_timeout: Duration::from_millis(100), ..config() });
    h.client.negotiate(false, false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.client.still_works(false).await;
}

#[tokio::test]
async fn shutdown_during_the_handshake_ends_the_session() {
    let mut h = start(config());
    h.client.begin_fixed().await;
    h.stop.send(true).unwrap();
    h.expect_clean_close().await;
}
