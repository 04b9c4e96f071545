//! Kubernetes Events for node failures a human has to act on: a volume that
//! could not be attached (NodeStageVolume: the NBD server unreachable, the
//! handshake refused, the kernel refusing the device) and a volume whose
//! connection healing gave up on.
//!
//! An Event (events.k8s.io/v1, Warning) is recorded on this plugin's Node
//! object, in the "default" namespace as kubelet does, so
//! `kubectl describe node` shows it. The reference's uid is the node name,
//! kubelet's convention, which `kubectl describe node` looks for; no Node
//! lookup (and no RBAC for one) is needed. A repeat of the same Event
//! within [`SERIES_WINDOW`] updates the first one's `series` instead of
//! creating another, as client-go's recorder does.
//!
//! Kubernetes access comes from `--kubeconfig` or the in-cluster config;
//! without either, recording is off. Recording runs in the background and
//! a failure is only logged. Notes never hold the export name (the secret
//! token in nbdUri).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::error::Error;

/// NodeStageVolume could not attach the volume.
pub const ATTACH_FAILED: &str = "AttachFailed";
/// Healing could not reconnect a volume within the dead-connection timeout.
pub const CONNECTION_LOST: &str = "ConnectionLost";
/// Repeats within this window count in the first Event's series.
pub const SERIES_WINDOW: Duration = Duration::from_secs(10 * 60);
/// Events about cluster-scoped objects (a Node) live here.
const NAMESPACE: &str = "default";
/// The API server's limit on `note`.
const MAX_NOTE: usize = 1024;
/// Remembered Events, at most; older ones are forgotten first.
const MAX_REMEMBERED: usize = 256;

/// Records Events on this node's Node object when Kubernetes is reachable;
/// does nothing otherwise.
#[derive(Clone, Default)]
pub struct Events(Option<Arc<Inner>>);

struct Inner {
    client: kube::Client,
    node: String,
    controller: String,
    seen: Mutex<HashMap<(&'static str, String), Seen>>,
    /// One recording at a time, so that a quick repeat finds the first Event.
    recording: tokio::sync::Mutex<()>,
}

#[derive(Debug, Clone)]
struct Seen {
    name: String,
    count: i32,
    first: Instant,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Events::Kubernetes" } else { "Events::Off" })
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// `error`'s message and causes, with the export name blanked wherever a
/// cause (a server's refusal text, say) repeats it.
pub(crate) fn describe(error: &Error, export: &str) -> String {
    let message = error.chain();
    if export.is_empty() { message } else { message.replace(export, "<export>") }
}

impl Events {
    /// Kubernetes from `kubeconfig`, else in-cluster when running in a pod,
    /// else off. Logs once which it is; a config that cannot be loaded
    /// turns recording off with a warning, never stops the plugin.
    pub async fn connect(kubeconfig: Option<&Path>, driver_name: &str, node: &str) -> Self {
        let config = if let Some(path) = kubeconfig {
            match Kubeconfig::read_from(path) {
                Ok(kc) => kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                    .await
                    .map_err(|e| format!("kubeconfig {}: {e}", path.display())),
                Err(e) => Err(format!("reading kubeconfig {}: {e}", path.display())),
            }
        } else if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
            kube::Config::incluster().map_err(|e| format!("in-cluster config: {e}"))
        } else {
            tracing::info!("no Kubernetes access (neither in-cluster nor --kubeconfig): Events are not recorded");
            return Self::default();
        };
        match config.and_then(|c| kube::Client::try_from(c).map_err(|e| format!("kubernetes client: {e}"))) {
            Ok(client) => {
                tracing::info!(node = node, "recording Events on the Node");
                Self::with_client(client, driver_name, node)
            }
            Err(e) => {
                tracing::warn!(error = %e, "no Kubernetes access: Events are not recorded");
                Self::default()
            }
        }
    }

    pub fn with_client(client: kube::Client, driver_name: &str, node: &str) -> Self {
        Self(Some(Arc::new(Inner {
            client,
            node: node.to_string(),
            // A qualified name, as events.k8s.io/v1 requires.
            controller: format!("{driver_name}/node"),
            seen: Mutex::new(HashMap::new()),
            recording: tokio::sync::Mutex::new(()),
        })))
    }

