//! The write gate: writes hold it shared, a copy's instant exclusively.
//!
//! tokio's RwLock is fair, so once a copy waits for the gate new writes
//! queue behind it: in-flight writes drain, the copy takes its instant (a
//! reflink, or a copy-before-write guard put in place, see `cow`), and the
//! queued writes go on when it lets go, a moment later.

use std::sync::Arc;

use tokio::sync::{OwnedRwLockWriteGuard, RwLock, RwLockReadGuard};

#[derive(Debug, Default)]
pub struct WriteGate(Arc<RwLock<()>>);

/// Held for a copy's instant: no write can reach the file until it is dropped.
pub type WritesPaused = OwnedRwLockWriteGuard<()>;

impl WriteGate {
    /// Taken by every command that changes data, around the change only.
    pub async fn enter(&self) -> RwLockReadGuard<'_, ()> {
        self.0.read().await
    }

    /// Waits for writes in progress to finish and holds back new ones.
    pub async fn pause(&self) -> WritesPaused {
        Arc::clone(&self.0).write_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn pause_waits_for_writers_and_holds_new_ones() {
        let gate = Arc::new(WriteGate::default());
        let writer = gate.enter().await;
        let g = Arc::clone(&gate);
        let pause = tokio::spawn(async move { g.pause().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!pause.is_finished(), "pause must wait for the writer in progress");
        drop(writer);
        let paused = pause.await.unwrap();
        let g = Arc::clone(&gate);
        let late = tokio::spawn(async move {
            let _w = g.enter().await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!late.is_finished(), "a new write waits while paused");
        drop(paused);
        late.await.unwrap();
    }
}
