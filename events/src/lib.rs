//! Warning Events (events.k8s.io/v1) recorded as client-go's recorder does:
//! a repeat of the same Event (same object, reason and note) within
//! [`SERIES_WINDOW`] updates the first one's `series` instead of creating
//! another; an Event that expired meanwhile is created anew. Each binary
//! decides only what an Event is about (`regarding`) and what it says;
//! [`client`] decides where Kubernetes access comes from and
//! [`in_background`] keeps recording off the RPC path, for both.
//!
//! Why not `kube::runtime::events::Recorder` (kube-runtime 5): it keys a
//! series by reason and object but not by note, so two different failures
//! on one Node (two volumes that could not attach) would fold into one
//! Event and the second message would be lost; a repeat whose Event expired
//! meanwhile fails its merge patch with 404 instead of being created anew;
//! its cache is bounded only by age, and notes are not cut to the API
//! server's 1 KiB; and
//! it would bring kube-runtime and its dependencies in for this one type.
//!
//! [`tls_secret`]: the other piece both binaries share, a holder's TLS
//! certificate kept as files from its Secret (kube-runtime's watcher).

mod access;
pub mod tls_secret;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};

pub use access::{client, in_background};

/// Repeats within this window count in the first Event's series.
pub const SERIES_WINDOW: Duration = Duration::from_secs(10 * 60);
/// The API server's limit on `note`.
pub const MAX_NOTE: usize = 1024;
/// Remembered Events, at most; older ones are forgotten first.
const MAX_REMEMBERED: usize = 1024;

/// One Warning Event to record.
#[derive(Debug, Clone, PartialEq)]
pub struct WarningEvent {
    /// Where the Event lives: the object's namespace, or "default" for a
    /// cluster-scoped object, as kubelet does.
    pub namespace: String,
    pub regarding: ObjectReference,
    pub related: Option<ObjectReference>,
    pub reason: &'static str,
    pub action: &'static str,
    /// Cut to [`MAX_NOTE`] bytes.
    pub note: String,
}

/// Records Warning Events through one Kubernetes client.
pub struct Recorder {
    client: kube::Client,
    controller: String,
    instance: String,
    seen: Mutex<HashMap<Key, Seen>>,
    /// One recording at a time, so that a quick repeat (csi-attacher
    /// retries at once, say) finds the first Event instead of making another.
    recording: tokio::sync::Mutex<()>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    namespace: String,
    regarding: String,
    reason: &'static str,
    note: String,
}

#[derive(Debug, Clone)]
struct Seen {
    name: String,
    count: i32,
    first: Instant,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").field("controller", &self.controller).field("instance", &self.instance).finish()
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

impl Recorder {
    /// `controller` is the qualified reportingController
    /// (`nbd.csi.dev/node`), `instance` the reportingInstance.
    pub fn new(client: kube::Client, controller: String, instance: &str) -> Self {
        Self {
            client,
            controller,
            instance: truncate(instance.to_owned(), 128),
            seen: Mutex::new(HashMap::new()),
            recording: tokio::sync::Mutex::new(()),
        }
    }

    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// Records `warning` now; returns the Event's name (the first one's,
    /// for a repeat).
    pub async fn record(&self, warning: WarningEvent) -> Result<String, kube::Error> {
        let _one_at_a_time = self.recording.lock().await;
        let note = truncate(warning.note, MAX_NOTE);
        let regarding_name = warning.regarding.name.clone().unwrap_or_default();
        let key = Key {
            namespace: warning.namespace.clone(),
            regarding: format!("{}/{regarding_name}", warning.regarding.kind.as_deref().unwrap_or("")),
            reason: warning.reason,
            note: note.clone(),
        };
        let events: Api<Event> = Api::namespaced(self.client.clone(), &warning.namespace);
        let now = Timestamp::now();
        if let Some(seen) = self.repeat(&key) {
            let patch = serde_json::json!({
                "series": EventSeries { count: seen.count, last_observed_time: MicroTime(now) }
            });
            match events.patch(&seen.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => return Ok(seen.name),
                // Expired or deleted: record it anew.
                Err(kube::Error::Api(status)) if status.code == 404 => self.forget(&key),
                Err(e) => return Err(e),
            }
        }
        let event = Event {
            metadata: ObjectMeta {
                // client-go's naming: the object's name and the time in hex
                // (a generateName of "NAME." is not a valid prefix).
                name: Some(format!("{}.{:x}", truncate(regarding_name, 200), now.as_nanosecond())),
                namespace: Some(warning.namespace),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some("Warning".into()),
            reason: Some(warning.reason.into()),
            action: Some(warning.action.into()),
            note: Some(note),
            regarding: Some(warning.regarding),
            related: warning.related,
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        };
        let created = events.create(&PostParams::default(), &event).await?;
        let name = created.metadata.name.unwrap_or_default();
        self.remember(key, name.clone());
        Ok(name)
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Seen>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The Event to count `key` in, with its new count, when it was first
    /// recorded within the window.
    fn repeat(&self, key: &Key) -> Option<Seen> {
        let mut seen = self.seen();
        let entry = seen.get_mut(key)?;
        if entry.first.elapsed() > SERIES_WINDOW {
            seen.remove(key);
            return None;
        }
        entry.count += 1;
        Some(entry.clone())
    }

    fn forget(&self, key: &Key) {
        self.seen().remove(key);
    }

    fn remember(&self, key: Key, name: String) {
        let mut seen = self.seen();
        seen.retain(|_, s| s.first.elapsed() <= SERIES_WINDOW);
        if seen.len() >= MAX_REMEMBERED
            && let Some(oldest) = seen.iter().min_by_key(|(_, s)| s.first).map(|(k, _)| k.clone())
        {
            seen.remove(&oldest);
        }
        seen.insert(key, Seen { name, count: 1, first: Instant::now() });
    }
}

#[cfg(feature = "mock-api")]
pub mod mock_api;
#[cfg(test)]
mod tests;
