//! Kubernetes Events for failures a human has to act on: an attach the
//! controller refused (ControllerPublishVolume failed), a volume whose NBD
//! server cannot be started, and a volume whose image file is missing.
//!
//! An Event is recorded (events.k8s.io/v1, Warning) on the
//! PersistentVolumeClaim bound to the volume's PersistentVolume, so
//! `kubectl describe pvc` shows it, or on the PersistentVolume when it has
//! no claim. The PV is the one csi-provisioner created for the volume: it is
//! named after the CreateVolume name (csi-provisioner uses the PV name as
//! the volume name) and must point at this driver and volume id; volumes
//! without such a PV (made with the CLI, say) get no Event. Repeats count in
//! the first Event's series ([`csi_events`]).
//!
//! Recording is best effort: it runs in the background and a failure is
//! logged, never returned to the RPC.

use std::sync::Arc;

use csi_events::{Recorder, WarningEvent};
use k8s_openapi::api::core::v1::{Node, ObjectReference, PersistentVolume};
use kube::Api;

use crate::error::Error;
use crate::nodes::Nodes;

/// ControllerPublishVolume failed (unknown node, a node without addresses,
/// a single-node volume attached elsewhere, ...).
pub const ATTACH_REFUSED: &str = "AttachRefused";
/// A stored volume's NBD server does not run (it is retried in the background).
pub const SERVER_DOWN: &str = "VolumeServerDown";
/// A volume was detached from a node tainted out-of-service: fenced.
pub const FENCED: &str = "VolumeFenced";
/// A stored volume's image file is missing: its data is gone.
pub const IMAGE_MISSING: &str = "VolumeImageMissing";

/// One warning about a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub volume_id: String,
    /// The volume's CreateVolume name, which is its PV's name.
    pub pv_name: String,
    /// The node it concerns, if any (put in `related`).
    pub node: Option<String>,
    pub reason: &'static str,
    pub action: &'static str,
    pub note: String,
}

/// Records Events when the controller has Kubernetes access; does nothing
/// otherwise.
#[derive(Clone, Default)]
pub struct Events(Option<Arc<Inner>>);

struct Inner {
    recorder: Recorder,
    driver_name: String,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Events::Kubernetes" } else { "Events::Off" })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

impl Events {
    /// Events through the same Kubernetes client as node lookups, if any.
    pub fn new(nodes: &Nodes, driver_name: &str) -> Self {
        match nodes {
            Nodes::Kubernetes(client, _) => Self::with_client(client.clone(), driver_name, &hostname()),
            Nodes::Static(_) => Self(None),
        }
    }

    pub fn with_client(client: kube::Client, driver_name: &str, host: &str) -> Self {
        // A qualified reportingController, as events.k8s.io/v1 requires.
        let recorder =
            Recorder::new(client, format!("{driver_name}/controller"), &format!("nbd-csi-controller-{host}"));
        Self(Some(Arc::new(Inner { recorder, driver_name: driver_name.to_string() })))
    }

    /// Records `warning` in the background.
    pub fn emit(&self, warning: Warning) {
        if self.0.is_none() {
            return;
        }
        let events = self.clone();
        // Nothing to record on: no PersistentVolume of this driver for the volume.
        csi_events::in_background(warning.reason, async move { events.record(&warning).await });
    }

