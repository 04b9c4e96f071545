//! The one shutdown signal every server of both binaries waits on.

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};

/// Resolves at the first SIGTERM (what the kubelet sends a container) or
/// SIGINT (Ctrl-C). The handlers are installed by this call, not when the
/// future is first polled, so a signal that arrives while the caller is
/// still starting up is not lost: call it before the slow part of start-up.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_signal_sent_before_the_first_poll_still_counts() {
        let shutdown = shutdown_signal().unwrap();
        // Before the first poll: the handler must already be there.
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGINT).unwrap();
        tokio::time::timeout(Duration::from_secs(5), shutdown).await.expect("SIGINT ends the wait");
    }
}
