//! The transmission phase with simple replies, plus the parts that behave
//! the same in both reply modes (pipelining, disconnect, shutdown).

mod common;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;

use common::*;
use nbd::wire::{Chunk, ChunkHeader, Request, SimpleReply};
use nbd::{CommandFlags, ErrorKind, cmd, errno, magic, reply_type};

async fn session() -> Harness {
    let mut h = start(config());
    assert_eq!(h.client.negotiate(false, false).await, DEFAULT_FLAGS);
    h
}

#[tokio::test]
async fn write_then_read_back_byte_exact() {
    let mut h = session().await;
    for (offset, len) in [(0, 512), (4096 + 7, 1), (MIB - 3, 70_000), (SIZE - 4096, 4096), (5 * MIB, 1 << 20)] {
        let data = pattern(offset, len);
        assert_eq!(h.client.write_simple(CommandFlags::empty(), offset, &data).await, 0);
        assert_eq!(
            h.client.read_simple(CommandFlags::empty(), offset, len as u32).await,
            Ok(data.clone()),
            "at {offset}"
        );
        assert_eq!(read_file(&h.file, offset, len), data, "file at {offset}");
    }
    // Reads around the written ranges see the zeroes of the sparse file.
    assert_eq!(h.client.read_simple(CommandFlags::empty(), 2 * MIB, 8192).await, Ok(vec![0; 8192]));
}

#[tokio::test]
async fn read_past_end_is_einval() {
    let mut h = session().await;
    for (offset, len) in [(SIZE - 512, 1024), (SIZE, 1), (u64::MAX - 10, 512)] {
        assert_eq!(h.client.read_simple(CommandFlags::empty(), offset, len).await, Err(errno::EINVAL));
    }
    // No payload followed the errors: the next reply parses.
    h.client.still_works(false).await;
}

#[tokio::test]
async fn write_past_end_is_enospc_and_the_connection_keeps_working() {
    let mut h = session().await;
    assert_eq!(h.client.write_simple(CommandFlags::empty(), SIZE - 100, &[1; 200]).await, errno::ENOSPC);
    assert_eq!(h.client.write_simple(CommandFlags::empty(), u64::MAX - 10, &[1; 200]).await, errno::ENOSPC);
    assert_eq!(
        h.client.read_simple(CommandFlags::empty(), SIZE - 100, 100).await,
        Ok(vec![0; 100]),
        "nothing was written"
    );
    assert_eq!(h.export.size(), SIZE);
    assert_eq!(h.file.metadata().unwrap().len(), SIZE, "the file did not grow");
}

#[tokio::test]
async fn trim_write_zeroes_and_cache_past_end_are_refused() {
    let mut h = session().await;
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::TRIM, SIZE - 4096, 8192).await, errno::EINVAL);
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::TRIM, u64::MAX, 1).await, errno::EINVAL);
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::WRITE_ZEROES, SIZE - 4096, 8192).await, errno::ENOSPC);
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::CACHE, SIZE, 4096).await, errno::EINVAL);
    h.client.still_works(false).await;
}

#[tokio::test]
async fn writes_on_a_read_only_export_are_eperm() {
    let file = file_with_data(0, 8192);
    let mut h = start_with(file, nbd::server::ExportConfig { read_only: true, ..config() });
    h.client.negotiate(false, false).await;
    assert_eq!(h.client.write_simple(CommandFlags::empty(), 0, &[0xff; 4096]).await, errno::EPERM);
    assert_eq!(h.client.write_simple(CommandFlags::FUA, 0, &[0xff; 4096]).await, errno::EPERM);
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::TRIM, 0, 4096).await, errno::EPERM);
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::WRITE_ZEROES, 0, 4096).await, errno::EPERM);
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::FLUSH, 0, 0).await, 0);
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::CACHE, 0, 4096).await, 0);
    assert_eq!(h.client.read_simple(CommandFlags::empty(), 0, 8192).await, Ok(pattern(0, 8192)), "data untouched");
}

#[tokio::test]
async fn unknown_commands_are_einval_and_the_connection_stays() {
    let mut h = session().await;
    for command in [9, cmd::RESIZE, 0x100, u16::MAX] {
        assert_eq!(h.client.command(CommandFlags::empty(), command, 0, 512).await, errno::EINVAL, "command {command}");
    }
    h.client.still_works(false).await;
}

