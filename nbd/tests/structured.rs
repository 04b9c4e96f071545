//! The transmission phase with structured replies and `base:allocation`.

mod common;

use common::*;
use nbd::base_allocation::{STATE_HOLE, STATE_ZERO};
use nbd::wire::{Chunk, Extent};
use nbd::{CommandFlags, ReplyFlags, cmd, errno, opt, rep, reply_type};

const HOLE: u32 = STATE_HOLE | STATE_ZERO;

async fn session(file: std::fs::File, base_allocation: bool) -> Harness {
    let mut h = start_with(file, config());
    h.client.negotiate(true, base_allocation).await;
    h
}

/// The one chunk a READ must produce, owned.
#[derive(Debug, PartialEq, Eq)]
enum ReadChunk {
    Data { offset: u64, data: Vec<u8> },
    Hole { offset: u64, length: u32 },
    Error { error: u32 },
}

/// READ with structured replies: exactly one chunk, flagged DONE.
async fn read_one_chunk(client: &mut Client, flags: CommandFlags, offset: u64, length: u32) -> ReadChunk {
    client.request(flags, cmd::READ, 0xabcd, offset, length).await;
    let chunks = client.chunks(0xabcd).await;
    assert_eq!(chunks.len(), 1, "one chunk: {chunks:?}");
    let (header, payload) = &chunks[0];
    assert_eq!(header.flags, ReplyFlags::DONE);
    match Chunk::decode(header.kind, payload).expect("chunk payload") {
        Chunk::OffsetData { offset, data } => ReadChunk::Data { offset, data: data.to_vec() },
        Chunk::OffsetHole { offset, length } => ReadChunk::Hole { offset, length },
        Chunk::Error { error, message } => {
            assert_eq!(payload.len(), 6 + message.len(), "error, message length, message");
            ReadChunk::Error { error }
        }
        other => panic!("unexpected chunk {other:?}"),
    }
}

#[tokio::test]
async fn read_of_data_is_one_offset_data_chunk() {
    let mut h = session(backing_file(), false).await;
    let (offset, len) = (MIB + 5, 100_000);
    let data = pattern(offset, len);
    assert_eq!(h.client.write_simple(CommandFlags::empty(), offset, &data).await, 0);
    for flags in [CommandFlags::empty(), CommandFlags::DF, CommandFlags::FUA] {
        let chunk = read_one_chunk(&mut h.client, flags, offset, len as u32).await;
        assert_eq!(chunk, ReadChunk::Data { offset, data: data.clone() });
    }
    // A read half data, half hole is still one OFFSET_DATA chunk.
    let chunk = read_one_chunk(&mut h.client, CommandFlags::DF, offset + len as u64 - 10, 20).await;
    let mixed = [&data[len - 10..], &[0; 10]].concat();
    assert_eq!(chunk, ReadChunk::Data { offset: offset + len as u64 - 10, data: mixed });
}

#[tokio::test]
async fn read_of_zeroes_is_one_offset_hole_chunk() {
    let mut h = session(file_with_data(0, 4096), false).await;
    for (offset, length) in [(MIB, 4096), (SIZE - 512, 512), (8 * MIB, 1 << 20)] {
        let chunk = read_one_chunk(&mut h.client, CommandFlags::empty(), offset, length).await;
        assert_eq!(chunk, ReadChunk::Hole { offset, length });
    }
    // Raw bytes: header (magic, DONE, type 2, cookie, length 12), offset, length.
    h.client.request(CommandFlags::empty(), cmd::READ, 7, 2 * MIB, 8192).await;
    let raw = h.client.recv(20 + 12).await;
    let expected = [
        &nbd::magic::STRUCTURED_REPLY.to_be_bytes()[..],
        &1u16.to_be_bytes(),
        &2u16.to_be_bytes(),
        &7u64.to_be_bytes(),
        &12u32.to_be_bytes(),
        &(2 * MIB).to_be_bytes(),
        &8192u32.to_be_bytes(),
    ]
    .concat();
    assert_eq!(raw, expected);
}

