use super::*;
use proptest::prelude::*;

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

fn request(authority: &str, path: &str) -> Fields {
    [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("user-agent", "grpc-python/1.85.3 grpc-c/52.0.0 (linux; chttp2)"),
    ]
    .iter()
    .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
    .collect()
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_frame(&mut out, kind, flags, stream, &[payload]);
    out
}

/// What a client sends: the preface, SETTINGS, then each request as a
/// HEADERS frame (from one HPACK encoder with a dynamic table, as real
/// clients use) and a DATA frame.
fn client_bytes(requests: &[Fields]) -> Vec<u8> {
    let mut encoder = Encoder::new();
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[0, 2, 0, 0, 0, 0]));
    for (i, fields) in requests.iter().enumerate() {
        let stream = 1 + 2 * i as u32;
        let block = encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        bytes.extend(frame(HEADERS, END_HEADERS, stream, &block));
        bytes.extend(frame(0x0, END_STREAM, stream, &[0, 0, 0, 0, 0]));
    }
    bytes
}

#[derive(Debug, PartialEq)]
enum Seen {
    Frame { kind: u8, flags: u8, stream: u32, payload: Vec<u8> },
    Headers { stream: u32, end_stream: bool, fields: Fields },
}

/// What a server reads: frames, with header blocks decoded by one decoder.
fn server_view(bytes: &[u8]) -> Vec<Seen> {
    assert!(bytes.starts_with(PREFACE));
    let mut rest = &bytes[PREFACE.len()..];
    let mut decoder = Decoder::new();
    let mut seen = Vec::new();
    let mut block: Option<(u32, bool, Vec<u8>)> = None;
    while !rest.is_empty() {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let (kind, flags) = (rest[3], rest[4]);
        let stream = u32::from_be_bytes(rest[5..9].try_into().unwrap());
        assert!(len <= MAX_FRAME_PAYLOAD, "frame of {len} bytes");
        let payload = rest[9..9 + len].to_vec();
        rest = &rest[9 + len..];
        match kind {
            HEADERS => {
                assert_eq!(flags & PADDED, 0);
                let skip = if flags & PRIORITY != 0 { PRIORITY_LEN } else { 0 };
                block = Some((stream, flags & END_STREAM != 0, payload[skip..].to_vec()));
            }
            CONTINUATION => block.as_mut().unwrap().2.extend(payload),
            _ => {
                assert!(block.is_none(), "a frame inside a header block");
                seen.push(Seen::Frame { kind, flags, stream, payload });
                continue;
            }
        }
        if flags & END_HEADERS != 0 {
            let (stream, end_stream, bytes) = block.take().unwrap();
            let fields = decoder.decode(&bytes).expect("the server decodes every block");
            seen.push(Seen::Headers { stream, end_stream, fields });
        }
    }
    assert!(block.is_none(), "an unfinished header block");
    seen
}

fn rewrite_all(bytes: &[u8]) -> Vec<u8> {
    let mut rewriter = AuthorityRewriter::default();
    let mut out = Vec::new();
    rewriter.feed(bytes, &mut out).unwrap();
    out
}

fn authority(seen: &Seen) -> &[u8] {
    let Seen::Headers { fields, .. } = seen else { panic!("not headers: {seen:?}") };
    &fields.iter().find(|(n, _)| n == b":authority").unwrap().1
}

#[test]
fn a_socket_path_authority_becomes_localhost_and_nothing_else_changes() {
    let requests = [
        request("/run/csi/csi.sock", "/csi.v1.Identity/GetPluginInfo"),
        request("/run/csi/csi.sock", "/csi.v1.Identity/Probe"),
        request("localhost:50051", "/csi.v1.Controller/ListVolumes"),
    ];
    let sent = client_bytes(&requests);
    let mut rewriter = AuthorityRewriter::default();
    let mut out = Vec::new();
    rewriter.feed(&sent, &mut out).unwrap();
    assert_eq!(rewriter.rewritten(), 2);
    let seen = server_view(&out);
    let before = server_view(&sent);
    assert_eq!(seen.len(), before.len());
    for (i, (after, before)) in seen.iter().zip(&before).enumerate() {
        match (after, before) {
            (
                Seen::Headers { fields: a, stream: sa, end_stream: ea },
                Seen::Headers { fields: b, stream: sb, end_stream: eb },
            ) => {
                assert_eq!((sa, ea), (sb, eb));
                let expected = if i < 4 { LOCAL_AUTHORITY } else { b"localhost:50051".as_slice() };
                assert_eq!(authority(after), expected);
                let others = |f: &Fields| f.iter().filter(|(n, _)| n != b":authority").cloned().collect::<Vec<_>>();
                assert_eq!(others(a), others(b), "every other header as sent, in order");
            }
            _ => assert_eq!(after, before, "frames other than HEADERS pass unchanged"),
        }
    }
    // The client's encoder indexed the second request against the first:
    // the client's bytes are shorter than the re-encoded ones, yet both decode.
    assert!(out.len() > sent.len());
}