#[tokio::test]
async fn unknown_flag_bits_are_einval() {
    let mut h = session().await;
    // Bit 7 is no command flag: kept on the wire, refused by the server.
    let bad = CommandFlags::from_bits_retain(1 << 7);
    assert_eq!(h.client.read_simple(bad, 0, 512).await, Err(errno::EINVAL));
    // The WRITE payload is consumed even though the request is refused.
    assert_eq!(h.client.write_simple(bad, 0, &[0xff; 4096]).await, errno::EINVAL);
    for command in [cmd::TRIM, cmd::WRITE_ZEROES, cmd::CACHE] {
        assert_eq!(h.client.command(bad, command, 0, 4096).await, errno::EINVAL, "command {command}");
    }
    // Flags documented for other commands are just as invalid.
    assert_eq!(h.client.read_simple(CommandFlags::REQ_ONE, 0, 512).await, Err(errno::EINVAL));
    assert_eq!(h.client.write_simple(CommandFlags::NO_HOLE, 0, &[0xff; 512]).await, errno::EINVAL);
    assert_eq!(h.client.command(CommandFlags::NO_HOLE, cmd::TRIM, 0, 4096).await, errno::EINVAL);
    assert_eq!(h.client.command(CommandFlags::DF, cmd::CACHE, 0, 4096).await, errno::EINVAL);
    assert_eq!(h.client.read_simple(CommandFlags::empty(), 0, 4096).await, Ok(vec![0; 4096]), "nothing was written");
}

#[tokio::test]
async fn no_hole_and_df_on_read_without_structured_replies_are_einval() {
    let mut h = session().await;
    assert_eq!(h.client.read_simple(CommandFlags::NO_HOLE, 0, 512).await, Err(errno::EINVAL));
    // DF is only valid once SEND_DF was advertised, after STRUCTURED_REPLY.
    assert_eq!(h.client.read_simple(CommandFlags::DF, 0, 512).await, Err(errno::EINVAL));
    // FUA is accepted on every command.
    assert_eq!(h.client.read_simple(CommandFlags::FUA, 0, 512).await, Ok(vec![0; 512]));
}

#[tokio::test]
async fn block_status_without_meta_context_is_einval() {
    let mut h = session().await;
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::BLOCK_STATUS, 0, 4096).await, errno::EINVAL);
    assert_eq!(h.client.command(CommandFlags::REQ_ONE, cmd::BLOCK_STATUS, 0, 4096).await, errno::EINVAL);
    h.client.still_works(false).await;
}

#[tokio::test]
async fn bad_request_magic_closes_the_connection() {
    for bad_magic in [magic::EXTENDED_REQUEST, 0x12560953, 0] {
        let mut h = session().await;
        let mut request =
            Request { flags: CommandFlags::empty(), command: cmd::READ, cookie: 1, offset: 0, length: 512 }.encode();
        request[..4].copy_from_slice(&bad_magic.to_be_bytes());
        h.client.send(&request).await;
        assert_eq!(h.client.read_to_eof().await, Vec::<u8>::new());
        let err = h.finish().await.expect_err("protocol violation");
        assert_eq!(err.kind(), ErrorKind::Protocol, "{err}");
    }
}

#[tokio::test]
async fn write_longer_than_32_mib_closes_the_connection() {
    let mut h = session().await;
    h.client.request(CommandFlags::empty(), cmd::WRITE, 1, 0, MAX_PAYLOAD + 1).await;
    h.client.send(&[0xff; 4096]).await;
    assert_eq!(h.client.read_to_eof().await, Vec::<u8>::new());
    h.finish().await.expect_err("refused payload");
}

#[tokio::test]
async fn read_longer_than_32_mib_is_einval_and_the_connection_stays() {
    let mut h = session().await;
    assert_eq!(h.client.read_simple(CommandFlags::empty(), 0, MAX_PAYLOAD + 1).await, Err(errno::EINVAL));
    assert_eq!(h.client.read_simple(CommandFlags::empty(), 0, u32::MAX).await, Err(errno::EINVAL));
    // Exactly the maximum payload is fine.
    assert_eq!(h.client.read_simple(CommandFlags::empty(), MIB, MAX_PAYLOAD).await.map(|d| d.len()), Ok(32 << 20));
}

#[tokio::test]
async fn flush_and_fua_write_succeed_and_reach_the_file() {
    let mut h = session().await;
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::FLUSH, 0, 0).await, 0);
    let data = pattern(3 * MIB, 65536);
    assert_eq!(h.client.write_simple(CommandFlags::FUA, 3 * MIB, &data).await, 0);
    assert_eq!(read_file(&h.file, 3 * MIB, 65536), data);
    assert_eq!(h.client.command(CommandFlags::FUA, cmd::FLUSH, 0, 0).await, 0);
    assert!(h.export.stats().flushes.load(std::sync::atomic::Ordering::Relaxed) >= 3);
}