#[tokio::test]
async fn read_errors_are_error_chunks_with_done() {
    let mut h = session(backing_file(), false).await;
    let cases = [
        (CommandFlags::empty(), SIZE - 512, 1024),
        (CommandFlags::empty(), 0, MAX_PAYLOAD + 1),
        // Bad flags too: never a simple reply to READ once structured.
        (CommandFlags::NO_HOLE, 0, 512),
        (CommandFlags::from_bits_retain(1 << 7), 0, 512),
    ];
    for (flags, offset, length) in cases {
        let chunk = read_one_chunk(&mut h.client, flags, offset, length).await;
        assert_eq!(chunk, ReadChunk::Error { error: errno::EINVAL }, "flags {flags:#x} at {offset} for {length}");
    }
    h.client.still_works(true).await;
}

#[tokio::test]
async fn non_read_errors_may_stay_simple() {
    let mut h = session(backing_file(), false).await;
    assert_eq!(h.client.write_simple(CommandFlags::empty(), SIZE, &[1; 512]).await, errno::ENOSPC);
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::TRIM, SIZE, 512).await, errno::EINVAL);
    assert_eq!(h.client.command(CommandFlags::empty(), 9, 0, 512).await, errno::EINVAL);
    // BLOCK_STATUS without SET_META_CONTEXT, although structured replies are on.
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::BLOCK_STATUS, 0, 4096).await, errno::EINVAL);
}

/// BLOCK_STATUS: the extents of the single `base:allocation` chunk.
async fn block_status(client: &mut Client, flags: CommandFlags, offset: u64, length: u32) -> Vec<Extent> {
    client.request(flags, cmd::BLOCK_STATUS, 0xb5, offset, length).await;
    let chunks = client.chunks(0xb5).await;
    assert_eq!(chunks.len(), 1, "one chunk for one context: {chunks:?}");
    let (header, payload) = &chunks[0];
    assert_eq!(header.kind, reply_type::BLOCK_STATUS);
    match Chunk::decode(header.kind, payload).unwrap() {
        Chunk::BlockStatus { context_id, extents } => {
            assert_eq!(Some(context_id), client.context_id, "the id from SET_META_CONTEXT");
            assert!(!extents.is_empty() && extents.iter().all(|e| e.length > 0), "{extents:?}");
            extents
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn block_status_reports_hole_data_hole() {
    let mut h = session(file_with_data(MIB, 65536), true).await;
    let extents = block_status(&mut h.client, CommandFlags::empty(), 0, 4 << 20).await;
    let expected = [
        Extent { length: 1 << 20, flags: HOLE },
        Extent { length: 65536, flags: 0 },
        Extent { length: (3 << 20) - 65536, flags: HOLE },
    ];
    assert_eq!(extents, expected);
    // Starting inside the data.
    let extents = block_status(&mut h.client, CommandFlags::empty(), MIB + 4096, 65536).await;
    assert_eq!(extents, [Extent { length: 61440, flags: 0 }, Extent { length: 4096, flags: HOLE }]);
    // The end of the export.
    let extents = block_status(&mut h.client, CommandFlags::empty(), SIZE - 8192, 8192).await;
    assert_eq!(extents, [Extent { length: 8192, flags: HOLE }]);
}

#[tokio::test]
async fn block_status_req_one_gives_one_extent_within_the_request() {
    let mut h = session(file_with_data(MIB, 65536), true).await;
    let cases = [
        (0, 4 << 20, Extent { length: 1 << 20, flags: HOLE }),
        (0, 4096, Extent { length: 4096, flags: HOLE }),
        (MIB - 512, 4 << 20, Extent { length: 512, flags: HOLE }),
        (MIB, 4 << 20, Extent { length: 65536, flags: 0 }),
        (MIB + 512, 1024, Extent { length: 1024, flags: 0 }),
    ];
    for (offset, length, expected) in cases {
        let extents = block_status(&mut h.client, CommandFlags::REQ_ONE, offset, length).await;
        assert_eq!(extents, [expected], "at {offset} for {length}");
        assert!(extents[0].length <= length);
    }
}

#[tokio::test]
async fn block_status_bad_requests_are_einval() {
    let mut h = session(backing_file(), true).await;
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::BLOCK_STATUS, SIZE - 512, 1024).await, errno::EINVAL);
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::BLOCK_STATUS, 0, 0).await, errno::EINVAL);
    assert_eq!(h.client.command(CommandFlags::DF, cmd::BLOCK_STATUS, 0, 512).await, errno::EINVAL);
    block_status(&mut h.client, CommandFlags::empty(), 0, 512).await;
}