    /// NodeStageVolume could not attach `volume_id`.
    pub fn attach_failed(&self, volume_id: &str, export: &str, error: &Error) {
        let note = format!("attaching volume {volume_id} failed: {}", describe(error, export));
        self.emit(ATTACH_FAILED, "NodeStageVolume", note);
    }

    /// Healing `volume_id` gave up: its I/O now fails.
    pub fn connection_lost(&self, volume_id: &str, export: &str, error: &Error) {
        let note = format!(
            "volume {volume_id} lost its NBD connection and reconnecting failed within the dead-connection timeout: {}",
            describe(error, export)
        );
        self.emit(CONNECTION_LOST, "Reconnect", note);
    }

    /// Records an Event in the background.
    fn emit(&self, reason: &'static str, action: &'static str, note: String) {
        if self.0.is_none() {
            return;
        }
        let events = self.clone();
        tokio::spawn(async move {
            match events.record(reason, action, note).await {
                Ok(Some(name)) => tracing::debug!(event = %name, reason, "event recorded"),
                Ok(None) => {}
                Err(e) => tracing::warn!(reason, error = %e, "recording an event failed"),
            }
        });
    }

    /// Records an Event now: its name, or `None` without Kubernetes access.
    pub async fn record(
        &self,
        reason: &'static str,
        action: &'static str,
        note: String,
    ) -> Result<Option<String>, kube::Error> {
        let Some(inner) = &self.0 else { return Ok(None) };
        let _one_at_a_time = inner.recording.lock().await;
        let note = truncate(note, MAX_NOTE);
        let key = (reason, note.clone());
        let events: Api<Event> = Api::namespaced(inner.client.clone(), NAMESPACE);
        let now = Timestamp::now();
        if let Some(seen) = inner.repeat(&key) {
            let patch = serde_json::json!({
                "series": EventSeries { count: seen.count, last_observed_time: MicroTime(now) }
            });
            match events.patch(&seen.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => return Ok(Some(seen.name)),
                // Expired or deleted: record it anew.
                Err(kube::Error::Api(status)) if status.code == 404 => inner.forget(&key),
                Err(e) => return Err(e),
            }
        }
        let event = Event {
            metadata: ObjectMeta {
                // client-go's naming: the object's name and the time in hex.
                name: Some(format!("{}.{:x}", truncate(inner.node.clone(), 200), now.as_nanosecond())),
                namespace: Some(NAMESPACE.into()),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some("Warning".into()),
            reason: Some(reason.into()),
            action: Some(action.into()),
            note: Some(note),
            regarding: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(inner.node.clone()),
                uid: Some(inner.node.clone()),
                ..Default::default()
            }),
            reporting_controller: Some(inner.controller.clone()),
            reporting_instance: Some(truncate(inner.node.clone(), 128)),
            ..Default::default()
        };
        let created = events.create(&PostParams::default(), &event).await?;
        let name = created.metadata.name.unwrap_or_default();
        inner.remember(key, name.clone());
        Ok(Some(name))
    }
}

