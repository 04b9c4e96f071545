//! Every decoder in `nbd::wire` on arbitrary bytes.
//!
//! Decoders must never panic or over-allocate. Where a decoder is lossless,
//! whatever it accepts must also encode back to exactly the bytes it read,
//! which catches fields read at the wrong offset or with the wrong width.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::ReplyFlags;
use nbd::wire::{
    Chunk, ChunkHeader, ExportNameReply, Greeting, InfoReply, InfoRequest, MetaContextReply, MetaContextRequest,
    OptionHeader, OptionReplyHeader, Request, SimpleReply, decode_server_reply, encode_server_reply, put_chunk,
};

/// The first `N` bytes as an array, if there are that many.
fn head<const N: usize>(data: &[u8]) -> Option<&[u8; N]> {
    data.get(..N).and_then(|b| b.try_into().ok())
}

/// Decodes a fixed-size message and checks it encodes back to the same bytes.
macro_rules! fixed {
    ($data:expr, $ty:ty) => {
        if let Some(buf) = head::<{ <$ty>::SIZE }>($data)
            && let Ok(msg) = <$ty>::decode(buf)
        {
            assert_eq!(&msg.encode(), buf, "{} round trip", stringify!($ty));
        }
    };
}

fuzz_target!(|data: &[u8]| {
    // Variable-length option data and option reply payloads.
    if let Ok(req) = InfoRequest::decode(data) {
        assert_eq!(req.encode(), data, "InfoRequest round trip");
    }
    if let Ok(req) = MetaContextRequest::decode(data) {
        assert_eq!(req.encode(), data, "MetaContextRequest round trip");
    }
    if let Ok(reply) = InfoReply::decode(data)
        && !matches!(reply, InfoReply::Unknown { .. })
    {
        assert_eq!(reply.encode(), data, "InfoReply round trip");
    }
    if let Ok(reply) = MetaContextReply::decode(data) {
        assert_eq!(reply.encode(), data, "MetaContextReply round trip");
    }
    if let Ok((name, description)) = decode_server_reply(data) {
        let mut again = encode_server_reply(&name);
        again.extend_from_slice(description.as_bytes());
        assert_eq!(again, data, "server reply round trip");
    }

    // A structured reply chunk: the first two bytes are its type.
    if let Some(&[a, b]) = head::<2>(data) {
        let kind = u16::from_be_bytes([a, b]);
        let payload = &data[2..];
        if let Ok(chunk) = Chunk::decode(kind, payload)
            && !matches!(chunk, Chunk::Unknown { .. })
        {
            let mut out = Vec::new();
            put_chunk(&mut out, ReplyFlags::empty(), 0, &chunk);
            let header = ChunkHeader::decode(head(&out).expect("chunk header")).expect("own chunk header");
            assert_eq!(header.kind, kind, "chunk type round trip");
            assert_eq!(header.length as usize, payload.len(), "chunk length round trip");
            assert_eq!(&out[ChunkHeader::SIZE..], payload, "chunk payload round trip");
        }
    }

    // Fixed-size headers, from the start of the input.
    fixed!(data, Greeting);
    fixed!(data, OptionHeader);
    fixed!(data, OptionReplyHeader);
    fixed!(data, Request);
    fixed!(data, SimpleReply);
    fixed!(data, ChunkHeader);
    if let Some(buf) = head::<{ ExportNameReply::SIZE }>(data) {
        let reply = ExportNameReply::decode(buf);
        assert_eq!(&reply.encode(true)[..], buf, "ExportNameReply round trip");
        assert_eq!(reply.encode(false).len(), ExportNameReply::SIZE + ExportNameReply::ZEROES);
    }
});
