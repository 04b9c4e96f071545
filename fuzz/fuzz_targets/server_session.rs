//! One whole client session against the export server.
//!
//! The input is everything a client sends, in one go, followed by EOF: the
//! client flags, options, then (if the handshake got that far) transmission
//! requests with their payloads. The server runs over an in-memory duplex
//! pipe; its output is drained and thrown away concurrently, so it never
//! blocks on a full pipe. Nothing is asserted beyond "no panic, no hang, no
//! sanitizer report": the server must survive any byte string.
//!
//! The runtime and the export (a 1 MiB file on tmpfs, partly data and partly
//! hole) are made once and reused; writes from earlier inputs stay in it.

#![no_main]

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nbd::server::{Export, ExportConfig, serve_stream};
use tokio::io::AsyncWriteExt as _;
use tokio::runtime::Runtime;
use tokio::sync::watch;

/// The export name the seeds use (`make_corpus.py` must agree).
const EXPORT_NAME: &str = "fuzz";
const EXPORT_SIZE: u64 = 1 << 20;
/// In-memory pipe capacity, each direction.
const PIPE: usize = 64 << 10;

struct Harness {
    rt: Runtime,
    export: Arc<Export>,
    /// NBD_FUZZ_TRACE=1: print each session's outcome (for checking seeds).
    trace: bool,
}

fn backing_file() -> File {
    // tmpfs: fdatasync (FLUSH, FUA) is free, and it supports hole punching
    // and SEEK_DATA/SEEK_HOLE, so TRIM/WRITE_ZEROES/BLOCK_STATUS take their
    // real paths.
    let mut file = tempfile::tempfile_in("/dev/shm").or_else(|_| tempfile::tempfile()).expect("temp file");
    file.set_len(EXPORT_SIZE).expect("set_len");
    // Some data at the start and in the middle, holes elsewhere.
    file.write_all(&[0xa5; 64 << 10]).expect("write");
    file.write_all_at(&[0x5a; 4096], EXPORT_SIZE / 2).expect("write");
    file
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
        let mut config = ExportConfig::new(EXPORT_NAME);
        config.description = "fuzz export".into();
        config.handshake_timeout = Duration::from_secs(2);
        let export = Export::from_file(backing_file(), config).expect("export");
        let trace = std::env::var_os("NBD_FUZZ_TRACE").is_some_and(|v| v == "1");
        Harness { rt, export, trace }
    })
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    h.rt.block_on(async {
        let (client, server) = tokio::io::duplex(PIPE);
        // The sender must outlive the session: a dropped sender ends
        // `wait_for`, which the server reads as a shutdown.
        let (_stop, stop_rx) = watch::channel(false);
        let session = tokio::spawn(serve_stream(Arc::clone(&h.export), server, stop_rx));
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let send = async {
            // The server may hang up early (bad magic, unknown flags...):
            // a broken pipe here is expected.
            let _ = to_server.write_all(data).await;
            let _ = to_server.shutdown().await;
        };
        let mut sink = tokio::io::sink();
        let drain = tokio::io::copy(&mut from_server, &mut sink);
        let ((), received) = tokio::join!(send, drain);
        // Protocol errors are fine; a panic in the session task is a bug
        // (libfuzzer-sys's panic hook aborts before we get here anyway).
        let result = match session.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("session task cancelled: {e}"),
        };
        if h.trace {
            let stats = h.export.stats();
            eprintln!(
                "session: {} bytes in, {:?} bytes out, result {result:?}; totals: reads {} writes {} flushes {} errors {}",
                data.len(),
                received,
                stats.reads.load(Relaxed),
                stats.writes.load(Relaxed),
                stats.flushes.load(Relaxed),
                stats.errors.load(Relaxed),
            );
        }
    });
});
