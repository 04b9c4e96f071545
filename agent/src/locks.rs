//! Per-key async locks: operations on one object (a volume, a snapshot, a
//! request name) run one at a time, while other objects go on. The agent
//! locks the objects it changes; the controller, its own keys around whole
//! calls (those never nest inside the agent's, so the two cannot deadlock).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::OwnedMutexGuard;

/// Entries whose lock nobody holds are dropped once the map is this big.
const PRUNE_ABOVE: usize = 256;

#[derive(Debug)]
pub struct Locks<K>(Mutex<HashMap<K, Weak<tokio::sync::Mutex<()>>>>);

impl<K> Default for Locks<K> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<K: Hash + Eq> Locks<K> {
    /// Waits for `key`'s lock; held until the guard is dropped.
    pub async fn lock(&self, key: K) -> OwnedMutexGuard<()> {
        let mutex = {
            let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() > PRUNE_ABOVE {
                map.retain(|_, weak| weak.strong_count() > 0);
            }
            match map.get(&key).and_then(Weak::upgrade) {
                Some(mutex) => mutex,
                None => {
                    let mutex = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key, Arc::downgrade(&mutex));
                    mutex
                }
            }
        };
        mutex.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_key_waits_for_its_holder_and_other_keys_do_not() {
        let locks = Locks::<&str>::default();
        let held = locks.lock("a").await;
        let other = tokio::time::timeout(Duration::from_secs(5), locks.lock("b")).await;
        assert!(other.is_ok(), "another key is free");
        assert!(tokio::time::timeout(Duration::from_millis(50), locks.lock("a")).await.is_err(), "same key waits");
        drop(held);
        assert!(tokio::time::timeout(Duration::from_secs(5), locks.lock("a")).await.is_ok(), "free once dropped");
    }
}
