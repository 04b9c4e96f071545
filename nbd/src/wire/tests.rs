//! Tests for every encoding in [`crate::wire`].
//!
//! Each expected byte string below is written out by hand from the layouts in
//! NetworkBlockDevice/nbd `doc/proto.md` (all numbers big-endian); none of them
//! is produced by the encoder under test. Property tests at the bottom check
//! that no decoder panics on arbitrary input and that decode(encode(x)) == x.

use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::consts::{base_allocation, cmd, errno, info, limits, opt, rep};

// ------------------------------------------------------------------ helpers

/// Parses hex digits; spaces, newlines and `|` separate fields for reading.
fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace() && *b != b'|').collect();
    assert!(digits.len().is_multiple_of(2), "odd number of hex digits in {s:?}");
    digits
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).expect("ascii");
            u8::from_str_radix(pair, 16).unwrap_or_else(|_| panic!("bad hex {pair:?} in {s:?}"))
        })
        .collect()
}

/// Concatenates byte pieces (hex fields and literal strings).
fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn arr<const N: usize>(v: &[u8]) -> [u8; N] {
    v.try_into().unwrap_or_else(|_| panic!("expected {N} bytes, got {}", v.len()))
}

/// Splits one encoded chunk into its decoded header and payload, checking the
/// header's length field against the bytes that follow it.
fn split_chunk(buf: &[u8]) -> (ChunkHeader, &[u8]) {
    let (head, payload) = buf.split_at(ChunkHeader::SIZE);
    let header = ChunkHeader::decode(&arr(head)).expect("chunk header");
    assert_eq!(header.length as usize, payload.len(), "header length covers the payload");
    (header, payload)
}

fn chunk_bytes(flags: ReplyFlags, cookie: u64, chunk: &Chunk<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    put_chunk(&mut out, flags, cookie, chunk);
    out
}

/// put_chunk, then decode it back: header fields and payload must survive.
fn assert_chunk_round_trip(flags: ReplyFlags, cookie: u64, chunk: &Chunk<'_>) {
    let out = chunk_bytes(flags, cookie, chunk);
    let (header, payload) = split_chunk(&out);
    assert_eq!(header.flags, flags);
    assert_eq!(header.cookie, cookie);
    assert_eq!(&Chunk::decode(header.kind, payload).expect("chunk payload"), chunk);
}

// ---------------------------------------------------------------- handshake

#[test]
fn greeting_encodes_nbdmagic_ihaveopt_flags() {
    let g = Greeting { handshake_flags: HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES };
    let expected = hex("4e42444d41474943 | 49484156454f5054 | 0003");
    assert_eq!(g.encode().as_slice(), expected.as_slice());
    assert_eq!(&g.encode()[..16], b"NBDMAGICIHAVEOPT");
    assert_eq!(Greeting::SIZE, 18);
    assert_eq!(Greeting::decode(&g.encode()), Ok(g));

    let g = Greeting { handshake_flags: HandshakeFlags::from_bits_retain(0x8001) };
    assert_eq!(g.encode()[16..], hex("8001")[..]);
    assert_eq!(Greeting::decode(&g.encode()), Ok(g));
}

#[test]
fn greeting_rejects_bad_magics() {
    let mut buf = arr::<18>(&hex("4e42444d41474943 49484156454f5054 0001"));
    buf[0] = b'X';
    assert_eq!(
        Greeting::decode(&buf),
        Err(WireError::BadMagic { expected: magic::NBDMAGIC, found: 0x5842_444d_4147_4943 })
    );

    // An oldstyle server sends NBDMAGIC then the cliserv magic.
    let buf = arr::<18>(&hex("4e42444d41474943 0000420281861253 0000"));
    assert_eq!(
        Greeting::decode(&buf),
        Err(WireError::BadMagic { expected: magic::IHAVEOPT, found: magic::CLISERV_MAGIC })
    );
}

#[test]
fn option_header_encodes_ihaveopt_option_length() {
    let h = OptionHeader { option: opt::GO, length: 0x1234 };
    let expected = hex("49484156454f5054 | 00000007 | 00001234");
    assert_eq!(h.encode().as_slice(), expected.as_slice());
    assert_eq!(OptionHeader::SIZE, 16);
    assert_eq!(OptionHeader::decode(&h.encode()), Ok(h));

    let h = OptionHeader { option: opt::EXPORT_NAME, length: u32::MAX };
    assert_eq!(h.encode()[8..], hex("00000001 ffffffff")[..]);
    assert_eq!(OptionHeader::decode(&h.encode()), Ok(h));
}

#[test]
fn option_header_rejects_bad_magic() {
    // The option reply magic is not the request magic.
    let buf = arr::<16>(&hex("0003e889045565a9 00000007 00000000"));
    assert_eq!(
        OptionHeader::decode(&buf),
        Err(WireError::BadMagic { expected: magic::IHAVEOPT, found: magic::OPTION_REPLY })
    );
}

#[test]
fn option_reply_header_encodes_magic_option_reply_length() {
    let h = OptionReplyHeader { option: opt::GO, reply: rep::ERR_UNSUP, length: 12 };
    let expected = hex("0003e889045565a9 | 00000007 | 80000001 | 0000000c");
    assert_eq!(h.encode().as_slice(), expected.as_slice());
    assert_eq!(OptionReplyHeader::SIZE, 20);
    assert_eq!(OptionReplyHeader::decode(&h.encode()), Ok(h));

    let h = OptionReplyHeader { option: opt::LIST, reply: rep::SERVER, length: 0 };
    assert_eq!(h.encode()[8..], hex("00000003 00000002 00000000")[..]);
    assert_eq!(OptionReplyHeader::decode(&h.encode()), Ok(h));
}

#[test]
fn option_reply_header_rejects_bad_magic() {
    let buf = arr::<20>(&hex("49484156454f5054 00000007 00000001 00000000"));
    assert_eq!(
        OptionReplyHeader::decode(&buf),
        Err(WireError::BadMagic { expected: magic::OPTION_REPLY, found: magic::IHAVEOPT })
    );
}

