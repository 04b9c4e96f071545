//! Kubernetes Events for node failures a human has to act on: a volume that
//! could not be attached (NodeStageVolume: the NBD server unreachable, the
//! handshake refused, the kernel refusing the device) and a volume whose
//! connection healing gave up on.
//!
//! An Event (events.k8s.io/v1, Warning) is recorded on this plugin's Node
//! object, in the "default" namespace as kubelet does, so
//! `kubectl describe node` shows it. The reference's uid is the node name,
//! kubelet's convention, which `kubectl describe node` looks for; no Node
//! lookup (and no RBAC for one) is needed. Repeats count in the first
//! Event's series ([`csi_events`]).
//!
//! Kubernetes access comes from `--kubeconfig` or the in-cluster config;
//! without either, recording is off. Recording runs in the background and
//! a failure is only logged. Notes never hold the export name (the secret
//! token in nbdUri).

use std::path::Path;
use std::sync::Arc;

use csi_events::{Recorder, WarningEvent};
use k8s_openapi::api::core::v1::ObjectReference;

use crate::error::Error;

/// NodeStageVolume could not attach the volume.
pub const ATTACH_FAILED: &str = "AttachFailed";
/// Healing could not reconnect a volume within the dead-connection timeout.
pub const CONNECTION_LOST: &str = "ConnectionLost";
/// Events about cluster-scoped objects (a Node) live here.
const NAMESPACE: &str = "default";

/// Records Events on this node's Node object when Kubernetes is reachable;
/// does nothing otherwise.
#[derive(Clone, Default)]
pub struct Events(Option<Arc<Inner>>);

struct Inner {
    recorder: Recorder,
    node: String,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Events::Kubernetes" } else { "Events::Off" })
    }
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
        match csi_events::client(kubeconfig).await {
            Ok(Some(client)) => {
                tracing::info!(node = node, "recording Events on the Node");
                Self::with_client(client, driver_name, node)
            }
            Ok(None) => {
                tracing::info!("no Kubernetes access (neither in-cluster nor --kubeconfig): Events are not recorded");
                Self::default()
            }
            Err(e) => {
                tracing::warn!(error = %e, "no Kubernetes access: Events are not recorded");
                Self::default()
            }
        }
    }

    pub fn with_client(client: kube::Client, driver_name: &str, node: &str) -> Self {
        // A qualified reportingController, as events.k8s.io/v1 requires.
        let recorder = Recorder::new(client, format!("{driver_name}/node"), node);
        Self(Some(Arc::new(Inner { recorder, node: node.to_owned() })))
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
        csi_events::in_background(reason, async move { events.record(reason, action, note).await });
    }

    /// Records an Event now: its name, or `None` without Kubernetes access.
    /// The reference's uid is the node name, kubelet's convention, which
    /// `kubectl describe node` looks for.
    pub async fn record(
        &self,
        reason: &'static str,
        action: &'static str,
        note: String,
    ) -> Result<Option<String>, kube::Error> {
        let Some(inner) = &self.0 else { return Ok(None) };
        let regarding = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(inner.node.clone()),
            uid: Some(inner.node.clone()),
            ..Default::default()
        };
        let event = WarningEvent { namespace: NAMESPACE.into(), regarding, related: None, reason, action, note };
        inner.recorder.record(event).await.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::attach::{AttachSpec, Attached, Attacher};
    use crate::error::{ErrorKind, Result};
    use crate::state::{Access, StateDir};
    use crate::volumes::{Settings, Volumes};
    use csi_events::mock_api::{self, ApiHandle, json_body as body, reply};
    use csi_proto::contract::{NbdUri, PublishContext};
    use http::{Method, StatusCode};
    use serde_json::json;

    const TOKEN: &str = "s3cr3t-export-token";

    fn events() -> (Events, ApiHandle) {
        let (client, handle) = mock_api::client();
        (Events::with_client(client, "nbd.csi.dev", "worker-1"), handle)
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
        async fn detach(&self, _: u32) -> Result<()> {
            Ok(())
        }
        fn find(&self, _: &str) -> Result<Option<u32>> {
            Ok(None)
        }
        async fn connected(&self, _: u32) -> Result<bool> {
            Ok(false)
        }
        fn list(&self) -> Result<Vec<(u32, String)>> {
            Ok(Vec::new())
        }
        async fn in_use(&self, _: u32) -> Result<bool> {
            Ok(false)
        }
    }

    fn publish_context() -> PublishContext {
        let nbd_uri = NbdUri::parse(&format!("nbd://10.0.0.5:10809/{TOKEN}")).unwrap();
        PublishContext { nbd_uri, read_only: false }
    }

    fn volumes(dir: &Path, events: Events) -> Volumes<Refused> {
        let settings = Settings {
            node_id: "node-a".into(),
            connections: 1,
            timeout: Duration::from_secs(30),
            dead_conn_timeout: Duration::from_secs(120),
        };
        Volumes::new(Arc::new(Refused), StateDir::open(dir.join("state")).unwrap(), settings).with_events(events)
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
        let context = publish_context();
        let err = volumes.stage("vol-1", &context, &dir.path().join("staging"), &Access::Block).await.unwrap_err();
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
        let context = publish_context();
        let err = volumes.stage("vol-1", &context, &dir.path().join("staging"), &Access::Block).await.unwrap_err();
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

    #[test]
    fn notes_blank_the_export() {
        let cause = std::io::Error::other(format!("no export {TOKEN}"));
        let err = Error::with_source(ErrorKind::Unavailable, "handshake with nbd://h:1/<export>", cause);
        assert_eq!(describe(&err, TOKEN), "handshake with nbd://h:1/<export>: no export <export>");
        assert_eq!(describe(&err, ""), err.chain());
    }
}
