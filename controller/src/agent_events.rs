//! What a storage agent process reports about its volumes: a server that
//! does not start and an image file that is missing become Warning Events
//! on the volume's NbdVolume (`kubectl describe nbdvolume ID`), in the
//! "default" namespace where the agent's reconciler puts its own Events
//! about these cluster-scoped objects. The embedded controller reports the
//! same failures on the volume's claim instead ([`crate::events`]).
//!
//! Recording is best effort, in the background: a failure is only logged.

use std::sync::Arc;

use agent::resources::{GROUP, NbdVolume, VERSION};
use csi_events::{Recorder, WarningEvent};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;

use crate::events::{IMAGE_MISSING, SERVER_DOWN};

/// The reportingController of the agent's Events, the reconciler's too.
const REPORTING_CONTROLLER: &str = "nbd.csi.dev/agent";
/// Where Events about cluster-scoped objects live, as kubelet does.
const EVENT_NAMESPACE: &str = "default";

#[derive(Clone)]
pub struct AgentEvents(Arc<Recorder>);

impl std::fmt::Debug for AgentEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentEvents")
    }
}

impl AgentEvents {
    /// Events through `client`, reported by the agent of `node`.
    pub fn new(client: kube::Client, node: &str) -> Self {
        Self(Arc::new(Recorder::new(client, REPORTING_CONTROLLER.to_owned(), node)))
    }

    /// Records a warning about volume `id` now; returns the Event's name.
    pub async fn record(
        &self,
        id: &str,
        reason: &'static str,
        action: &'static str,
        note: String,
    ) -> Result<String, kube::Error> {
        let regarding = ObjectReference {
            api_version: Some(format!("{GROUP}/{VERSION}")),
            kind: Some(NbdVolume::kind(&()).into_owned()),
            name: Some(id.to_owned()),
            ..Default::default()
        };
        let warning =
            WarningEvent { namespace: EVENT_NAMESPACE.to_owned(), regarding, related: None, reason, action, note };
        self.0.record(warning).await
    }

    fn emit(&self, id: &str, reason: &'static str, action: &'static str, note: String) {
        let events = self.clone();
        let id = id.to_owned();
        csi_events::in_background(reason, async move { events.record(&id, reason, action, note).await.map(Some) });
    }
}

impl agent::Reporter for AgentEvents {
    fn server_down(&self, volume: &agent::VolumeRecord, error: &agent::Error) {
        let note = format!("the NBD server of volume {} is not running (retried every 30s): {error}", volume.id);
        self.emit(&volume.id, SERVER_DOWN, "StartNBDServer", note);
    }

    fn image_missing(&self, volume: &agent::VolumeRecord, reason: &str) {
        let note = format!("volume {} cannot be served: {reason}", volume.id);
        self.emit(&volume.id, IMAGE_MISSING, "LoadVolume", note);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use csi_events::mock_api::{self, json_body, reply};
    use http::{Method, StatusCode};
    use serde_json::json;

    #[tokio::test]
    async fn a_warning_about_a_volume_goes_on_its_nbdvolume_in_default() {
        let (client, mut handle) = mock_api::client();
        let events = AgentEvents::new(client, "storage-1");
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("event create");
            assert_eq!(request.method(), Method::POST);
            assert_eq!(request.uri().path(), "/apis/events.k8s.io/v1/namespaces/default/events");
            let event = json_body(request).await;
            assert_eq!(
                event["regarding"],
                json!({"apiVersion": "nbd.csi.dev/v1alpha1", "kind": "NbdVolume", "name": "vol-1"})
            );
            assert_eq!(event["reason"], "VolumeImageMissing");
            assert_eq!(event["reportingController"], "nbd.csi.dev/agent");
            assert_eq!(event["reportingInstance"], "storage-1");
            assert!(event["note"].as_str().unwrap().contains("vol-1"), "{event}");
            reply(send, StatusCode::CREATED, &json!({"metadata": {"name": "vol-1.1", "namespace": "default"}}));
        });
        let name = events.record("vol-1", IMAGE_MISSING, "LoadVolume", "volume vol-1 cannot be served".into()).await;
        assert_eq!(name.unwrap(), "vol-1.1");
        server.await.unwrap();
    }

    /// The wiring: an agent opened on a volume whose image file is gone
    /// reports it, and the Event lands on that volume's NbdVolume.
    #[tokio::test]
    async fn an_agent_reports_a_missing_image_on_the_volumes_object() {
        const ID: &str = "vol-0000000000000000000000000000c001";
        let dir = tempfile::tempdir().unwrap();
        let config = agent::Config {
            listen: "127.0.0.1".parse().unwrap(),
            ports: 26980..=26989,
            connection_caps: Default::default(),
            tls_dir: None,
        };
        let opened = agent::Agent::open(config.clone(), dir.path(), Arc::new(agent::LogsOnly)).await.unwrap();
        let volume = agent::NewVolume {
            id: Some(ID.into()),
            name: "pvc-1".into(),
            capacity_bytes: 1 << 20,
            block: true,
            access_modes: vec![1],
            fs_type: String::new(),
            parameters: Default::default(),
            source: None,
            read_only: false,
            export_name: None,
            tls: Default::default(),
        };
        opened.create_volume(volume).await.unwrap();
        opened.shutdown().await;
        drop(opened);
        std::fs::remove_file(dir.path().join("volumes").join(format!("{ID}.img"))).unwrap();

        let (client, mut handle) = mock_api::client();
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("event create");
            assert_eq!(request.uri().path(), "/apis/events.k8s.io/v1/namespaces/default/events");
            let event = json_body(request).await;
            assert_eq!(event["regarding"]["kind"], "NbdVolume");
            assert_eq!(event["regarding"]["name"], ID);
            assert_eq!(event["reason"], "VolumeImageMissing");
            reply(send, StatusCode::CREATED, &json!({"metadata": {"name": "e.1", "namespace": "default"}}));
        });
        let events = Arc::new(AgentEvents::new(client, "storage-1"));
        let reopened = agent::Agent::open(config, dir.path(), events).await.expect("starts without the image");
        tokio::time::timeout(std::time::Duration::from_secs(10), server).await.expect("event in time").unwrap();
        reopened.shutdown().await;
    }
}