#[test]
fn export_name_reply_without_zeroes_is_ten_bytes() {
    use TransmissionFlags as T;
    let r = ExportNameReply {
        size: 4 << 30,
        transmission_flags: T::HAS_FLAGS | T::SEND_FLUSH | T::SEND_FUA | T::CAN_MULTI_CONN,
    };
    let expected = hex("0000000100000000 | 010d");
    let out = r.encode(true);
    assert_eq!(out, expected);
    assert_eq!(ExportNameReply::decode(&arr(&out)), r);
}

#[test]
fn export_name_reply_with_zeroes_appends_124_zero_bytes() {
    let r = ExportNameReply {
        size: 0x0102_0304_0506_0708,
        transmission_flags: TransmissionFlags::from_bits_retain(0x0403),
    };
    let mut expected = hex("0102030405060708 | 0403");
    expected.extend_from_slice(&[0u8; 124]);
    let out = r.encode(false);
    assert_eq!(out.len(), 134);
    assert_eq!(out, expected);
    assert_eq!(ExportNameReply::decode(&arr(&out[..ExportNameReply::SIZE])), r);
}

// ------------------------------------------------------------ option data

#[test]
fn info_request_layout() {
    // 32-bit name length, name, 16-bit count, 16-bit info types.
    let req = InfoRequest { name: "disk".into(), requests: vec![info::NAME, info::BLOCK_SIZE] };
    let expected = cat(&[&hex("00000004"), b"disk", &hex("0002 | 0001 | 0003")]);
    assert_eq!(req.encode(), expected);
    assert_eq!(InfoRequest::decode(&expected), Ok(req));
}

#[test]
fn info_request_empty_name_and_list() {
    let req = InfoRequest { name: String::new(), requests: vec![] };
    let expected = hex("00000000 | 0000");
    assert_eq!(req.encode(), expected);
    assert_eq!(InfoRequest::decode(&expected), Ok(req));
}

#[test]
fn info_request_truncated_and_trailing() {
    let good = cat(&[&hex("00000004"), b"disk", &hex("0002 0001 0003")]);
    assert_eq!(InfoRequest::decode(&good[..good.len() - 1]), Err(WireError::Truncated { needed: 1 }));
    // Cut inside the name: 3 of the 4 name bytes present.
    assert_eq!(InfoRequest::decode(&good[..7]), Err(WireError::Truncated { needed: 1 }));
    // Cut inside the name length.
    assert_eq!(InfoRequest::decode(&good[..2]), Err(WireError::Truncated { needed: 2 }));
    assert_eq!(InfoRequest::decode(&[]), Err(WireError::Truncated { needed: 4 }));
    // No count at all.
    assert_eq!(InfoRequest::decode(&good[..8]), Err(WireError::Truncated { needed: 2 }));

    let mut long = good.clone();
    long.push(0);
    assert_eq!(InfoRequest::decode(&long), Err(WireError::TrailingBytes(1)));
}

#[test]
fn info_request_huge_name_length_is_refused_before_allocating() {
    // Claims a 4 GiB name in a 10-byte buffer.
    let buf = hex("ffffffff 6469736b 0000");
    assert_eq!(
        InfoRequest::decode(&buf),
        Err(WireError::TooLong {
            what: "export name",
            len: u64::from(u32::MAX),
            limit: u64::from(limits::MAX_STRING_LEN),
        })
    );
}

#[test]
fn info_request_name_length_limit_is_inclusive() {
    let max = limits::MAX_STRING_LEN as usize;
    let at_limit = InfoRequest { name: "a".repeat(max), requests: vec![] };
    assert_eq!(InfoRequest::decode(&at_limit.encode()), Ok(at_limit));

    let over = InfoRequest { name: "a".repeat(max + 1), requests: vec![] }.encode();
    assert_eq!(
        InfoRequest::decode(&over),
        Err(WireError::TooLong { what: "export name", len: max as u64 + 1, limit: max as u64 })
    );

    // Within the limit but not present: truncated, not too long.
    assert_eq!(InfoRequest::decode(&hex("00001000 61")), Err(WireError::Truncated { needed: 4095 }));
}

#[test]
fn info_request_huge_count_is_truncated() {
    // 0xffff requests claimed, one present.
    let buf = hex("00000000 | ffff | 0001");
    assert_eq!(InfoRequest::decode(&buf), Err(WireError::Truncated { needed: 2 * 0xffff - 2 }));
}

#[test]
fn info_request_non_utf8_name() {
    let buf = hex("00000002 | c328 | 0000");
    assert_eq!(InfoRequest::decode(&buf), Err(WireError::NotUtf8("export name")));
}

#[test]
fn meta_context_request_layout() {
    // 32-bit export length, export, 32-bit query count, (32-bit length, query)*.
    let req = MetaContextRequest { export: "vol".into(), queries: vec![base_allocation::NAME.into(), "qemu:".into()] };
    let expected = cat(&[
        &hex("00000003"),
        b"vol",
        &hex("00000002"),
        &hex("0000000f"),
        b"base:allocation",
        &hex("00000005"),
        b"qemu:",
    ]);
    assert_eq!(req.encode(), expected);
    assert_eq!(MetaContextRequest::decode(&expected), Ok(req));
}

#[test]
fn meta_context_request_no_queries() {
    let req = MetaContextRequest { export: String::new(), queries: vec![] };
    let expected = hex("00000000 | 00000000");
    assert_eq!(req.encode(), expected);
    assert_eq!(MetaContextRequest::decode(&expected), Ok(req));

    // An empty query string is still a query.
    let req = MetaContextRequest { export: "e".into(), queries: vec![String::new()] };
    let expected = cat(&[&hex("00000001"), b"e", &hex("00000001 00000000")]);
    assert_eq!(req.encode(), expected);
    assert_eq!(MetaContextRequest::decode(&expected), Ok(req));
}

#[test]
fn meta_context_request_huge_query_count_fails_fast() {
    // 2^32-1 queries claimed in a 12-byte buffer.
    let buf = cat(&[&hex("00000000"), &hex("ffffffff"), &hex("00000000")]);
    let start = Instant::now();
    assert_eq!(MetaContextRequest::decode(&buf), Err(WireError::Truncated { needed: 4 }));

    // Same claim over 512 bytes of zero-length queries: each costs 4 bytes,
    // so the loop ends when the data does, not after 2^32 iterations.
    let mut buf = hex("00000000 ffffffff");
    buf.resize(512, 0);
    assert_eq!(MetaContextRequest::decode(&buf), Err(WireError::Truncated { needed: 4 }));
    assert!(start.elapsed() < Duration::from_secs(1), "took {:?}", start.elapsed());
}