#[tokio::test]
async fn trim_reads_back_as_zeroes_and_frees_the_blocks() {
    let mut h = session().await;
    let data = pattern(MIB, 1 << 20);
    assert_eq!(h.client.write_simple(CommandFlags::empty(), MIB, &data).await, 0);
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::FLUSH, 0, 0).await, 0);
    assert!(h.file.metadata().unwrap().blocks() >= 2048, "1 MiB allocated");
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::TRIM, MIB, 1 << 20).await, 0);
    assert_eq!(h.client.read_simple(CommandFlags::empty(), MIB, 1 << 20).await, Ok(vec![0; 1 << 20]));
    // /tmp is ext4 here: the range was punched out.
    assert_eq!(h.file.metadata().unwrap().blocks(), 0, "a hole was punched");
    assert_eq!(h.client.command(CommandFlags::FUA, cmd::TRIM, 0, 4096).await, 0, "TRIM with FUA");
}

#[tokio::test]
async fn write_zeroes_with_and_without_no_hole_reads_back_zeroes() {
    let mut h = session().await;
    let (offset, len) = (2 * MIB, 256 << 10);
    for flags in [
        CommandFlags::NO_HOLE,
        CommandFlags::empty(),
        CommandFlags::FUA,
        CommandFlags::NO_HOLE | CommandFlags::FAST_ZERO,
    ] {
        assert_eq!(
            h.client.write_simple(CommandFlags::empty(), offset - 512, &pattern(offset - 512, len + 1024)).await,
            0
        );
        assert_eq!(h.client.command(CommandFlags::empty(), cmd::FLUSH, 0, 0).await, 0);
        let blocks = h.file.metadata().unwrap().blocks();
        assert_eq!(h.client.command(flags, cmd::WRITE_ZEROES, offset, len as u32).await, 0, "flags {flags:#x}");
        assert_eq!(
            h.client.read_simple(CommandFlags::empty(), offset, len as u32).await,
            Ok(vec![0; len]),
            "flags {flags:#x}"
        );
        // The bytes just outside the range are untouched.
        assert_eq!(read_file(&h.file, offset - 512, 512), pattern(offset - 512, 512));
        assert_eq!(read_file(&h.file, offset + len as u64, 512), pattern(offset + len as u64, 512));
        let after = h.file.metadata().unwrap().blocks();
        if flags.contains(CommandFlags::NO_HOLE) {
            assert_eq!(after, blocks, "NO_HOLE keeps the range allocated (flags {flags:#x})");
        } else {
            assert!(after < blocks, "without NO_HOLE the range may be, and on ext4 is, punched");
        }
    }
}

#[tokio::test]
async fn cache_succeeds() {
    let mut h = start_with(file_with_data(0, 1 << 20), config());
    h.client.negotiate(false, false).await;
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::CACHE, 0, 1 << 20).await, 0);
    assert_eq!(
        h.client.command(CommandFlags::empty(), cmd::CACHE, 8 * MIB, (SIZE - 4 * MIB) as u32).await,
        errno::EINVAL
    );
    assert_eq!(h.client.command(CommandFlags::FUA, cmd::CACHE, 0, 4096).await, 0);
    assert_eq!(h.client.read_simple(CommandFlags::empty(), 0, 4096).await, Ok(pattern(0, 4096)));
}

// ------------------------------------------------------------ pipelining

enum Expect {
    Data(Vec<u8>),
    Zeroes(usize),
    Status,
}

/// Reads one reply of either kind; returns its cookie and, for READ, data.
async fn any_reply(client: &mut Client, expected: &HashMap<u64, Expect>) -> (u64, Option<Vec<u8>>) {
    let head = client.recv(4).await;
    let magic = u32::from_be_bytes(head[..4].try_into().unwrap());
    if magic == nbd::magic::SIMPLE_REPLY {
        let raw = [head, client.recv(12).await].concat();
        let reply = SimpleReply::decode(&raw.try_into().unwrap()).unwrap();
        assert_eq!(reply.error, 0, "cookie {:#x}", reply.cookie);
        let data = match expected.get(&reply.cookie) {
            Some(Expect::Data(d)) => Some(client.recv(d.len()).await),
            Some(Expect::Zeroes(n)) => Some(client.recv(*n).await),
            _ => None,
        };
        return (reply.cookie, data);
    }
    let raw = [head, client.recv(16).await].concat();
    let header = ChunkHeader::decode(&raw.try_into().unwrap()).unwrap();
    assert!(header.is_done(), "one chunk per READ");
    let payload = client.recv(header.length as usize).await;
    let data = match Chunk::decode(header.kind, &payload).unwrap() {
        Chunk::OffsetData { data, .. } => data.to_vec(),
        Chunk::OffsetHole { length, .. } => vec![0; length as usize],
        other => panic!("unexpected chunk {other:?}"),
    };
    assert_eq!(header.kind == reply_type::OFFSET_HOLE, data.iter().all(|&b| b == 0));
    (header.cookie, Some(data))
}

