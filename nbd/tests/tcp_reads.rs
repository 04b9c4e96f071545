//! READs over a real TCP connection, where large data leaves the server by
//! sendfile(2) instead of through its memory: every size around the
//! threshold up to the payload limit, pipelined with small reads and
//! writes, with simple and with structured replies.

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use nbd::client::{HandshakeOptions, handshake};
use nbd::server::{Export, ExportConfig, Server};
use nbd::wire::{ChunkHeader, Request, SimpleReply};
use nbd::{CommandFlags, ReplyFlags, cmd, reply_type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SIZE: u64 = 80 << 20;
const NAME: &str = "vol";

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(|pos| ((pos * 7) % 253) as u8 ^ 0xa5).collect()
}

async fn server() -> (SocketAddr, tempfile::NamedTempFile, tokio::sync::oneshot::Sender<()>) {
    let file = tempfile::NamedTempFile::new().unwrap();
    let f = File::options().write(true).open(file.path()).unwrap();
    for chunk in 0..SIZE / (8 << 20) {
        let offset = chunk * (8 << 20);
        f.write_all_at(&pattern(offset, 8 << 20), offset).unwrap();
    }
    let export = Export::open(file.path(), ExportConfig::new(NAME)).unwrap();
    let server = Server::bind(export, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = server.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    (addr, file, stop)
}

/// (offset, length) of the reads: both sides of the sendfile threshold,
/// odd offsets and lengths, the payload limit, the very end of the export.
fn reads() -> Vec<(u64, u32)> {
    let k = 1024u32;
    vec![
        (0, 4 * k),
        (1, 64 * k - 1),
        (3, 64 * k),
        (12345, 64 * k + 1),
        (1 << 20, 1 << 20),
        (7, 512),
        (5 << 20, (3 << 20) + 17),
        (SIZE - (32 << 20), 32 << 20),
        (SIZE - 65536, 65536),
        (99, 1),
    ]
}

async fn read_exact(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(20), stream.read_exact(&mut buf)).await.expect("reply in time").unwrap();
    buf
}

/// Sends every read at once, then checks each reply (in order: a READ is
/// answered by the connection's single writer in request order).
async fn pipelined_reads(structured: bool) {
    let (addr, _file, _stop) = server().await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let opts = HandshakeOptions { export_name: NAME.into(), structured_replies: structured };
    let export = handshake(&mut stream, &opts).await.unwrap();
    assert_eq!((export.size, export.structured_replies), (SIZE, structured));

    // A write first: its acknowledged data must be what a later READ sends.
    let written = vec![0xeeu8; 100_000];
    let offset_written = 2 << 20;
    let write = Request {
        flags: CommandFlags::empty(),
        command: cmd::WRITE,
        cookie: 1000,
        offset: offset_written,
        length: 100_000,
    };
    stream.write_all(&write.encode()).await.unwrap();
    stream.write_all(&written).await.unwrap();
    let reply = SimpleReply::decode(&read_exact(&mut stream, SimpleReply::SIZE).await.try_into().unwrap()).unwrap();
    assert_eq!((reply.cookie, reply.error), (1000, 0));

    let mut expected: Vec<(u64, u64, Vec<u8>)> = Vec::new();
    let mut requests = Vec::new();
    for (i, (offset, length)) in reads().into_iter().enumerate() {
        requests.extend_from_slice(
            &Request { flags: CommandFlags::empty(), command: cmd::READ, cookie: i as u64, offset, length }.encode(),
        );
        expected.push((i as u64, offset, pattern(offset, length as usize)));
    }
    let (offset, length) = (offset_written - 10, 200_000u32);
    requests.extend_from_slice(
        &Request { flags: CommandFlags::empty(), command: cmd::READ, cookie: 99, offset, length }.encode(),
    );
    let mut mixed = pattern(offset, length as usize);
    mixed[10..100_010].copy_from_slice(&written);
    expected.push((99, offset, mixed));
    stream.write_all(&requests).await.unwrap();

    for (cookie, offset, want) in expected {
        let got = if structured {
            let header =
                ChunkHeader::decode(&read_exact(&mut stream, ChunkHeader::SIZE).await.try_into().unwrap()).unwrap();
            assert_eq!((header.cookie, header.kind), (cookie, reply_type::OFFSET_DATA), "{header:?}");
            assert!(header.flags.contains(ReplyFlags::DONE));
            assert_eq!(header.length as usize, want.len() + 8);
            let body = read_exact(&mut stream, header.length as usize).await;
            assert_eq!(u64::from_be_bytes(body[..8].try_into().unwrap()), offset);
            body[8..].to_vec()
        } else {
            let reply =
                SimpleReply::decode(&read_exact(&mut stream, SimpleReply::SIZE).await.try_into().unwrap()).unwrap();
            assert_eq!((reply.cookie, reply.error), (cookie, 0));
            read_exact(&mut stream, want.len()).await
        };
        assert!(got == want, "read {cookie} at {offset} ({} bytes) differs", want.len());
    }
}

#[tokio::test]
async fn simple_replies_carry_the_file_over_tcp() {
    pipelined_reads(false).await;
}

#[tokio::test]
async fn structured_replies_carry_the_file_over_tcp() {
    pipelined_reads(true).await;
}