#[test]
fn meta_context_request_errors() {
    // Huge export name length.
    assert!(matches!(
        MetaContextRequest::decode(&hex("ffffffff 00000000")),
        Err(WireError::TooLong { what: "export name", .. })
    ));
    // Huge query length.
    assert_eq!(
        MetaContextRequest::decode(&hex("00000000 00000001 00001001")),
        Err(WireError::TooLong { what: "meta context query", len: 4097, limit: 4096 })
    );
    // Query cut short.
    assert_eq!(
        MetaContextRequest::decode(&cat(&[&hex("00000000 00000001 00000005"), b"base"])),
        Err(WireError::Truncated { needed: 1 })
    );
    // Non-UTF-8 query.
    assert_eq!(
        MetaContextRequest::decode(&hex("00000000 00000001 00000001 ff")),
        Err(WireError::NotUtf8("meta context query"))
    );
    // Non-UTF-8 export.
    assert_eq!(MetaContextRequest::decode(&hex("00000001 80 00000000")), Err(WireError::NotUtf8("export name")));
    // Trailing bytes after the last query.
    assert_eq!(MetaContextRequest::decode(&hex("00000000 00000000 abcd")), Err(WireError::TrailingBytes(2)));
    // Missing count.
    assert_eq!(MetaContextRequest::decode(&hex("00000000 0000")), Err(WireError::Truncated { needed: 2 }));
}

#[test]
fn info_reply_export() {
    // 16-bit NBD_INFO_EXPORT, 64-bit size, 16-bit flags: length 12.
    let r = InfoReply::Export { size: 1 << 30, transmission_flags: TransmissionFlags::from_bits_retain(0x0d03) };
    let expected = hex("0000 | 0000000040000000 | 0d03");
    assert_eq!(r.encode(), expected);
    assert_eq!(InfoReply::decode(&expected), Ok(r));
    assert_eq!(InfoReply::decode(&expected[..11]), Err(WireError::Truncated { needed: 1 }));
    let mut long = expected.clone();
    long.push(0);
    assert_eq!(InfoReply::decode(&long), Err(WireError::TrailingBytes(1)));
}

#[test]
fn info_reply_name_and_description() {
    // 16-bit type, then the string fills the rest (length - 2 bytes).
    let r = InfoReply::Name("disk".into());
    let expected = cat(&[&hex("0001"), b"disk"]);
    assert_eq!(r.encode(), expected);
    assert_eq!(InfoReply::decode(&expected), Ok(r));

    let r = InfoReply::Description("a volume".into());
    let expected = cat(&[&hex("0002"), b"a volume"]);
    assert_eq!(r.encode(), expected);
    assert_eq!(InfoReply::decode(&expected), Ok(r));

    // Empty strings are allowed (length exactly 2).
    assert_eq!(InfoReply::Name(String::new()).encode(), hex("0001"));
    assert_eq!(InfoReply::decode(&hex("0001")), Ok(InfoReply::Name(String::new())));
    assert_eq!(InfoReply::decode(&hex("0002")), Ok(InfoReply::Description(String::new())));

    assert_eq!(InfoReply::decode(&hex("0001 ff")), Err(WireError::NotUtf8("export name")));
    assert_eq!(InfoReply::decode(&hex("0002 c3")), Err(WireError::NotUtf8("description")));

    let mut too_long = hex("0002");
    too_long.resize(2 + limits::MAX_STRING_LEN as usize + 1, b'a');
    assert!(matches!(
        InfoReply::decode(&too_long),
        Err(WireError::TooLong { what: "description", len: 4097, limit: 4096 })
    ));
}

#[test]
fn info_reply_block_size() {
    // 16-bit type, then minimum, preferred, maximum as u32: length 14.
    let r = InfoReply::BlockSize {
        minimum: limits::MIN_BLOCK,
        preferred: limits::PREFERRED_BLOCK,
        maximum: limits::MAX_PAYLOAD,
    };
    let expected = hex("0003 | 00000001 | 00001000 | 02000000");
    assert_eq!(r.encode(), expected);
    assert_eq!(InfoReply::decode(&expected), Ok(r));
    assert_eq!(InfoReply::decode(&expected[..10]), Err(WireError::Truncated { needed: 4 }));
    let mut long = expected.clone();
    long.extend_from_slice(&[0, 0, 0]);
    assert_eq!(InfoReply::decode(&long), Err(WireError::TrailingBytes(3)));
}

#[test]
fn info_reply_unknown_is_ignored() {
    let r = InfoReply::Unknown { kind: 0x1234 };
    assert_eq!(r.encode(), hex("1234"));
    assert_eq!(InfoReply::decode(&hex("1234")), Ok(r.clone()));
    // Payloads of unknown types are skipped, whatever they hold.
    assert_eq!(InfoReply::decode(&hex("1234 deadbeef ff")), Ok(r));
    assert_eq!(InfoReply::decode(&hex("0004 00")), Ok(InfoReply::Unknown { kind: 4 }));
}

#[test]
fn info_reply_too_short_for_type() {
    assert_eq!(InfoReply::decode(&[]), Err(WireError::Truncated { needed: 2 }));
    assert_eq!(InfoReply::decode(&[0]), Err(WireError::Truncated { needed: 1 }));
}

#[test]
fn meta_context_reply_layout() {
    // 32-bit context id, then the name fills the rest.
    let r = MetaContextReply { id: 1, name: base_allocation::NAME.into() };
    let expected = cat(&[&hex("00000001"), b"base:allocation"]);
    assert_eq!(r.encode(), expected);
    assert_eq!(MetaContextReply::decode(&expected), Ok(r));

    let r = MetaContextReply { id: 0xfedc_ba98, name: String::new() };
    assert_eq!(r.encode(), hex("fedcba98"));
    assert_eq!(MetaContextReply::decode(&hex("fedcba98")), Ok(r));
}

