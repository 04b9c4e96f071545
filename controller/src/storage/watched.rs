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
//! Whether the first LIST has come is tracked here, not with the store's
//! own `wait_until_ready`: that one (kube-runtime 5's `DelayedInit` over a
//! futures oneshot) keeps the waker of only the last task that polled it,
//! so of several calls waiting at once for a fresh store (a replica's
//! first CreateVolume retries after the leader died) all but one slept
//! until their deadline, the full `--storage-timeout`.
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
    /// True once the store holds the first LIST.
    listed: watch::Receiver<bool>,
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
        let (listed_tx, listed) = watch::channel(false);
        let kind = K::kind(&()).into_owned();
        let events = watcher(api, watcher::Config::default()).default_backoff().reflect(writer);
        let task = tokio::spawn(async move {
            tokio::pin!(events);
            while let Some(event) = events.next().await {
                match event {
                    Ok(event) => {
                        // The reflector has put the list in the store
                        // before passing its end on.
                        if matches!(event, watcher::Event::InitDone) {
                            listed_tx.send_replace(true);
                        }
                        notify.send_modify(|n| *n = n.wrapping_add(1));
                    }
                    Err(e) => tracing::warn!(kind, error = %e, "watch failed; it is retried"),
                }
            }
        });
        Self { store, changed, listed, task }
    }

    /// Whether the store holds the first LIST, waiting for it at most
    /// until `deadline`. Any number of calls may wait at once.
    async fn listed(&self, deadline: Instant) -> bool {
        let mut listed = self.listed.clone();
        matches!(tokio::time::timeout_at(deadline, listed.wait_for(|listed| *listed)).await, Ok(Ok(_)))
    }

    /// Every object as the store has it now, once it has listed them, at
    /// most until `deadline`; `None` when the first list has not come.
    pub async fn all(&self, deadline: Instant) -> Option<Vec<Arc<K>>> {
        self.listed(deadline).await.then(|| self.store.state())
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
        let ready = self.listed(deadline).await;
        loop {
            changed.borrow_and_update();
            let seen = match (ready, self.store.get(&ObjectRef::new(name))) {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use csi_events::mock_api::{self, reply};
    use http::StatusCode;
    use k8s_openapi::api::core::v1::Node;

    use super::*;

    /// Calls that wait on a store which has not listed yet (a replica's
    /// first CreateVolume retries after another replica died, a burst of
    /// them) all see the object once the first LIST comes: not only the
    /// last one to start waiting, the others sleeping to their deadline.
    #[tokio::test]
    async fn every_waiter_sees_the_first_list() {
        let (client, mut api) = mock_api::client();
        let watched = Arc::new(Watched::spawn(kube::Api::<Node>::all(client)));
        let deadline = Instant::now() + Duration::from_secs(10);
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let watched = watched.clone();
                tokio::spawn(async move {
                    let seen = watched.until("node-a", Some(1), deadline, |seen| matches!(seen, Seen::Object(_))).await;
                    (matches!(seen, Seen::Object(_)), Instant::now())
                })
            })
            .collect();
        let (list, send) = api.next_request().await.expect("the watch lists first");
        assert!(!list.uri().to_string().contains("watch=true"), "{}", list.uri());
        // One thread: every waiter runs, and waits, before the answer.
        tokio::task::yield_now().await;
        let replied = Instant::now();
        let node = serde_json::json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a", "generation": 1, "resourceVersion": "7"}});
        let nodes = serde_json::json!({"apiVersion": "v1", "kind": "NodeList",
            "metadata": {"resourceVersion": "7"}, "items": [node]});
        reply(send, StatusCode::OK, &nodes);
        // The watch after the list stays open, unanswered, to the end.
        let (_watch, _open) = api.next_request().await.expect("then it watches");
        for (i, waiter) in waiters.into_iter().enumerate() {
            let (saw, at) = waiter.await.expect("waiter");
            let waited = at.duration_since(replied);
            assert!(saw && waited < Duration::from_secs(5), "waiter {i}: saw the object {saw}, after {waited:?}");
        }
    }
}