impl Inner {
    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<(&'static str, String), Seen>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The Event to count `key` in, with its new count, when it was first
    /// recorded within the window.
    fn repeat(&self, key: &(&'static str, String)) -> Option<Seen> {
        let mut seen = self.seen();
        let entry = seen.get_mut(key)?;
        if entry.first.elapsed() > SERIES_WINDOW {
            seen.remove(key);
            return None;
        }
        entry.count += 1;
        Some(entry.clone())
    }

    fn forget(&self, key: &(&'static str, String)) {
        self.seen().remove(key);
    }

    fn remember(&self, key: (&'static str, String), name: String) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::{AttachSpec, Attached, Attacher};
    use crate::error::{ErrorKind, Result};
    use crate::state::StateDir;
    use crate::volumes::{Access, Settings, Volumes};
    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock::{Handle, SendResponse};

    type MockHandle = Handle<Request<Body>, Response<Body>>;

    const TOKEN: &str = "s3cr3t-export-token";

    fn events() -> (Events, MockHandle) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (Events::with_client(kube::Client::new(service, "default"), "nbd.csi.dev", "worker-1"), handle)
    }

    fn reply(send: SendResponse<Response<Body>>, status: StatusCode, body: &Value) {
        let mut response = Response::new(Body::from(serde_json::to_vec(body).unwrap()));
        *response.status_mut() = status;
        send.send_response(response);
    }

    async fn body(request: Request<Body>) -> Value {
        let bytes = request.into_body().collect_bytes().await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// An attacher whose server refuses the export, naming it in the
    /// refusal as some servers do.
    #[derive(Debug)]
    struct Refused;

    impl Attacher for Refused {
        async fn attach(&self, spec: &AttachSpec) -> Result<Attached> {
            let cause = std::io::Error::other(format!("export '{}' unknown", spec.uri.export));
            Err(Error::with_source(ErrorKind::Unavailable, format!("handshake with {}", spec.uri), cause))
        }
        async fn reconnect(&self, _: u32, _: &AttachSpec) -> Result<usize> {
            Err(Error::new(ErrorKind::Unavailable, "unreachable"))
        }
        async fn resize(&self, _: u32, _: &AttachSpec) -> Result<u64> {
            Err(Error::new(ErrorKind::Unavailable, "unreachable"))
        }
        fn detach(&self, _: u32) -> Result<()> {
            Ok(())
        }
        fn find(&self, _: &str) -> Result<Option<u32>> {
            Ok(None)
        }
        fn connected(&self, _: u32) -> Result<bool> {
            Ok(false)
        }
        fn list(&self) -> Result<Vec<(u32, String)>> {
            Ok(Vec::new())
        }
        fn in_use(&self, _: u32) -> Result<bool> {
            Ok(false)
        }
    }

    fn volumes(dir: &Path, events: Events) -> Volumes<Refused> {
        let settings =
            Settings { connections: 1, timeout: Duration::from_secs(30), dead_conn_timeout: Duration::from_secs(120) };
        let mut volumes = Volumes::new(Arc::new(Refused), StateDir::open(dir.join("state")).unwrap(), settings);
        volumes.events = events;
        volumes
    }

    /// The wiring: a NodeStageVolume whose attach fails records one
    /// AttachFailed Event on the Node, without the export token.
    #[tokio::test]
    async fn failed_attach_records_an_event_on_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let (events, mut handle) = events();
        let volumes = volumes(dir.path(), events);
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("event create");
            assert_eq!(request.method(), Method::POST);
            assert_eq!(request.uri().path(), "/apis/events.k8s.io/v1/namespaces/default/events");
            let event = body(request).await;
            let name = event["metadata"]["name"].as_str().unwrap();
            let suffix = name.strip_prefix("worker-1.").expect("named after the node");
            assert!(!suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_hexdigit()), "{name}");
            assert_eq!(event["type"], "Warning");
            assert_eq!(event["reason"], "AttachFailed");
            assert_eq!(event["action"], "NodeStageVolume");
            assert_eq!(event["reportingController"], "nbd.csi.dev/node");
            assert_eq!(event["reportingInstance"], "worker-1");
            assert_eq!(
                event["regarding"],
                json!({"apiVersion": "v1", "kind": "Node", "name": "worker-1", "uid": "worker-1"})
            );
            assert!(event["eventTime"].as_str().is_some_and(|t| t.ends_with('Z')), "{event}");
            let note = event["note"].as_str().unwrap();
            assert!(note.contains("vol-1") && note.contains("handshake with nbd://10.0.0.5:10809/<export>"), "{note}");
            assert!(!note.contains(TOKEN), "{note}");
            assert!(!event.to_string().contains(TOKEN), "{event}");
            reply(send, StatusCode::CREATED, &json!({"metadata": {"name": "worker-1.1", "namespace": "default"}}));
            assert!(handle.next_request().await.is_none(), "one event only");
        });
        let uri = format!("nbd://10.0.0.5:10809/{TOKEN}");
        let err = volumes.stage("vol-1", &uri, &dir.path().join("staging"), &Access::Block, false).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unavailable);
        // The recording task holds the last client; dropping ours lets the
        // mock see the end of requests once it is done.
        drop(volumes);
        tokio::time::timeout(Duration::from_secs(10), server).await.expect("event recorded in time").unwrap();
    }

