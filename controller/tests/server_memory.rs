//! A client that never reads its replies cannot make one connection hold
//! more memory than its byte budget: the server (`serve-file`, a process of
//! its own so its RSS is its alone) is measured while such a client
//! alternates 4 MiB WRITEs with 1-byte READs, each READ reply stuck behind
//! the ones the client does not read.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::wire::*;
use common::*;

const NAME: &str = "vol";
/// The per-connection byte budget the server starts with (ExportConfig).
const BUDGET: u64 = 64 << 20;
/// What the server may hold beyond the budget for one connection: its idle
/// buffer pool, the read and batch buffers, allocator slack.
const SLACK: u64 = 24 << 20;
/// 1 MiB READs sent first, more data than the socket buffers between the
/// server and a client that does not read can take (Linux: at most 4 MiB
/// send buffer, tcp_wmem; the receive window stays small when nothing is
/// read): the server's writer is stuck behind them for the rest of the test.
const PLUG_READS: u64 = 32;
/// WRITE + READ pairs after the plug; with the plug, within the 512
/// replies a connection queues.
const PAIRS: u64 = 100;
const WRITE_LEN: usize = 4 << 20;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("server status");
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("VmRSS in /proc/PID/status");
    kib << 10
}

#[test]
fn unread_replies_to_small_reads_do_not_pin_big_buffers() {
    let vol = Volume::sparse(64 * MIB);
    let server = Server::start(&vol, NAME, &[]);
    let mut conn = RawConn::connect(&server);
    // Warm up what every connection allocates once (the reply writer's
    // batch buffer, the request reader), then measure from there.
    assert_eq!(conn.write(0, &vec![0x11; WRITE_LEN], 0), 0);
    assert_eq!(conn.read(0, 1).expect("warm-up read"), vec![0x11]);
    let before = rss_bytes(server.pid());

    let mut stream = conn.stream();
    stream.set_write_timeout(Some(Duration::from_secs(30))).expect("write timeout");
    let sender = std::thread::spawn(move || {
        for i in 0..PLUG_READS {
            conn.request(0, CMD_READ, i, i * MIB as u64, MIB as u32, &[]);
        }
        let data = vec![0x5a; WRITE_LEN];
        for i in 0..PAIRS {
            let offset = (i % 8) * WRITE_LEN as u64;
            conn.request(0, CMD_WRITE, 1000 + 2 * i, offset, WRITE_LEN as u32, &data);
            conn.request(0, CMD_READ, 1001 + 2 * i, offset, 1, &[]);
        }
        conn
    });

    // The server reads the requests as fast as they come; sample its RSS
    // until every request has been sent and a little after.
    let mut peak = before;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sent_at = None;
    while sent_at.is_none_or(|t: Instant| t.elapsed() < Duration::from_secs(2)) {
        assert!(Instant::now() < deadline, "sending the requests took over 60 s");
        peak = peak.max(rss_bytes(server.pid()));
        if sent_at.is_none() && sender.is_finished() {
            sent_at = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut conn = sender.join().expect("sender thread");
    let growth = peak.saturating_sub(before);
    eprintln!(
        "server RSS: {} MiB before, {} MiB peak, +{} MiB for one connection with {PAIRS} unread 1-byte READs",
        before >> 20,
        peak >> 20,
        growth >> 20
    );
    assert!(
        growth <= BUDGET + SLACK,
        "one connection grew the server by {} MiB, over its {} MiB budget plus {} MiB",
        growth >> 20,
        BUDGET >> 20,
        SLACK >> 20
    );

    // Nothing was lost: every reply arrives, in order, once the client reads.
    for i in 0..PLUG_READS {
        assert_eq!(conn.reply(), (0, i));
        let mut data = vec![0u8; MIB];
        stream.read_exact(&mut data).expect("plug READ data");
    }
    for i in 0..PAIRS {
        assert_eq!(conn.reply(), (0, 1000 + 2 * i), "WRITE {i}");
        assert_eq!(conn.reply(), (0, 1001 + 2 * i), "READ {i}");
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).expect("READ data");
        assert_eq!(byte, [0x5a]);
    }
    conn.disconnect();
}