async fn many_requests_in_flight(structured: bool) {
    let mut h = start_with(file_with_data(0, 1 << 20), config());
    h.client.negotiate(structured, false).await;
    let mut batch = Vec::new();
    let mut expected = HashMap::new();
    let mut cookies = Vec::new();
    for i in 0..128u64 {
        // Distinct, scattered cookies, with the high bits used.
        let cookie = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i + 1);
        let (flags, command, offset, length, expect) = match i % 8 {
            0 | 4 => (CommandFlags::empty(), cmd::READ, i * 4096, 4096, Expect::Data(pattern(i * 4096, 4096))),
            1 | 5 => (
                if i % 8 == 1 { CommandFlags::FUA } else { CommandFlags::empty() },
                cmd::WRITE,
                8 * MIB + i * 4096,
                4096,
                Expect::Status,
            ),
            2 => (CommandFlags::empty(), cmd::FLUSH, 0, 0, Expect::Status),
            3 | 7 => (CommandFlags::empty(), cmd::READ, 32 * MIB + i * 512, 512, Expect::Zeroes(512)),
            _ => (CommandFlags::empty(), cmd::CACHE, i * 4096, 4096, Expect::Status),
        };
        batch.extend_from_slice(&Request { flags, command, cookie, offset, length }.encode());
        if command == cmd::WRITE {
            batch.extend_from_slice(&pattern(offset, 4096));
        }
        expected.insert(cookie, expect);
        cookies.push(cookie);
    }
    // Every request goes out before any reply is read.
    h.client.send(&batch).await;
    let mut echoed = Vec::new();
    for _ in 0..128 {
        let (cookie, data) = any_reply(&mut h.client, &expected).await;
        match (expected.get(&cookie), data) {
            (Some(Expect::Data(want)), Some(got)) => assert_eq!(&got, want, "cookie {cookie:#x}"),
            (Some(Expect::Zeroes(n)), Some(got)) => assert_eq!(got, vec![0; *n], "cookie {cookie:#x}"),
            (Some(Expect::Status), None) => {}
            (None, _) => panic!("reply for a cookie never sent: {cookie:#x}"),
            (Some(_), data) => panic!("wrong kind of reply for {cookie:#x}: {data:?}"),
        }
        echoed.push(cookie);
    }
    assert_each_cookie_once(&cookies, &echoed);
    for i in (1..128).step_by(4) {
        assert_eq!(read_file(&h.file, 8 * MIB + i * 4096, 4096), pattern(8 * MIB + i * 4096, 4096));
    }
    h.client.still_works(structured).await;
}

#[tokio::test]
async fn many_requests_in_flight_simple() {
    many_requests_in_flight(false).await;
}

#[tokio::test]
async fn many_requests_in_flight_structured() {
    many_requests_in_flight(true).await;
}

#[tokio::test]
async fn disc_finishes_in_flight_requests_then_closes() {
    let mut h = start_with(file_with_data(0, 1 << 20), config());
    h.client.negotiate(false, false).await;
    let mut batch = Vec::new();
    for i in 0..16u64 {
        batch.extend_from_slice(
            &Request { flags: CommandFlags::empty(), command: cmd::READ, cookie: i, offset: i << 16, length: 65536 }
                .encode(),
        );
    }
    let data = pattern(4 * MIB, 65536);
    batch.extend_from_slice(
        &Request { flags: CommandFlags::FUA, command: cmd::WRITE, cookie: 16, offset: 4 * MIB, length: 65536 }.encode(),
    );
    batch.extend_from_slice(&data);
    batch.extend_from_slice(
        &Request { flags: CommandFlags::empty(), command: cmd::FLUSH, cookie: 17, offset: 0, length: 0 }.encode(),
    );
    batch.extend_from_slice(
        &Request { flags: CommandFlags::empty(), command: cmd::DISC, cookie: 18, offset: 0, length: 0 }.encode(),
    );
    h.client.send(&batch).await;
    let mut echoed = Vec::new();
    for _ in 0..18 {
        let reply = h.client.simple().await;
        assert_eq!(reply.error, 0);
        if reply.cookie < 16 {
            assert_eq!(h.client.recv(65536).await, pattern(reply.cookie << 16, 65536));
        }
        echoed.push(reply.cookie);
    }
    assert_each_cookie_once(&(0..18).collect::<Vec<_>>(), &echoed);
    assert_eq!(read_file(&h.file, 4 * MIB, 65536), data);
    // No reply to DISC itself: the server closes.
    h.expect_clean_close().await;
}

#[tokio::test]
async fn shutdown_signal_ends_serve_stream() {
    for structured in [false, true] {
        let mut h = start(config());
        h.client.negotiate(structured, false).await;
        h.client.still_works(structured).await;
        h.stop.send(true).unwrap();
        h.expect_clean_close().await;
    }
}