    /// Records `warning` now: the Event's name, or `None` when there is no
    /// Kubernetes access or no PV of this driver for the volume.
    pub async fn record(&self, warning: &Warning) -> Result<Option<String>, kube::Error> {
        let Some(inner) = &self.0 else { return Ok(None) };
        let pvs: Api<PersistentVolume> = Api::all(inner.recorder.client().clone());
        let Some(pv) = pvs.get_opt(&warning.pv_name).await? else { return Ok(None) };
        let csi = pv.spec.as_ref().and_then(|s| s.csi.as_ref());
        if !csi.is_some_and(|c| c.driver == inner.driver_name && c.volume_handle == warning.volume_id) {
            return Ok(None);
        }
        let pv_ref = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("PersistentVolume".into()),
            name: pv.metadata.name.clone(),
            uid: pv.metadata.uid.clone(),
            resource_version: pv.metadata.resource_version.clone(),
            ..Default::default()
        };
        let claim = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref()).filter(|c| c.name.is_some());
        let (regarding, namespace) = match claim {
            Some(c) => {
                let regarding = ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("PersistentVolumeClaim".into()),
                    name: c.name.clone(),
                    namespace: c.namespace.clone(),
                    uid: c.uid.clone(),
                    ..Default::default()
                };
                (regarding, c.namespace.clone().unwrap_or_else(|| "default".into()))
            }
            // Events about cluster-scoped objects live in "default".
            None => (pv_ref.clone(), "default".to_string()),
        };
        let related = match &warning.node {
            Some(node) => Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.clone()),
                ..Default::default()
            }),
            None if claim.is_some() => Some(pv_ref),
            None => None,
        };
        let event = WarningEvent {
            namespace,
            regarding,
            related,
            reason: warning.reason,
            action: warning.action,
            note: warning.note.clone(),
        };
        inner.recorder.record(event).await.map(Some)
    }
}

/// The warnings the controller records, each about one volume, named by its
/// id and its CreateVolume name (its PV's name). The caller knows both: this
/// module never reads the driver's state.
impl Events {
    /// ControllerPublishVolume of an existing volume failed with `error`.
    pub fn publish_refused(&self, volume_id: &str, pv_name: String, node_id: &str, error: &Error) {
        self.emit(Warning {
            volume_id: volume_id.to_string(),
            pv_name,
            node: (!node_id.is_empty()).then(|| node_id.to_string()),
            reason: ATTACH_REFUSED,
            action: "ControllerPublishVolume",
            note: format!("attaching volume {volume_id} to node {node_id:?} was refused: {error}"),
        });
    }

    /// ControllerUnpublishVolume took volume `volume_id` away from node
    /// `node_id`, which is tainted out-of-service: recorded on the claim
    /// (the Node related) and on the Node, so that `kubectl describe` of
    /// either says the node was fenced off the volume.
    pub fn fenced(&self, volume_id: &str, pv_name: String, node_id: &str) {
        let note = format!(
            "volume {volume_id} was detached from out-of-service node {node_id:?}: that node's NBD connections \
             are closed and its addresses refused until the volume is attached to it again"
        );
        self.emit(Warning {
            volume_id: volume_id.to_string(),
            pv_name,
            node: Some(node_id.to_string()),
            reason: FENCED,
            action: "ControllerUnpublishVolume",
            note: note.clone(),
        });
        let Some(inner) = self.0.clone() else { return };
        let node = node_id.to_string();
        csi_events::in_background(FENCED, async move {
            let nodes: Api<Node> = Api::all(inner.recorder.client().clone());
            let uid = nodes.get_opt(&node).await?.and_then(|n| n.metadata.uid);
            let regarding = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node),
                uid,
                ..Default::default()
            };
            // Events about Nodes live in "default", as kubelet's do.
            let event = WarningEvent {
                namespace: "default".into(),
                regarding,
                related: None,
                reason: FENCED,
                action: "ControllerUnpublishVolume",
                note,
            };
            inner.recorder.record(event).await.map(Some)
        });
    }

    /// A stored volume's NBD server could not be started.
    pub fn server_down(&self, volume_id: &str, pv_name: String, error: &agent::Error) {
        self.emit(Warning {
            volume_id: volume_id.to_string(),
            pv_name,
            node: None,
            reason: SERVER_DOWN,
            action: "StartNBDServer",
            note: format!("the NBD server of volume {volume_id} is not running (retried every 30s): {error}"),
        });
    }

    /// A stored volume's image file was found missing at start.
    pub fn image_missing(&self, volume_id: &str, pv_name: String, reason: &str) {
        self.emit(Warning {
            volume_id: volume_id.to_string(),
            pv_name,
            node: None,
            reason: IMAGE_MISSING,
            action: "LoadVolume",
            note: format!("volume {volume_id} cannot be served: {reason}"),
        });
    }
}