#[test]
fn meta_context_reply_errors() {
    assert_eq!(MetaContextReply::decode(&hex("000001")), Err(WireError::Truncated { needed: 1 }));
    assert_eq!(MetaContextReply::decode(&hex("00000001 ff")), Err(WireError::NotUtf8("meta context name")));
    let mut long = hex("00000001");
    long.resize(4 + 4097, b'x');
    assert!(matches!(
        MetaContextReply::decode(&long),
        Err(WireError::TooLong { what: "meta context name", len: 4097, .. })
    ));
}

#[test]
fn server_reply_layout() {
    // 32-bit name length, name, then an optional description.
    let expected = cat(&[&hex("00000004"), b"disk"]);
    assert_eq!(encode_server_reply("disk"), expected);
    assert_eq!(decode_server_reply(&expected), Ok(("disk".into(), String::new())));

    assert_eq!(encode_server_reply(""), hex("00000000"));
    assert_eq!(decode_server_reply(&hex("00000000")), Ok((String::new(), String::new())));

    let with_desc = cat(&[&hex("00000004"), b"disk", b"my disk"]);
    assert_eq!(decode_server_reply(&with_desc), Ok(("disk".into(), "my disk".into())));
}

#[test]
fn server_reply_errors() {
    assert_eq!(decode_server_reply(&hex("000000")), Err(WireError::Truncated { needed: 1 }));
    assert_eq!(decode_server_reply(&cat(&[&hex("00000005"), b"disk"])), Err(WireError::Truncated { needed: 1 }));
    assert!(matches!(decode_server_reply(&hex("ffffffff 00")), Err(WireError::TooLong { what: "export name", .. })));
    assert_eq!(decode_server_reply(&hex("00000001 fe")), Err(WireError::NotUtf8("export name")));
    assert_eq!(decode_server_reply(&hex("00000001 61 fe")), Err(WireError::NotUtf8("description")));
}

// ------------------------------------------------------------ transmission

#[test]
fn request_layout() {
    // magic | flags | type | cookie | offset | length: 28 bytes.
    let req = Request {
        flags: CommandFlags::FUA,
        command: cmd::WRITE,
        cookie: 0x0102_0304_0506_0708,
        offset: 0x1122_3344_5566_7788,
        length: 0x0001_0000,
    };
    let expected = hex("25609513 | 0001 | 0001 | 0102030405060708 | 1122334455667788 | 00010000");
    assert_eq!(Request::SIZE, 28);
    assert_eq!(req.encode().as_slice(), expected.as_slice());
    assert_eq!(Request::decode(&req.encode()), Ok(req));

    let req = Request {
        flags: CommandFlags::REQ_ONE,
        command: cmd::BLOCK_STATUS,
        cookie: u64::MAX,
        offset: 0,
        length: u32::MAX,
    };
    let expected = hex("25609513 0008 0007 ffffffffffffffff 0000000000000000 ffffffff");
    assert_eq!(req.encode().as_slice(), expected.as_slice());
    assert_eq!(Request::decode(&req.encode()), Ok(req));
}

#[test]
fn request_rejects_bad_magic() {
    // Extended-header requests are refused by magic.
    let buf = arr::<28>(&hex("21e41c71 0000 0000 0000000000000000 0000000000000000 00000000"));
    assert_eq!(
        Request::decode(&buf),
        Err(WireError::BadMagic { expected: magic::REQUEST.into(), found: magic::EXTENDED_REQUEST.into() })
    );
}

#[test]
fn simple_reply_layout() {
    // magic | error | cookie: 16 bytes.
    let r = SimpleReply { error: errno::EIO, cookie: 0xdead_beef_cafe_f00d };
    let expected = hex("67446698 | 00000005 | deadbeefcafef00d");
    assert_eq!(SimpleReply::SIZE, 16);
    assert_eq!(r.encode().as_slice(), expected.as_slice());
    assert_eq!(SimpleReply::decode(&r.encode()), Ok(r));

    let r = SimpleReply { error: 0, cookie: 1 };
    assert_eq!(r.encode().as_slice(), hex("67446698 00000000 0000000000000001").as_slice());
    assert_eq!(SimpleReply::decode(&r.encode()), Ok(r));
}

#[test]
fn simple_reply_rejects_bad_magic() {
    let buf = arr::<16>(&hex("668e33ef 00000000 0000000000000001"));
    assert_eq!(
        SimpleReply::decode(&buf),
        Err(WireError::BadMagic { expected: magic::SIMPLE_REPLY.into(), found: magic::STRUCTURED_REPLY.into() })
    );
}

#[test]
fn chunk_header_layout() {
    // magic | flags | type | cookie | length: 20 bytes.
    let h = ChunkHeader { flags: ReplyFlags::DONE, kind: reply_type::OFFSET_DATA, cookie: 42, length: 0x1008 };
    let expected = hex("668e33ef | 0001 | 0001 | 000000000000002a | 00001008");
    assert_eq!(ChunkHeader::SIZE, 20);
    assert_eq!(h.encode().as_slice(), expected.as_slice());
    assert_eq!(ChunkHeader::decode(&h.encode()), Ok(h));
    assert!(h.is_done());

    let h = ChunkHeader {
        flags: ReplyFlags::from_bits_retain(0xfffe),
        kind: reply_type::ERROR_OFFSET,
        cookie: 0,
        length: 0,
    };
    let expected = hex("668e33ef fffe 8002 0000000000000000 00000000");
    assert_eq!(h.encode().as_slice(), expected.as_slice());
    assert_eq!(ChunkHeader::decode(&h.encode()), Ok(h));
    assert!(!h.is_done());
}

#[test]
fn chunk_header_rejects_bad_magic() {
    let buf = arr::<20>(&hex("67446698 0001 0000 0000000000000001 00000000"));
    assert_eq!(
        ChunkHeader::decode(&buf),
        Err(WireError::BadMagic { expected: magic::STRUCTURED_REPLY.into(), found: magic::SIMPLE_REPLY.into() })
    );
}

#[test]
fn chunk_none() {
    let out = chunk_bytes(ReplyFlags::DONE, 7, &Chunk::None);
    assert_eq!(out, hex("668e33ef | 0001 | 0000 | 0000000000000007 | 00000000"));
    assert_chunk_round_trip(ReplyFlags::DONE, 7, &Chunk::None);
    assert_eq!(Chunk::decode(reply_type::NONE, &[]), Ok(Chunk::None));
    assert_eq!(Chunk::decode(reply_type::NONE, &[0]), Err(WireError::TrailingBytes(1)));
}