    #[tokio::test]
    async fn failed_attach_without_kubernetes_records_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let volumes = volumes(dir.path(), Events::default());
        let uri = format!("nbd://10.0.0.5:10809/{TOKEN}");
        let err = volumes.stage("vol-1", &uri, &dir.path().join("staging"), &Access::Block, false).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unavailable);
        assert_eq!(Events::default().record(ATTACH_FAILED, "NodeStageVolume", "x".into()).await.unwrap(), None);
    }

    #[tokio::test]
    async fn no_kubernetes_config_means_no_recording() {
        // Tests run outside a pod unless KUBERNETES_SERVICE_HOST is set.
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
            let events = Events::connect(None, "nbd.csi.dev", "worker-1").await;
            assert!(events.0.is_none());
        }
        let missing = Events::connect(Some(Path::new("/nonexistent/kubeconfig")), "nbd.csi.dev", "worker-1").await;
        assert!(missing.0.is_none());
    }

    #[tokio::test]
    async fn repeats_count_in_the_series_and_expired_events_are_created_again() {
        let (events, mut handle) = events();
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("event create");
            assert_eq!(request.method(), Method::POST);
            let mut created = body(request).await;
            assert!(created.get("series").is_none());
            created["metadata"]["name"] = json!("worker-1.17f3a");
            reply(send, StatusCode::CREATED, &created);

            let (request, send) = handle.next_request().await.expect("event patch");
            assert_eq!(request.method(), Method::PATCH);
            assert_eq!(request.uri().path(), "/apis/events.k8s.io/v1/namespaces/default/events/worker-1.17f3a");
            assert_eq!(request.headers()["content-type"], "application/merge-patch+json");
            let patch = body(request).await;
            assert_eq!(patch["series"]["count"], 2);
            assert!(patch["series"]["lastObservedTime"].as_str().is_some(), "{patch}");
            reply(send, StatusCode::OK, &created);

            let (request, send) = handle.next_request().await.expect("event patch");
            assert_eq!(request.method(), Method::PATCH);
            let status =
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404});
            reply(send, StatusCode::NOT_FOUND, &status);
            let (request, send) = handle.next_request().await.expect("event create again");
            assert_eq!(request.method(), Method::POST);
            let event = body(request).await;
            assert!(event.get("series").is_none());
            assert_eq!(event["reason"], "ConnectionLost");
            reply(send, StatusCode::CREATED, &json!({"metadata": {"name": "worker-1.2", "namespace": "default"}}));
        });
        let note = || "volume vol-1 lost its NBD connection".to_string();
        assert_eq!(
            events.record(CONNECTION_LOST, "Reconnect", note()).await.unwrap().as_deref(),
            Some("worker-1.17f3a")
        );
        assert_eq!(
            events.record(CONNECTION_LOST, "Reconnect", note()).await.unwrap().as_deref(),
            Some("worker-1.17f3a")
        );
        assert_eq!(events.record(CONNECTION_LOST, "Reconnect", note()).await.unwrap().as_deref(), Some("worker-1.2"));
        server.await.unwrap();
    }

    #[test]
    fn notes_blank_the_export_and_are_cut_at_a_char_boundary() {
        let cause = std::io::Error::other(format!("no export {TOKEN}"));
        let err = Error::with_source(ErrorKind::Unavailable, "handshake with nbd://h:1/<export>", cause);
        assert_eq!(describe(&err, TOKEN), "handshake with nbd://h:1/<export>: no export <export>");
        assert_eq!(describe(&err, ""), err.chain());
        let cut = truncate("é".repeat(600), MAX_NOTE);
        assert_eq!(cut.len(), MAX_NOTE);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
