//! Revoking a peer fences its sessions: a WRITE whose payload is still
//! arriving is dropped, never applied, and the fence resolves only once
//! the session's reader is gone, so nothing it sent can reach the file
//! after that. Over real TCP, through `Server::run` and its access policy.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use nbd::server::Allowed;
use nbd::wire::Request;
use nbd::{CommandFlags, cmd};
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn a_revoked_session_mid_payload_never_applies_its_write() {
    let server = TcpServer::start().await;
    let mut client = server.connect().await;
    let payload = vec![0xaau8; MIB as usize];
    let request =
        Request { flags: CommandFlags::empty(), command: cmd::WRITE, cookie: 7, offset: MIB, length: MIB as u32 };
    let (first, rest) = payload.split_at(payload.len() / 2);
    within(client.write_all(&request.encode())).await.unwrap();
    within(client.write_all(first)).await.unwrap();
    // The header is in: the reader now waits for the rest of the payload.
    eventually("the server holds the WRITE", || server.in_flight() == 1).await;

    let started = Instant::now();
    let mut fence = server.export.access().set_allowed(Allowed::Only(BTreeSet::new()));
    assert_eq!(fence.stopped(), 1);
    within(fence.wait()).await;
    let fenced = started.elapsed();
    assert_eq!(fence.remaining(), 0);
    eprintln!("fence over a session mid-payload resolved in {fenced:?}");
    assert!(fenced < Duration::from_secs(2), "fencing took {fenced:?}");

    // The rest of the payload arrives after the fence: it must go nowhere,
    // and the client gets no reply (the write was never acknowledged).
    let _ = client.write_all(rest).await;
    assert!(closed_without_reply(&mut client).await, "a fenced WRITE got a reply");
    assert_eq!(read_file(&server.file, MIB, MIB as usize), vec![0; MIB as usize], "the fenced WRITE reached the file");
    eventually("counters are back to idle", || server.in_flight() == 0 && server.connections() == 0).await;
    assert_eq!(server.export.stats().writes.load(std::sync::atomic::Ordering::Relaxed), 0);
    server.stop().await;
}

/// A server shutdown in the middle of a payload drops that write too,
/// rather than waiting for a payload that may never come.
#[tokio::test]
async fn a_shutdown_mid_payload_drops_the_write_and_returns_promptly() {
    let server = TcpServer::start().await;
    let mut client = server.connect().await;
    let request =
        Request { flags: CommandFlags::empty(), command: cmd::WRITE, cookie: 8, offset: 0, length: MIB as u32 };
    within(client.write_all(&request.encode())).await.unwrap();
    within(client.write_all(&[0x55; 4096])).await.unwrap();
    eventually("the server holds the WRITE", || server.in_flight() == 1).await;
    let started = Instant::now();
    let file = server.file.try_clone().unwrap();
    server.stop().await;
    // Well within the 5 s a stopping server gives connections that owe replies.
    assert!(started.elapsed() < Duration::from_secs(2), "shutdown waited {:?} for a payload", started.elapsed());
    let _ = client.write_all(&[0x55; (MIB as usize) - 4096]).await;
    assert!(closed_without_reply(&mut client).await);
    assert_eq!(read_file(&file, 0, MIB as usize), vec![0; MIB as usize]);
}
