//! A client that pipelines FLUSH requests and never reads its replies must
//! not be able to tie up the process's blocking threads.

use std::sync::Arc;
use std::time::Duration;

use nbd::CommandFlags;
use nbd::client::{HandshakeOptions, handshake};
use nbd::consts::cmd;
use nbd::server::{Export, ExportConfig, serve_stream};
use nbd::wire::{Request, SimpleReply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

const FLUSHES: u64 = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_flushes_stay_bounded_and_are_all_answered() {
    let file = tempfile::tempfile().unwrap();
    file.set_len(1 << 20).unwrap();
    let export = Export::from_file(file, ExportConfig::new("x")).unwrap();
    // A small pipe: once the client stops reading, replies back up at once.
    let (client, server_end) = tokio::io::duplex(4096);
    let (_stop, stop_rx) = watch::channel(false);
    let server = tokio::spawn(serve_stream(Arc::clone(&export), server_end, stop_rx));
    let (mut rd, mut wr) = tokio::io::split(client);
    let mut joined = tokio::io::join(&mut rd, &mut wr);
    let opts = HandshakeOptions { export_name: "x".into(), structured_replies: false };
    handshake(&mut joined, &opts).await.unwrap();

    let sender = tokio::spawn(async move {
        let mut bytes = Vec::with_capacity(FLUSHES as usize * Request::SIZE);
        for cookie in 0..FLUSHES {
            let request = Request { flags: CommandFlags::empty(), command: cmd::FLUSH, cookie, offset: 0, length: 0 };
            bytes.extend_from_slice(&request.encode());
        }
        wr.write_all(&bytes).await.unwrap();
        wr
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Nobody reads replies yet: the process must still have blocking
    // threads to spare, and not hundreds of them parked.
    let ran = tokio::time::timeout(Duration::from_secs(5), tokio::task::spawn_blocking(|| 7)).await;
    assert_eq!(ran.expect("blocking pool exhausted").unwrap(), 7);
    let threads = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:").map(|n| n.trim().parse::<usize>().unwrap()))
        .unwrap();
    assert!(threads < 64, "{threads} threads for one client's flushes");

    // Every flush is answered once the client reads.
    let mut seen = vec![false; FLUSHES as usize];
    let mut reply = [0u8; SimpleReply::SIZE];
    for _ in 0..FLUSHES {
        tokio::time::timeout(Duration::from_secs(30), rd.read_exact(&mut reply)).await.unwrap().unwrap();
        let reply = SimpleReply::decode(&reply).unwrap();
        assert_eq!(reply.error, 0);
        assert!(!std::mem::replace(&mut seen[reply.cookie as usize], true), "cookie {} twice", reply.cookie);
    }
    let wr = sender.await.unwrap();
    drop(wr);
    drop(rd);
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
}