/// The storage agent's reports, recorded on the volume's claim.
impl agent::Reporter for Events {
    fn server_down(&self, volume: &agent::VolumeRecord, error: &agent::Error) {
        Events::server_down(self, &volume.id, volume.name.clone(), error);
    }

    fn image_missing(&self, volume: &agent::VolumeRecord, reason: &str) {
        Events::image_missing(self, &volume.id, volume.name.clone(), reason);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use csi_events::mock_api::{self, ApiHandle, json_body as body, reply};
    use http::{Method, StatusCode};
    use serde_json::{Value, json};

    fn events() -> (Events, ApiHandle) {
        let (client, handle) = mock_api::client();
        (Events::with_client(client, "nbd.csi.dev", "host-1"), handle)
    }

    fn warning() -> Warning {
        Warning {
            volume_id: "vol-1".into(),
            pv_name: "pvc-1234".into(),
            node: Some("worker-2".into()),
            reason: ATTACH_REFUSED,
            action: "ControllerPublishVolume",
            note: "attaching volume vol-1 to node \"worker-2\" was refused: volume is single-node".into(),
        }
    }

    fn pv(handle: &str, claim: bool) -> Value {
        let mut pv = json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": "pvc-1234", "uid": "pv-uid", "resourceVersion": "7"},
            "spec": {"csi": {"driver": "nbd.csi.dev", "volumeHandle": handle}}
        });
        if claim {
            pv["spec"]["claimRef"] =
                json!({"kind": "PersistentVolumeClaim", "namespace": "app", "name": "data", "uid": "pvc-uid"});
        }
        pv
    }

    async fn expect_pv_get(handle: &mut ApiHandle, pv: &Value) {
        let (request, send) = handle.next_request().await.expect("PV lookup");
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri().path(), "/api/v1/persistentvolumes/pvc-1234");
        reply(send, StatusCode::OK, pv);
    }

    #[tokio::test]
    async fn warning_goes_to_the_claim_and_repeats_count_in_its_series() {
        let (events, mut handle) = events();
        let server = tokio::spawn(async move {
            expect_pv_get(&mut handle, &pv("vol-1", true)).await;
            let (request, send) = handle.next_request().await.expect("event create");
            assert_eq!(request.method(), Method::POST);
            assert_eq!(request.uri().path(), "/apis/events.k8s.io/v1/namespaces/app/events");
            let event = body(request).await;
            let name = event["metadata"]["name"].as_str().unwrap();
            let suffix = name.strip_prefix("data.").expect("named after the claim");
            assert!(!suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_hexdigit()), "{name}");
            assert_eq!(event["type"], "Warning");
            assert_eq!(event["reason"], "AttachRefused");
            assert_eq!(event["action"], "ControllerPublishVolume");
            assert_eq!(event["reportingController"], "nbd.csi.dev/controller");
            assert_eq!(event["reportingInstance"], "nbd-csi-controller-host-1");
            assert_eq!(
                event["regarding"],
                json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": "app", "name": "data", "uid": "pvc-uid"})
            );
            assert_eq!(event["related"], json!({"apiVersion": "v1", "kind": "Node", "name": "worker-2"}));
            assert!(event["note"].as_str().unwrap().contains("single-node"), "{event}");
            assert!(event["eventTime"].as_str().is_some_and(|t| t.ends_with('Z')), "{event}");
            assert!(event.get("series").is_none());
            let mut created = event.clone();
            created["metadata"]["name"] = json!("data.17f3a");
            reply(send, StatusCode::CREATED, &created);

            // The same warning again: the first Event's series counts it.
            expect_pv_get(&mut handle, &pv("vol-1", true)).await;
            let (request, send) = handle.next_request().await.expect("event patch");
            assert_eq!(request.method(), Method::PATCH);
            assert_eq!(request.uri().path(), "/apis/events.k8s.io/v1/namespaces/app/events/data.17f3a");
            assert_eq!(request.headers()["content-type"], "application/merge-patch+json");
            let patch = body(request).await;
            assert_eq!(patch["series"]["count"], 2);
            assert!(patch["series"]["lastObservedTime"].as_str().is_some(), "{patch}");
            created["series"] = patch["series"].clone();
            reply(send, StatusCode::OK, &created);
        });
        assert_eq!(events.record(&warning()).await.unwrap().as_deref(), Some("data.17f3a"));
        assert_eq!(events.record(&warning()).await.unwrap().as_deref(), Some("data.17f3a"));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn expired_series_event_is_created_again() {
        let (events, mut handle) = events();
        let server = tokio::spawn(async move {
            expect_pv_get(&mut handle, &pv("vol-1", true)).await;
            let (_, send) = handle.next_request().await.expect("event create");
            reply(send, StatusCode::CREATED, &json!({"metadata": {"name": "data.1", "namespace": "app"}}));
            expect_pv_get(&mut handle, &pv("vol-1", true)).await;
            let (request, send) = handle.next_request().await.expect("event patch");
            assert_eq!(request.method(), Method::PATCH);
            reply(send, StatusCode::NOT_FOUND, &mock_api::status(404, "NotFound", "not found"));
            let (request, send) = handle.next_request().await.expect("event create again");
            assert_eq!(request.method(), Method::POST);
            assert!(body(request).await.get("series").is_none());
            reply(send, StatusCode::CREATED, &json!({"metadata": {"name": "data.2", "namespace": "app"}}));
        });
        assert_eq!(events.record(&warning()).await.unwrap().as_deref(), Some("data.1"));
        assert_eq!(events.record(&warning()).await.unwrap().as_deref(), Some("data.2"));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn unclaimed_volume_warning_goes_to_the_pv_in_default() {
        let (events, mut handle) = events();
        let server = tokio::spawn(async move {
            expect_pv_get(&mut handle, &pv("vol-1", false)).await;
            let (request, send) = handle.next_request().await.expect("event create");
            assert_eq!(request.uri().path(), "/apis/events.k8s.io/v1/namespaces/default/events");
            let event = body(request).await;
            assert_eq!(event["reason"], "VolumeServerDown");
            assert_eq!(
                event["regarding"],
                json!({"apiVersion": "v1", "kind": "PersistentVolume", "name": "pvc-1234", "uid": "pv-uid", "resourceVersion": "7"})
            );
            assert!(event.get("related").is_none(), "{event}");
            reply(send, StatusCode::CREATED, &json!({"metadata": {"name": "pvc-1234.1", "namespace": "default"}}));
        });
        let warning = Warning { node: None, reason: SERVER_DOWN, action: "StartNBDServer", ..warning() };
        assert_eq!(events.record(&warning).await.unwrap().as_deref(), Some("pvc-1234.1"));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn no_event_without_a_pv_of_this_volume() {
        let (events, mut handle) = events();
        let server = tokio::spawn(async move {
            // Another volume's PV under that name: not ours to report on.
            expect_pv_get(&mut handle, &pv("vol-other", true)).await;
            // No PV at all.
            let (_, send) = handle.next_request().await.expect("PV lookup");
            reply(send, StatusCode::NOT_FOUND, &mock_api::status(404, "NotFound", "not found"));
            assert!(handle.next_request().await.is_none(), "no request after the lookups");
        });
        assert_eq!(events.record(&warning()).await.unwrap(), None);
        assert_eq!(events.record(&warning()).await.unwrap(), None);
        drop(events);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn without_kubernetes_nothing_is_recorded() {
        let events = Events::new(&Nodes::Static(Default::default()), "nbd.csi.dev");
        assert_eq!(events.record(&warning()).await.unwrap(), None);
        events.emit(warning());
    }

    /// The wiring: a refused ControllerPublishVolume (a Node without
    /// addresses, which no export could admit) records AttachRefused.
    #[tokio::test]
    async fn refused_publish_records_an_event_on_the_claim() {
        use crate::csi::ControllerService;
        use crate::driver::{Config, Driver};
        use crate::tests::{create_req, publish_req};
        use csi_proto::controller_server::Controller;
        use csi_proto::volume_capability::access_mode::Mode;

        let dir = tempfile::tempdir().unwrap();
        let (client, mut handle) = mock_api::client();
        let config = Config {
            driver_name: "nbd.csi.dev".into(),
            advertise: "127.0.0.1".parse().unwrap(),
            default_tls: Default::default(),
            agent: agent::Config {
                listen: "127.0.0.1".parse().unwrap(),
                ports: 26900..=26931,
                connection_caps: Default::default(),
                tls_dir: None,
            },
        };
        let nodes = Nodes::unwatched(client);
        let driver = Driver::start(config, dir.path().join("data"), nodes).await.unwrap();
        let created =
            driver.create_volume(create_req("pvc-1234", 1 << 20, true, Mode::SingleNodeWriter)).await.unwrap();
        let id = created.volume.unwrap().volume_id;
        let volume_id = id.clone();
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("node lookup");
            assert_eq!(request.uri().path(), "/api/v1/nodes/worker-2");
            reply(send, StatusCode::OK, &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "worker-2"}}));
            expect_pv_get(&mut handle, &pv(&volume_id, true)).await;
            let (request, send) = handle.next_request().await.expect("event create");
            assert_eq!(request.uri().path(), "/apis/events.k8s.io/v1/namespaces/app/events");
            let event = body(request).await;
            assert_eq!(event["reason"], "AttachRefused");
            assert_eq!(event["regarding"]["name"], "data");
            assert_eq!(event["related"]["name"], "worker-2");
            let note = event["note"].as_str().unwrap();
            assert!(note.contains(&volume_id) && note.contains("no IP address"), "{note}");
            reply(send, StatusCode::CREATED, &json!({"metadata": {"name": "data.1", "namespace": "app"}}));
        });
        let controller = ControllerService(Arc::clone(&driver));
        let refused = controller
            .controller_publish_volume(tonic::Request::new(publish_req(
                &id,
                "worker-2",
                true,
                Mode::SingleNodeWriter,
                false,
            )))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
        tokio::time::timeout(Duration::from_secs(10), server).await.expect("event recorded in time").unwrap();
        driver.shutdown().await;
    }

    /// The wiring: a volume whose image file is gone at start records
    /// VolumeImageMissing, and the controller starts.
    #[tokio::test]
    async fn missing_image_at_start_records_an_event_on_the_claim() {
        use crate::driver::{Config, Driver};
        use crate::tests::create_req;
        use csi_proto::volume_capability::access_mode::Mode;

        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            driver_name: "nbd.csi.dev".into(),
            advertise: "127.0.0.1".parse().unwrap(),
            default_tls: Default::default(),
            agent: agent::Config {
                listen: "127.0.0.1".parse().unwrap(),
                ports: 26940..=26971,
                connection_caps: Default::default(),
                tls_dir: None,
            },
        };
        let data = dir.path().join("data");
        let driver = Driver::start(config.clone(), data.clone(), Nodes::Static(Default::default())).await.unwrap();
        let created =
            driver.create_volume(create_req("pvc-1234", 1 << 20, true, Mode::SingleNodeWriter)).await.unwrap();
        let id = created.volume.unwrap().volume_id;
        driver.shutdown().await;
        drop(driver);
        std::fs::remove_file(data.join("volumes").join(format!("{id}.img"))).unwrap();

        let (client, mut handle) = mock_api::client();
        let volume_id = id.clone();
        let server = tokio::spawn(async move {
            expect_pv_get(&mut handle, &pv(&volume_id, true)).await;
            let (request, send) = handle.next_request().await.expect("event create");
            assert_eq!(request.uri().path(), "/apis/events.k8s.io/v1/namespaces/app/events");
            let event = body(request).await;
            assert_eq!(event["reason"], "VolumeImageMissing");
            assert_eq!(event["regarding"]["name"], "data");
            let note = event["note"].as_str().unwrap();
            assert!(note.contains(&volume_id) && note.contains("missing"), "{note}");
            reply(send, StatusCode::CREATED, &json!({"metadata": {"name": "data.1", "namespace": "app"}}));
        });
        let driver = Driver::start(config, data, Nodes::unwatched(client)).await.expect("starts without the image");
        assert!(driver.ready());
        tokio::time::timeout(Duration::from_secs(10), server).await.expect("event recorded in time").unwrap();
        driver.shutdown().await;
    }
}