#[test]
fn chunk_offset_data() {
    // 64-bit offset, then the data: length 8 + data.
    let chunk = Chunk::OffsetData { offset: 0x200, data: b"abc" };
    let out = chunk_bytes(ReplyFlags::empty(), 1, &chunk);
    let expected =
        cat(&[&hex("668e33ef | 0000 | 0001 | 0000000000000001 | 0000000b"), &hex("0000000000000200"), b"abc"]);
    assert_eq!(out, expected);
    assert_chunk_round_trip(ReplyFlags::empty(), 1, &chunk);
    assert_chunk_round_trip(ReplyFlags::DONE, u64::MAX, &Chunk::OffsetData { offset: 0, data: &[] });

    // The data is borrowed from the payload, not copied.
    let payload = &out[ChunkHeader::SIZE..];
    match Chunk::decode(reply_type::OFFSET_DATA, payload) {
        Ok(Chunk::OffsetData { data, .. }) => assert!(std::ptr::eq(data, &payload[8..])),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(Chunk::decode(reply_type::OFFSET_DATA, &hex("00000000000002")), Err(WireError::Truncated { needed: 1 }));
}

#[test]
fn chunk_offset_hole() {
    // 64-bit offset, 32-bit hole size: length 12.
    let chunk = Chunk::OffsetHole { offset: 0x1000, length: 0x2000 };
    let out = chunk_bytes(ReplyFlags::DONE, 3, &chunk);
    let expected = hex("668e33ef | 0001 | 0002 | 0000000000000003 | 0000000c | 0000000000001000 | 00002000");
    assert_eq!(out, expected);
    assert_chunk_round_trip(ReplyFlags::DONE, 3, &chunk);

    let payload = hex("0000000000001000 00002000");
    assert_eq!(Chunk::decode(reply_type::OFFSET_HOLE, &payload[..11]), Err(WireError::Truncated { needed: 1 }));
    let mut long = payload.clone();
    long.push(9);
    assert_eq!(Chunk::decode(reply_type::OFFSET_HOLE, &long), Err(WireError::TrailingBytes(1)));
}

#[test]
fn chunk_block_status() {
    // 32-bit context id, then (32-bit length, 32-bit flags) descriptors.
    let chunk = Chunk::BlockStatus {
        context_id: 1,
        extents: vec![
            Extent { length: 4096, flags: 0 },
            Extent { length: 8192, flags: base_allocation::STATE_HOLE | base_allocation::STATE_ZERO },
        ],
    };
    let out = chunk_bytes(ReplyFlags::DONE, 0x99, &chunk);
    let expected = hex("668e33ef | 0001 | 0005 | 0000000000000099 | 00000014
         | 00000001 | 00001000 00000000 | 00002000 00000003");
    assert_eq!(out, expected);
    assert_chunk_round_trip(ReplyFlags::DONE, 0x99, &chunk);
    assert_chunk_round_trip(ReplyFlags::empty(), 0, &Chunk::BlockStatus { context_id: 7, extents: vec![] });
}

#[test]
fn chunk_block_status_errors() {
    assert_eq!(Chunk::decode(reply_type::BLOCK_STATUS, &hex("000001")), Err(WireError::Truncated { needed: 1 }));
    // A partial descriptor: 5 of 8 bytes.
    assert_eq!(
        Chunk::decode(reply_type::BLOCK_STATUS, &hex("00000001 00001000 00")),
        Err(WireError::Truncated { needed: 3 })
    );
    assert_eq!(
        Chunk::decode(reply_type::BLOCK_STATUS, &hex("00000001 00001000 000000")),
        Err(WireError::Truncated { needed: 1 })
    );
}

#[test]
fn chunk_error() {
    // 32-bit error, 16-bit message length, message: length 6 + message.
    let chunk = Chunk::Error { error: errno::EINVAL, message: "bad".into() };
    let out = chunk_bytes(ReplyFlags::DONE, 5, &chunk);
    let expected =
        cat(&[&hex("668e33ef | 0001 | 8001 | 0000000000000005 | 00000009"), &hex("00000016 | 0003"), b"bad"]);
    assert_eq!(out, expected);
    assert_chunk_round_trip(ReplyFlags::DONE, 5, &chunk);

    let chunk = Chunk::Error { error: errno::EIO, message: String::new() };
    let out = chunk_bytes(ReplyFlags::DONE, 5, &chunk);
    let expected = hex("668e33ef 0001 8001 0000000000000005 00000006 | 00000005 | 0000");
    assert_eq!(out, expected);
    assert_chunk_round_trip(ReplyFlags::DONE, 5, &chunk);
}

#[test]
fn chunk_error_offset() {
    // 32-bit error, 16-bit message length, message, 64-bit offset: 14 + message.
    let chunk = Chunk::ErrorOffset { error: errno::EIO, message: "io".into(), offset: 0x1000 };
    let out = chunk_bytes(ReplyFlags::DONE, 6, &chunk);
    let expected = cat(&[
        &hex("668e33ef | 0001 | 8002 | 0000000000000006 | 00000010"),
        &hex("00000005 | 0002"),
        b"io",
        &hex("0000000000001000"),
    ]);
    assert_eq!(out, expected);
    assert_chunk_round_trip(ReplyFlags::DONE, 6, &chunk);

    let chunk = Chunk::ErrorOffset { error: errno::ENOSPC, message: String::new(), offset: 0 };
    let out = chunk_bytes(ReplyFlags::empty(), 6, &chunk);
    let expected = hex("668e33ef 0000 8002 0000000000000006 0000000e | 0000001c | 0000 | 0000000000000000");
    assert_eq!(out, expected);
    assert_chunk_round_trip(ReplyFlags::empty(), 6, &chunk);
}

#[test]
fn chunk_error_decode_errors() {
    let e = reply_type::ERROR;
    let eo = reply_type::ERROR_OFFSET;
    assert_eq!(Chunk::decode(e, &hex("00000005 00")), Err(WireError::Truncated { needed: 1 }));
    // Message length beyond the payload.
    assert_eq!(Chunk::decode(e, &cat(&[&hex("00000005 0004"), b"bad"])), Err(WireError::Truncated { needed: 1 }));
    // Message length above the 4096-byte string limit.
    assert_eq!(
        Chunk::decode(e, &hex("00000005 ffff 00")),
        Err(WireError::TooLong { what: "error message", len: 0xffff, limit: 4096 })
    );
    assert_eq!(Chunk::decode(e, &hex("00000005 0001 ff")), Err(WireError::NotUtf8("error message")));
    assert_eq!(Chunk::decode(e, &hex("00000005 0000 00")), Err(WireError::TrailingBytes(1)));
    // ERROR_OFFSET without its offset.
    assert_eq!(Chunk::decode(eo, &hex("00000005 0000")), Err(WireError::Truncated { needed: 8 }));
    assert_eq!(Chunk::decode(eo, &hex("00000005 0000 0000000000000001 00")), Err(WireError::TrailingBytes(1)));
}

#[test]
fn chunk_error_message_is_clipped_to_string_limit_on_char_boundary() {
    let max = limits::MAX_STRING_LEN as usize;

    let chunk = Chunk::Error { error: errno::EIO, message: "a".repeat(max + 100) };
    let out = chunk_bytes(ReplyFlags::empty(), 0, &chunk);
    let (header, payload) = split_chunk(&out);
    assert_eq!(payload[4..6], hex("1000")[..]);
    let expected = Chunk::Error { error: errno::EIO, message: "a".repeat(max) };
    assert_eq!(Chunk::decode(header.kind, payload), Ok(expected));

    // "é" is two bytes: 4096 lands between characters only for an even
    // count, so offset the string by one byte to force a split.
    let message = format!("x{}", "é".repeat(max));
    let chunk = Chunk::ErrorOffset { error: errno::EIO, message, offset: 9 };
    let out = chunk_bytes(ReplyFlags::empty(), 0, &chunk);
    let (header, payload) = split_chunk(&out);
    assert_eq!(payload[4..6], hex("0fff")[..]);
    let expected =
        Chunk::ErrorOffset { error: errno::EIO, message: format!("x{}", "é".repeat((max - 2) / 2)), offset: 9 };
    assert_eq!(Chunk::decode(header.kind, payload), Ok(expected));
}

#[test]
fn chunk_unknown() {
    let out = chunk_bytes(ReplyFlags::empty(), 2, &Chunk::Unknown { kind: 0x4000 });
    assert_eq!(out, hex("668e33ef | 0000 | 4000 | 0000000000000002 | 00000000"));
    assert_chunk_round_trip(ReplyFlags::empty(), 2, &Chunk::Unknown { kind: 0x4000 });
    // Unknown payloads are skipped, whatever they hold.
    assert_eq!(Chunk::decode(0x4000, b"whatever"), Ok(Chunk::Unknown { kind: 0x4000 }));
    // BLOCK_STATUS_EXT is not decoded by this library.
    assert_eq!(
        Chunk::decode(reply_type::BLOCK_STATUS_EXT, &hex("00")),
        Ok(Chunk::Unknown { kind: reply_type::BLOCK_STATUS_EXT })
    );
}

#[test]
fn put_chunk_appends_after_existing_bytes() {
    let mut out = b"prefix".to_vec();
    put_chunk(&mut out, ReplyFlags::empty(), 1, &Chunk::OffsetHole { offset: 0, length: 512 });
    put_chunk(&mut out, ReplyFlags::DONE, 1, &Chunk::None);
    assert_eq!(&out[..6], b"prefix");
    let first = &out[6..6 + ChunkHeader::SIZE + 12];
    let (h1, p1) = split_chunk(first);
    assert_eq!(h1.kind, reply_type::OFFSET_HOLE);
    assert_eq!(Chunk::decode(h1.kind, p1), Ok(Chunk::OffsetHole { offset: 0, length: 512 }));
    let (h2, p2) = split_chunk(&out[6 + first.len()..]);
    assert!(h2.is_done());
    assert_eq!(Chunk::decode(h2.kind, p2), Ok(Chunk::None));
}

#[test]
fn reader_primitives() {
    let mut r = Reader::new(&[0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x02]);
    assert_eq!(r.u16(), Ok(0x1234));
    assert_eq!(r.remaining(), 8);
    assert_eq!(r.u32(), Ok(0x5678_9abc));
    assert_eq!(r.u64(), Err(WireError::Truncated { needed: 4 }));
    // A failed read consumes nothing.
    assert_eq!(r.remaining(), 4);
    assert_eq!(r.bytes(2), Ok(&[0xde, 0xf0][..]));
    assert_eq!(r.rest(), &[1, 2]);
    assert_eq!(r.finish(), Ok(()));

    let mut r = Reader::new(&[0, 0, 0, 2, b'h', b'i', 0xff]);
    assert_eq!(r.prefixed_string("x"), Ok("hi".to_owned()));
    assert_eq!(r.finish(), Err(WireError::TrailingBytes(1)));

    assert_eq!(check_len("x", 10, 10), Ok(()));
    assert_eq!(check_len("x", 11, 10), Err(WireError::TooLong { what: "x", len: 11, limit: 10 }));
}

// ------------------------------------------------------------ properties

fn name() -> impl Strategy<Value = String> {
    "\\PC{0,64}"
}

/// Chunk types the decoder knows, mixed with arbitrary ones, so the known
/// paths are exercised far more often than 7 in 65536.
fn chunk_kind() -> impl Strategy<Value = u16> {
    prop_oneof![
        Just(reply_type::NONE),
        Just(reply_type::OFFSET_DATA),
        Just(reply_type::OFFSET_HOLE),
        Just(reply_type::BLOCK_STATUS),
        Just(reply_type::BLOCK_STATUS_EXT),
        Just(reply_type::ERROR),
        Just(reply_type::ERROR_OFFSET),
        any::<u16>(),
    ]
}

fn extent() -> impl Strategy<Value = Extent> {
    (any::<u32>(), any::<u32>()).prop_map(|(length, flags)| Extent { length, flags })
}

fn info_reply() -> impl Strategy<Value = InfoReply> {
    prop_oneof![
        (any::<u64>(), any::<u16>()).prop_map(|(size, flags)| InfoReply::Export {
            size,
            transmission_flags: TransmissionFlags::from_bits_retain(flags)
        }),
        name().prop_map(InfoReply::Name),
        name().prop_map(InfoReply::Description),
        (any::<u32>(), any::<u32>(), any::<u32>())
            .prop_map(|(minimum, preferred, maximum)| { InfoReply::BlockSize { minimum, preferred, maximum } }),
        (4u16..).prop_map(|kind| InfoReply::Unknown { kind }),
    ]
}

/// Patches `magic` into the front of `buf`.
fn with_magic<const N: usize>(mut buf: [u8; N], magic: &[u8]) -> [u8; N] {
    buf[..magic.len()].copy_from_slice(magic);
    buf
}

proptest! {
    // ---- no decoder panics on arbitrary bytes

    #[test]
    fn prop_variable_decoders_never_panic(buf in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = InfoRequest::decode(&buf);
        let _ = MetaContextRequest::decode(&buf);
        let _ = InfoReply::decode(&buf);
        let _ = MetaContextReply::decode(&buf);
        let _ = decode_server_reply(&buf);
    }

    #[test]
    fn prop_chunk_decode_never_panics(
        kind in chunk_kind(),
        buf in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let _ = Chunk::decode(kind, &buf);
    }

    /// Small length prefixes reach past the first field far more often than
    /// uniformly random bytes do.
    #[test]
    fn prop_decoders_never_panic_with_plausible_lengths(
        len in 0u32..64,
        count in prop_oneof![0u32..8, Just(u32::MAX), Just(0xffff)],
        kind in 0u16..5,
        rest in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut buf = len.to_be_bytes().to_vec();
        buf.extend_from_slice(&rest);
        let _ = decode_server_reply(&buf);
        let _ = InfoRequest::decode(&buf);
        let _ = MetaContextRequest::decode(&buf);
        let n = len.min(rest.len() as u32) as usize;
        let mut buf = len.to_be_bytes().to_vec();
        buf.extend_from_slice(&rest[..n]);
        buf.extend_from_slice(&count.to_be_bytes());
        buf.extend_from_slice(&rest[n..]);
        let _ = MetaContextRequest::decode(&buf);
        let _ = InfoRequest::decode(&buf);
        let mut buf = kind.to_be_bytes().to_vec();
        buf.extend_from_slice(&rest);
        let _ = InfoReply::decode(&buf);
    }

    #[test]
    fn prop_fixed_decoders_never_panic(
        g in any::<[u8; 18]>(),
        oh in any::<[u8; 16]>(),
        orh in any::<[u8; 20]>(),
        enr in any::<[u8; 10]>(),
        req in any::<[u8; 28]>(),
        sr in any::<[u8; 16]>(),
        ch in any::<[u8; 20]>(),
    ) {
        // Whatever decodes must re-encode to the same bytes.
        if let Ok(x) = Greeting::decode(&g) { prop_assert_eq!(x.encode(), g); }
        if let Ok(x) = OptionHeader::decode(&oh) { prop_assert_eq!(x.encode(), oh); }
        if let Ok(x) = OptionReplyHeader::decode(&orh) { prop_assert_eq!(x.encode(), orh); }
        prop_assert_eq!(ExportNameReply::decode(&enr).encode(true), enr.to_vec());
        if let Ok(x) = Request::decode(&req) { prop_assert_eq!(x.encode(), req); }
        if let Ok(x) = SimpleReply::decode(&sr) { prop_assert_eq!(x.encode(), sr); }
        if let Ok(x) = ChunkHeader::decode(&ch) { prop_assert_eq!(x.encode(), ch); }
    }

    /// With the right magic in place every fixed-size header decodes, and
    /// re-encodes to the very same bytes.
    #[test]
    fn prop_fixed_decoders_accept_any_body_after_magic(
        g in any::<[u8; 18]>(),
        oh in any::<[u8; 16]>(),
        orh in any::<[u8; 20]>(),
        req in any::<[u8; 28]>(),
        sr in any::<[u8; 16]>(),
        ch in any::<[u8; 20]>(),
    ) {
        let g = with_magic(g, b"NBDMAGICIHAVEOPT");
        prop_assert_eq!(Greeting::decode(&g).map(|x| x.encode()), Ok(g));
        let oh = with_magic(oh, b"IHAVEOPT");
        prop_assert_eq!(OptionHeader::decode(&oh).map(|x| x.encode()), Ok(oh));
        let orh = with_magic(orh, &magic::OPTION_REPLY.to_be_bytes());
        prop_assert_eq!(OptionReplyHeader::decode(&orh).map(|x| x.encode()), Ok(orh));
        let req = with_magic(req, &magic::REQUEST.to_be_bytes());
        prop_assert_eq!(Request::decode(&req).map(|x| x.encode()), Ok(req));
        let sr = with_magic(sr, &magic::SIMPLE_REPLY.to_be_bytes());
        prop_assert_eq!(SimpleReply::decode(&sr).map(|x| x.encode()), Ok(sr));
        let ch = with_magic(ch, &magic::STRUCTURED_REPLY.to_be_bytes());
        prop_assert_eq!(ChunkHeader::decode(&ch).map(|x| x.encode()), Ok(ch));
    }

    // ---- round trips

    #[test]
    fn prop_request_round_trip(
        flags in any::<u16>(),
        command in any::<u16>(),
        cookie in any::<u64>(),
        offset in any::<u64>(),
        length in any::<u32>(),
    ) {
        let req = Request { flags: CommandFlags::from_bits_retain(flags), command, cookie, offset, length };
        let buf = req.encode();
        prop_assert_eq!(&buf[..4], &magic::REQUEST.to_be_bytes()[..]);
        prop_assert_eq!(&buf[4..6], &flags.to_be_bytes()[..]);
        prop_assert_eq!(&buf[8..16], &cookie.to_be_bytes()[..]);
        prop_assert_eq!(Request::decode(&buf), Ok(req));
    }

    #[test]
    fn prop_simple_reply_round_trip(error in any::<u32>(), cookie in any::<u64>()) {
        let r = SimpleReply { error, cookie };
        prop_assert_eq!(SimpleReply::decode(&r.encode()), Ok(r));
    }

    #[test]
    fn prop_chunk_header_round_trip(
        flags in any::<u16>(),
        kind in any::<u16>(),
        cookie in any::<u64>(),
        length in any::<u32>(),
    ) {
        let h = ChunkHeader { flags: ReplyFlags::from_bits_retain(flags), kind, cookie, length };
        prop_assert_eq!(ChunkHeader::decode(&h.encode()), Ok(h));
        prop_assert_eq!(h.is_done(), flags & 1 == 1);
    }

    #[test]
    fn prop_option_headers_round_trip(option in any::<u32>(), reply in any::<u32>(), length in any::<u32>()) {
        let h = OptionHeader { option, length };
        prop_assert_eq!(OptionHeader::decode(&h.encode()), Ok(h));
        let h = OptionReplyHeader { option, reply, length };
        prop_assert_eq!(OptionReplyHeader::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn prop_greeting_and_export_name_reply_round_trip(
        flags in any::<u16>(),
        size in any::<u64>(),
        no_zeroes in any::<bool>(),
    ) {
        let g = Greeting { handshake_flags: HandshakeFlags::from_bits_retain(flags) };
        prop_assert_eq!(&g.encode()[16..], &flags.to_be_bytes()[..]);
        prop_assert_eq!(Greeting::decode(&g.encode()), Ok(g));
        let r = ExportNameReply { size, transmission_flags: TransmissionFlags::from_bits_retain(flags) };
        let buf = r.encode(no_zeroes);
        prop_assert_eq!(buf.len(), if no_zeroes { 10 } else { 134 });
        prop_assert!(buf[10..].iter().all(|&b| b == 0));
        prop_assert_eq!(ExportNameReply::decode(&arr(&buf[..10])), r);
    }

    #[test]
    fn prop_info_request_round_trip(
        name in name(),
        requests in prop::collection::vec(any::<u16>(), 0..=8),
    ) {
        let req = InfoRequest { name, requests };
        let buf = req.encode();
        prop_assert_eq!(buf.len(), 6 + req.name.len() + 2 * req.requests.len());
        prop_assert_eq!(InfoRequest::decode(&buf), Ok(req.clone()));
        // Every strict prefix is truncated; one extra byte is trailing.
        for cut in 0..buf.len() {
            let truncated = matches!(InfoRequest::decode(&buf[..cut]), Err(WireError::Truncated { .. }));
            prop_assert!(truncated, "prefix of {} bytes", cut);
        }
        let mut long = buf;
        long.push(0);
        prop_assert_eq!(InfoRequest::decode(&long), Err(WireError::TrailingBytes(1)));
    }

    #[test]
    fn prop_meta_context_request_round_trip(
        export in name(),
        queries in prop::collection::vec(name(), 0..=8),
    ) {
        let req = MetaContextRequest { export, queries };
        let buf = req.encode();
        prop_assert_eq!(MetaContextRequest::decode(&buf), Ok(req.clone()));
        for cut in 0..buf.len() {
            let truncated =
                matches!(MetaContextRequest::decode(&buf[..cut]), Err(WireError::Truncated { .. }));
            prop_assert!(truncated, "prefix of {} bytes", cut);
        }
        let mut long = buf;
        long.push(0);
        prop_assert_eq!(MetaContextRequest::decode(&long), Err(WireError::TrailingBytes(1)));
    }

    #[test]
    fn prop_info_reply_round_trip(r in info_reply()) {
        prop_assert_eq!(InfoReply::decode(&r.encode()), Ok(r));
    }

    #[test]
    fn prop_meta_context_reply_round_trip(id in any::<u32>(), name in name()) {
        let r = MetaContextReply { id, name };
        prop_assert_eq!(MetaContextReply::decode(&r.encode()), Ok(r));
    }

    #[test]
    fn prop_server_reply_round_trip(name in name(), description in name()) {
        let buf = encode_server_reply(&name);
        prop_assert_eq!(decode_server_reply(&buf), Ok((name.clone(), String::new())));
        let mut buf = buf;
        buf.extend_from_slice(description.as_bytes());
        prop_assert_eq!(decode_server_reply(&buf), Ok((name, description)));
    }

    #[test]
    fn prop_block_status_round_trip(
        flags in any::<u16>(),
        cookie in any::<u64>(),
        context_id in any::<u32>(),
        extents in prop::collection::vec(extent(), 0..64),
    ) {
        let flags = ReplyFlags::from_bits_retain(flags);
        let chunk = Chunk::BlockStatus { context_id, extents };
        let out = chunk_bytes(flags, cookie, &chunk);
        let Chunk::BlockStatus { extents, .. } = &chunk else { unreachable!() };
        prop_assert_eq!(out.len(), ChunkHeader::SIZE + 4 + 8 * extents.len());
        assert_chunk_round_trip(flags, cookie, &chunk);
    }

    #[test]
    fn prop_other_chunks_round_trip(
        flags in any::<u16>(),
        cookie in any::<u64>(),
        offset in any::<u64>(),
        length in any::<u32>(),
        error in any::<u32>(),
        message in name(),
        data in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let flags = ReplyFlags::from_bits_retain(flags);
        assert_chunk_round_trip(flags, cookie, &Chunk::None);
        assert_chunk_round_trip(flags, cookie, &Chunk::OffsetData { offset, data: &data });
        assert_chunk_round_trip(flags, cookie, &Chunk::OffsetHole { offset, length });
        assert_chunk_round_trip(flags, cookie, &Chunk::Error { error, message: message.clone() });
        assert_chunk_round_trip(flags, cookie, &Chunk::ErrorOffset { error, message, offset });
    }

    /// Error messages of any length survive put_chunk as valid UTF-8 of at
    /// most 4096 bytes that are a prefix of the original.
    #[test]
    fn prop_error_chunk_messages_are_clipped_to_a_valid_prefix(
        unit in "\\PC{1,8}",
        n in 0usize..3000,
    ) {
        let message = unit.repeat(n);
        let out = chunk_bytes(ReplyFlags::empty(), 0, &Chunk::Error { error: 1, message: message.clone() });
        let (header, payload) = split_chunk(&out);
        match Chunk::decode(header.kind, payload) {
            Ok(Chunk::Error { message: got, .. }) => {
                prop_assert!(got.len() <= limits::MAX_STRING_LEN as usize);
                prop_assert!(message.starts_with(&got));
                if message.len() <= limits::MAX_STRING_LEN as usize {
                    prop_assert_eq!(got, message);
                } else {
                    prop_assert!(got.len() > limits::MAX_STRING_LEN as usize - 4);
                }
            }
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }
}
