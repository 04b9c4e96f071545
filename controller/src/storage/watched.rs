//! The controller's view of one kind of object: a single watch for the
//! whole process (kube-runtime's `watcher` into a `reflector` store) that
//! every call waiting for an agent looks at, woken on each change.
//!
//! Why not a watch per wait (`kube::runtime::wait::await_condition`): the
//! client speaks HTTP/1, where a watch holds a connection, and a watch
//! dropped mid-stream closes it; so every wait cost a LIST, a WATCH and a
//! new TLS connection for the next request: about 17 requests and 185 ms
//! per CreateVolume + ControllerPublishVolume, most of it the handshakes
//! (bench/control-plane.sh). One long-lived watch costs nothing per wait.
//!
//! Placement reads the storage nodes, their Leases and the volumes from
//! such stores too, instead of three LISTs per CreateVolume under the
//! placement lock.
//!
//! The store lags the API server a little: an object a call has just
//! written may still be absent, or older, in it. [`Watched::until`]
//! therefore takes the generation the call wrote and treats an older copy
//! as not there yet; the caller confirms an absence with a read.

use std::sync::Arc;

use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::StreamExt;

/// What [`Watched::until`] found.
#[derive(Debug)]
pub enum Seen<K> {
    /// The object at or past the generation asked for.
    Object(Arc<K>),
    /// The store has no such object (or only an older copy of it).
    Absent,
}

/// Every object of one kind, kept up to date by one watch.
pub struct Watched<K: Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    changed: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl<K: Resource<DynamicType = ()> + 'static> Drop for Watched<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<K> Watched<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    /// Starts the watch of every object `api` reaches. It restarts itself
    /// with backoff after an error (an API server away for a while).
    pub fn spawn(api: Api<K>) -> Self {
        let (store, writer) = reflector::store();
        let (notify, changed) = watch::channel(0u64);
        let kind = K::kind(&()).into_owned();
        let events = watcher(api, watcher::Config::default()).default_backoff().reflect(writer);
        let task = tokio::spawn(async move {
            tokio::pin!(events);
            while let Some(event) = events.next().await {
                match event {
                    Ok(_) => notify.send_modify(|n| *n = n.wrapping_add(1)),
                    Err(e) => tracing::warn!(kind, error = %e, "watch failed; it is retried"),
                }
            }
        });
        Self { store, changed, task }
    }

    /// Every object as the store has it now, once it has listed them, at
    /// most until `deadline`; `None` when the first list has not come.
    pub async fn all(&self, deadline: Instant) -> Option<Vec<Arc<K>>> {
        tokio::time::timeout_at(deadline, self.store.wait_until_ready()).await.ok()?.ok()?;
        Some(self.store.state())
    }

    /// Object `name` as the store has it now, if it has it: possibly older
    /// than the API server's, so only a hint (a write made from it carries
    /// its resourceVersion, and a stale copy makes that write conflict).
    pub fn get(&self, name: &str) -> Option<Arc<K>> {
        self.store.get(&ObjectRef::new(name))
    }

    /// Looks at object `name` now and at every change, until `settled`
    /// says the look is final or `deadline` passes: then the last look.
    /// A copy older than `generation` (the one the caller wrote) counts as
    /// [`Seen::Absent`]: the store has not caught up with the write yet.
    pub async fn until(
        &self,
        name: &str,
        generation: Option<i64>,
        deadline: Instant,
        mut settled: impl FnMut(&Seen<K>) -> bool,
    ) -> Seen<K> {
        let mut changed = self.changed.clone();
        // Not ready before the first LIST: nothing seen yet, keep waiting.
        let ready = tokio::time::timeout_at(deadline, self.store.wait_until_ready()).await;
        loop {
            changed.borrow_and_update();
            let seen = match (ready.is_ok(), self.store.get(&ObjectRef::new(name))) {
                (true, Some(object)) if object.meta().generation.unwrap_or(0) >= generation.unwrap_or(0) => {
                    Seen::Object(object)
                }
                _ => Seen::Absent,
            };
            if settled(&seen) || Instant::now() >= deadline {
                return seen;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                // The watch task is gone (the process is stopping): no
                // change will come.
                Ok(Err(_closed)) => tokio::time::sleep_until(deadline).await,
                // A last look follows: a change may have come just before.
                Err(_elapsed) => {}
            }
        }
    }
}
