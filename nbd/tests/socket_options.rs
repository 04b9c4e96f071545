//! What `Server::run` does to the sockets it accepts, read back from the
//! kernel's table of TCP sockets: keepalive is armed, so a peer that
//! vanishes while idle is noticed (the exact option values, user timeout
//! included, are checked by the server module's unit test).

mod common;

use common::*;

/// The `tr:tm->when` timer field of the TCP socket from local port `local`
/// to remote port `remote` in /proc/net/tcp: (timer kind, clock ticks left).
fn timer(local: u16, remote: u16) -> Option<(u8, u64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let port = |addr: &str| addr.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
        if port(fields[1]) != Some(local) || port(fields[2]) != Some(remote) {
            return None;
        }
        let (kind, when) = fields[5].split_once(':')?;
        Some((u8::from_str_radix(kind, 16).ok()?, u64::from_str_radix(when, 16).ok()?))
    })
}

#[tokio::test]
async fn accepted_connections_have_keepalive_armed() {
    let server = TcpServer::start().await;
    let client = server.connect().await;
    let client_port = client.local_addr().unwrap().port();
    // Timer kind 2 is keepalive; an idle socket without it has none (0),
    // one with data not yet acknowledged a retransmit timer (1) for a moment.
    eventually("the accepted socket has a keepalive timer", || {
        timer(server.addr.port(), client_port).is_some_and(|(kind, _)| kind == 2)
    })
    .await;
    let (_, ticks) = timer(server.addr.port(), client_port).unwrap();
    // USER_HZ is 100: the first probe is due within the 30 s idle time.
    assert!(ticks <= 30 * 100, "keepalive due in {ticks} ticks");
    drop(client);
    server.stop().await;
}
