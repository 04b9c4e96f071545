//! The export's counters return to their idle values (nothing in flight, no
//! connections) however a connection ends: a protocol error with replies
//! queued, a client that hangs up without reading what it is owed, a server
//! that stops while a client is not reading. Over real TCP, where a client
//! that stops reading leaves replies queued in the server.

mod common;

use common::*;
use nbd::wire::Request;
use nbd::{CommandFlags, cmd};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// READs pipelined and never read: 300 MiB of replies, far more than the
/// socket buffers hold, and fewer than the 512-reply queue, so the reader
/// goes on to whatever follows while the writer is stuck.
const OWED: u64 = 300;

async fn owe_replies(server: &TcpServer, stream: &mut TcpStream) {
    let mut batch = Vec::new();
    for cookie in 0..OWED {
        batch.extend_from_slice(
            &Request { flags: CommandFlags::empty(), command: cmd::READ, cookie, offset: 0, length: MIB as u32 }
                .encode(),
        );
    }
    within(stream.write_all(&batch)).await.unwrap();
    eventually("every READ is received", || {
        server.export.stats().reads.load(std::sync::atomic::Ordering::Relaxed) == OWED
    })
    .await;
    assert!(server.in_flight() > OWED / 2, "replies are queued: {} in flight", server.in_flight());
}

async fn back_to_idle(server: &TcpServer) {
    eventually("nothing in flight and no connection", || server.in_flight() == 0 && server.connections() == 0).await;
}

#[tokio::test]
async fn a_bad_magic_with_replies_queued_leaves_nothing_in_flight() {
    let server = TcpServer::start().await;
    let mut stream = server.connect().await;
    owe_replies(&server, &mut stream).await;
    within(stream.write_all(&[0xba; Request::SIZE])).await.unwrap();
    back_to_idle(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_hangs_up_owed_replies_leaves_nothing_in_flight() {
    let server = TcpServer::start().await;
    let mut stream = server.connect().await;
    owe_replies(&server, &mut stream).await;
    drop(stream);
    back_to_idle(&server).await;
    server.stop().await;
}

/// A stopping server gives up on a client that does not read after its
/// grace period: that connection and its replies leave the counters too.
#[tokio::test]
async fn a_server_that_gives_up_on_a_stuck_client_leaves_nothing_counted() {
    let server = TcpServer::start().await;
    let mut stream = server.connect().await;
    owe_replies(&server, &mut stream).await;
    let export = std::sync::Arc::clone(&server.export);
    server.stop().await;
    let stats = export.stats();
    eventually("nothing in flight and no connection", || {
        stats.in_flight.load(std::sync::atomic::Ordering::Relaxed) == 0
            && stats.connections.load(std::sync::atomic::Ordering::Relaxed) == 0
    })
    .await;
    // The client is still there, not reading: the server is gone all the same.
    drop(stream);
}