#[test]
fn padded_priority_and_continuation_frames_are_reassembled() {
    let mut encoder = Encoder::new();
    let block = encoder
        .encode(request("/run/abstract socket", "/csi.v1.Node/NodeGetInfo").iter().map(|(n, v)| (&n[..], &v[..])));
    let (a, b) = block.split_at(block.len() / 2);
    let mut headers = vec![3u8]; // pad length
    headers.extend([0x80, 0, 0, 0, 15]); // exclusive dependency on stream 0, weight 16
    headers.extend(a);
    headers.extend([0, 0, 0]);
    let mut sent = PREFACE.to_vec();
    sent.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &headers));
    sent.extend(frame(CONTINUATION, END_HEADERS, 5, b));
    let out = rewrite_all(&sent);
    // PRIORITY survives, padding does not.
    assert_eq!(out[PREFACE.len() + 4], PRIORITY | END_STREAM | END_HEADERS);
    assert_eq!(&out[PREFACE.len() + 9..PREFACE.len() + 14], &[0x80, 0, 0, 0, 15]);
    let seen = server_view(&out);
    assert_eq!(seen.len(), 1);
    assert_eq!(authority(&seen[0]), LOCAL_AUTHORITY);
    let Seen::Headers { stream, end_stream, .. } = &seen[0] else { unreachable!() };
    assert_eq!((*stream, *end_stream), (5, true));
}

#[test]
fn a_block_larger_than_one_frame_leaves_as_continuations() {
    let mut fields = request("/tmp/csi.sock", "/csi.v1.Controller/CreateVolume");
    fields.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
    let out = rewrite_all(&client_bytes(&[fields.clone()]));
    let seen = server_view(&out);
    let Seen::Headers { fields: got, .. } = &seen[1] else { panic!("{:?}", seen[1]) };
    assert_eq!(got.last().unwrap(), fields.last().unwrap());
    assert_eq!(authority(&seen[1]), LOCAL_AUTHORITY);
    let continuations = out.windows(9).filter(|w| w[3] == CONTINUATION && w[5..9] == 1u32.to_be_bytes()).count();
    assert!(continuations >= 2, "40 kB needs three frames of at most 16 KiB");
}

#[test]
fn bytes_that_are_not_http2_pass_through() {
    let sent = b"GET / HTTP/1.1\r\nHost: /tmp/sock\r\n\r\n";
    assert_eq!(rewrite_all(sent), sent);
}

#[test]
fn broken_header_sequences_close_the_connection() {
    let mut rewriter = AuthorityRewriter::default();
    let mut out = Vec::new();
    let mut sent = PREFACE.to_vec();
    sent.extend(frame(HEADERS, 0, 1, &[0x82]));
    sent.extend(frame(0x0, 0, 1, b"data"));
    assert_eq!(rewriter.feed(&sent, &mut out), Err(RewriteError::Framing("a frame interrupted a header block")));

    let mut sent = PREFACE.to_vec();
    sent.extend(frame(CONTINUATION, END_HEADERS, 1, &[0x82]));
    let mut out = Vec::new();
    assert!(AuthorityRewriter::default().feed(&sent, &mut out).is_err());

    let mut sent = PREFACE.to_vec();
    let piece = vec![0u8; MAX_FRAME_PAYLOAD];
    sent.extend(frame(HEADERS, 0, 1, &piece));
    for _ in 0..MAX_HEADER_BLOCK / MAX_FRAME_PAYLOAD {
        sent.extend(frame(CONTINUATION, 0, 1, &piece));
    }
    let mut out = Vec::new();
    assert_eq!(AuthorityRewriter::default().feed(&sent, &mut out), Err(RewriteError::HeaderBlockTooLarge));

    let mut sent = PREFACE.to_vec();
    sent.extend(frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82]));
    let mut out = Vec::new();
    assert!(AuthorityRewriter::default().feed(&sent, &mut out).is_err(), "padding past the payload");

    let mut sent = PREFACE.to_vec();
    sent.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff, 0x7f]));
    let mut out = Vec::new();
    assert!(matches!(AuthorityRewriter::default().feed(&sent, &mut out), Err(RewriteError::Hpack(_))));
}

#[test]
fn finish_forwards_a_partial_frame() {
    let mut sent = PREFACE.to_vec();
    sent.extend(&frame(HEADERS, END_HEADERS, 1, &[0x82, 0x86])[..10]);
    let mut rewriter = AuthorityRewriter::default();
    let mut out = Vec::new();
    rewriter.feed(&sent, &mut out).unwrap();
    assert_eq!(out, PREFACE);
    rewriter.finish(&mut out);
    assert_eq!(out, sent, "what was held goes to the server as it came");
}

proptest! {
    /// However the bytes are cut into reads, the server sees the same thing.
    #[test]
    fn any_split_into_reads_gives_the_same_bytes(cuts in proptest::collection::vec(1usize..700, 1..40)) {
        let sent = client_bytes(&[
            request("/var/lib/kubelet/plugins/nbd.csi.dev/csi.sock", "/csi.v1.Node/NodeStageVolume"),
            request("unix:%2Ftmp%2Fx", "/csi.v1.Node/NodeGetCapabilities"),
        ]);
        let whole = rewrite_all(&sent);
        let mut rewriter = AuthorityRewriter::default();
        let mut out = Vec::new();
        let mut rest = &sent[..];
        for cut in cuts.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (piece, tail) = rest.split_at((*cut).min(rest.len()));
            rewriter.feed(piece, &mut out).unwrap();
            rest = tail;
        }
        prop_assert_eq!(out, whole);
    }
}
