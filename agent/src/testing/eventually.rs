//! Waiting in tests for something another task or process makes true.

use std::time::Duration;

/// Polls `check` every 100 ms until it gives a value, at most 30 s; then
/// panics naming `what`. For state that settles asynchronously (an
/// object's status written by a reconciler, say), without a fixed sleep.
pub async fn eventually<T, F: Future<Output = Option<T>>>(what: &str, mut check: impl FnMut() -> F) -> T {
    for _ in 0..300 {
        if let Some(value) = check().await {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within 30 s");
}