#[tokio::test]
async fn trim_makes_a_hole_visible_through_block_status() {
    let mut h = session(backing_file(), true).await;
    let data = pattern(MIB, 1 << 20);
    assert_eq!(h.client.write_simple(CommandFlags::empty(), MIB, &data).await, 0);
    let before = block_status(&mut h.client, CommandFlags::empty(), 0, 4 << 20).await;
    assert_eq!(before[1], Extent { length: 1 << 20, flags: 0 }, "{before:?}");
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::TRIM, MIB, 1 << 20).await, 0);
    let chunk = read_one_chunk(&mut h.client, CommandFlags::empty(), MIB, 1 << 20).await;
    assert_eq!(chunk, ReadChunk::Hole { offset: MIB, length: 1 << 20 }, "reads back as zeroes");
    assert_eq!(read_file(&h.file, MIB, 1 << 20), vec![0; 1 << 20]);
    // /tmp is ext4: the punched range is a hole, merged with its neighbours.
    let after = block_status(&mut h.client, CommandFlags::empty(), 0, 4 << 20).await;
    assert_eq!(after, [Extent { length: 4 << 20, flags: HOLE }]);
    let one = block_status(&mut h.client, CommandFlags::REQ_ONE, MIB, 1 << 20).await;
    assert_eq!(one, [Extent { length: 1 << 20, flags: HOLE }]);
}

#[tokio::test]
async fn write_zeroes_reads_back_as_a_hole_chunk() {
    let mut h = session(file_with_data(0, 1 << 20), true).await;
    for flags in [CommandFlags::empty(), CommandFlags::NO_HOLE] {
        assert_eq!(h.client.write_simple(CommandFlags::empty(), 0, &pattern(0, 65536)).await, 0);
        assert_eq!(h.client.command(flags, cmd::WRITE_ZEROES, 4096, 8192).await, 0);
        let chunk = read_one_chunk(&mut h.client, CommandFlags::empty(), 4096, 8192).await;
        assert_eq!(chunk, ReadChunk::Hole { offset: 4096, length: 8192 }, "flags {flags:#x}");
    }
}

#[tokio::test]
async fn a_failed_set_meta_context_clears_the_selection() {
    // "Issuing this command replaces all previously-set metadata contexts
    // (including when this command fails)."
    let mut h = start(config());
    h.client.begin_fixed().await;
    h.client.structured_replies().await;
    assert_eq!(h.client.set_meta_context(&["base:allocation"]).await.len(), 2);
    let replies = h.client.meta_context(opt::SET_META_CONTEXT, "other-export", &["base:allocation"]).await;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, rep::ERR_UNKNOWN);
    h.client.go().await;
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::BLOCK_STATUS, 0, 4096).await, errno::EINVAL);
}

#[tokio::test]
async fn set_meta_context_with_no_match_clears_the_selection() {
    let mut h = start(config());
    h.client.begin_fixed().await;
    h.client.structured_replies().await;
    assert_eq!(h.client.set_meta_context(&["base:allocation"]).await.len(), 2);
    assert_eq!(h.client.set_meta_context(&[]).await, [(rep::ACK, vec![])]);
    h.client.go().await;
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::BLOCK_STATUS, 0, 4096).await, errno::EINVAL);
}
