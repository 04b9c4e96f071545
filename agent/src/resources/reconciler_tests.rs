//! The reconciler against a real agent and an API server the test answers
//! (tower-test): what it asks, what it writes, what it does to the disk.

use std::sync::Arc;
use std::time::Duration;

use csi_events::mock_api::{self, ApiHandle, json_body, reply, status};
use http::{Method, StatusCode};
use serde_json::{Value, json};

use kube::runtime::controller::Action;

use super::*;
use crate::testing::Client;
use crate::{Agent, LogsOnly};

const VOL: &str = "vol-00000000000000000000000000000001";
const ORPHAN: &str = "vol-00000000000000000000000000000002";
const NODE: &str = "storage-0";
const KEY: [u8; 32] = [42; 32];
const VOLUMES: &str = "/apis/nbd.csi.dev/v1alpha1/nbdvolumes";

/// One expected API call: method, path, and the reply to give (the
/// request's JSON body, or null, is passed to it).
type Step = (Method, String, Box<dyn FnOnce(&Value) -> (StatusCode, Value) + Send>);

/// How long the mock API server waits for each expected request.
const EXPECTED_WITHIN: Duration = Duration::from_secs(10);

/// Answers `steps` in order, checking each request; returns the bodies. A
/// request that does not come within [`EXPECTED_WITHIN`] fails the test.
fn answer(mut handle: ApiHandle, steps: Vec<Step>) -> tokio::task::JoinHandle<Vec<Value>> {
    tokio::spawn(async move {
        let mut bodies = Vec::new();
        for (method, path, respond) in steps {
            let next = tokio::time::timeout(EXPECTED_WITHIN, handle.next_request()).await;
            let (request, send) = next
                .unwrap_or_else(|_| panic!("no {method} {path} within {EXPECTED_WITHIN:?}"))
                .expect("the expected request");
            assert_eq!((request.method(), request.uri().path()), (&method, path.as_str()), "{:?}", request.uri());
            let body = if method == Method::GET { Value::Null } else { json_body(request).await };
            let (code, response) = respond(&body);
            reply(send, code, &response);
            bodies.push(body);
        }
        bodies
    })
}

fn volume_object(size: i64, published: &[&str], finalizer: bool) -> Value {
    let published: Vec<Value> = published.iter().map(|n| json!({"node": n, "readOnly": false})).collect();
    let mut object = json!({
        "apiVersion": "nbd.csi.dev/v1alpha1", "kind": "NbdVolume",
        "metadata": {"name": VOL, "uid": "u1", "generation": 2, "resourceVersion": "7"},
        "spec": {
            "storageNode": NODE, "requestName": "pvc-1", "sizeBytes": size,
            "accessType": "Block", "accessModes": ["SingleNodeWriter"], "publishedTo": published
        }
    });
    if finalizer {
        object["metadata"]["finalizers"] = json!([FINALIZER]);
    }
    object
}

/// An object as the watch hands it to the reconciler.
fn raw<T: serde::de::DeserializeOwned>(object: Value) -> T {
    serde_json::from_value(object).expect("an object with metadata")
}

fn node_object(name: &str, address: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
           "status": {"addresses": [{"type": "InternalIP", "address": address}, {"type": "Hostname", "address": name}]}})
}

fn echo_event(body: &Value) -> (StatusCode, Value) {
    let mut event = body.clone();
    event["metadata"]["name"] = json!("event-1");
    (StatusCode::CREATED, event)
}

async fn setup() -> (tempfile::TempDir, Arc<Agent>, Reconciler, ApiHandle) {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::open(crate::tests::config(), dir.path(), Arc::new(LogsOnly)).await.unwrap();
    let (client, handle) = mock_api::client();
    let nodes = NodeDirectory::unwatched(client.clone());
    let reconciler = Reconciler::new(client, Arc::clone(&agent), NODE.into(), ExportKey::new(&KEY).unwrap(), nodes);
    (dir, agent, reconciler, handle)
}

#[tokio::test]
async fn a_new_volume_is_created_published_and_its_status_written_without_its_export_name() {
    let (_dir, agent, reconciler, handle) = setup().await;
    let object = volume_object(1 << 20, &["worker-1"], true);
    let echoed = object.clone();
    let server = answer(
        handle,
        vec![
            (
                Method::GET,
                "/api/v1/nodes/worker-1".into(),
                Box::new(|_| (StatusCode::OK, node_object("worker-1", "127.0.0.1"))),
            ),
            (Method::PATCH, format!("{VOLUMES}/{VOL}/status"), Box::new(move |_| (StatusCode::OK, echoed))),
        ],
    );
    let action = reconciler.reconcile_volume(Arc::new(raw(object))).await.unwrap();
    assert_eq!(action, Action::requeue(crate::REFRESH));
    let bodies = server.await.unwrap();

    let record = agent.volume(VOL).expect("created under the object's name").record;
    let export_name = ExportKey::new(&KEY).unwrap().export_name(VOL);
    assert_eq!(record.export_name, export_name, "served under the derived name");
    assert_eq!((record.capacity_bytes, record.block, record.name.as_str()), (1 << 20, true, "pvc-1"));
    assert_eq!(record.published["worker-1"].addresses, Some(vec!["127.0.0.1".parse().unwrap()]));
    let status = &bodies[1]["status"];
    assert_eq!(status["phase"], "Available");
    assert_eq!(status["port"], record.port.expect("published: it has a port"));
    assert_eq!(status["sizeBytes"], 1 << 20);
    assert_eq!(status["observedGeneration"], 2);
    assert_eq!(status["conditions"][1]["type"], "Ready");
    assert_eq!(status["conditions"][1]["status"], "True");
    assert!(!bodies[1].to_string().contains(&export_name), "{}", bodies[1]);
    // A client that knows the derived name attaches it from the node's address.
    let mut client = Client::connect(&format!("127.0.0.1:{}", record.port.unwrap()), &export_name).await.unwrap();
    assert_eq!(client.size, 1 << 20);
    assert_eq!(client.write(0, &[1; 512]).await.unwrap(), 0);
    drop(client);
    agent.shutdown().await;
}

#[tokio::test]
async fn a_volume_grows_and_its_access_follows_the_spec() {
    let (_dir, agent, reconciler, handle) = setup().await;
    let first = volume_object(1 << 20, &["worker-1"], true);
    let (echo1, echo2) = (first.clone(), first.clone());
    let second = volume_object(2 << 20, &[], true);
    let server = answer(
        handle,
        vec![
            (
                Method::GET,
                "/api/v1/nodes/worker-1".into(),
                Box::new(|_| (StatusCode::OK, node_object("worker-1", "127.0.0.1"))),
            ),
            (Method::PATCH, format!("{VOLUMES}/{VOL}/status"), Box::new(move |_| (StatusCode::OK, echo1))),
            (Method::PATCH, format!("{VOLUMES}/{VOL}/status"), Box::new(move |_| (StatusCode::OK, echo2))),
        ],
    );
    reconciler.reconcile_volume(Arc::new(raw(first))).await.unwrap();
    let record = agent.volume(VOL).unwrap().record;
    let export_name = ExportKey::new(&KEY).unwrap().export_name(VOL);
    let mut client = Client::connect(&format!("127.0.0.1:{}", record.port.unwrap()), &export_name).await.unwrap();
    // The second spec: twice the size, published nowhere; the object
    // carries the status the first pass wrote.
    let mut second = second;
    second["status"] =
        json!({"phase": "Available", "observedGeneration": 2, "port": record.port, "sizeBytes": 1 << 20});
    reconciler.reconcile_volume(Arc::new(raw(second))).await.unwrap();
    let bodies = server.await.unwrap();
    let record = agent.volume(VOL).unwrap().record;
    assert_eq!(record.capacity_bytes, 2 << 20);
    assert!(record.published.is_empty());
    assert_eq!(record.port, None, "published nowhere: its port is given back");
    assert_eq!(bodies[2]["status"]["sizeBytes"], 2 << 20);
    let deleted = Some(&serde_json::Value::Null);
    assert_eq!(bodies[2]["status"].get("port"), deleted, "the patch deletes the port: {}", bodies[2]);
    assert_eq!(bodies[2]["status"]["conditions"][1]["reason"], "Unpublished", "{}", bodies[2]);
    assert!(client.is_closed().await, "the node's connection was stopped when its access went");
    agent.shutdown().await;
}

#[tokio::test]
async fn an_invalid_volume_gets_a_condition_and_an_event_and_nothing_is_created() {
    let (_dir, agent, reconciler, handle) = setup().await;
    let mut object = volume_object(1 << 20, &[], true);
    object["spec"]["storageNode"] = json!(NODE);
    object["spec"]["publishedTo"] = json!([{"node": "Bad_Node"}]);
    let echoed = object.clone();
    let server = answer(
        handle,
        vec![
            (Method::PATCH, format!("{VOLUMES}/{VOL}/status"), Box::new(move |_| (StatusCode::OK, echoed))),
            (Method::POST, "/apis/events.k8s.io/v1/namespaces/default/events".into(), Box::new(echo_event)),
        ],
    );
    let parsed: RawVolume = raw(object);
    let action = reconciler.reconcile_volume(Arc::new(parsed.clone())).await.unwrap();
    assert_eq!(action, Action::await_change());
    let bodies = server.await.unwrap();
    assert_eq!(bodies[1]["reason"], "InvalidSpec");
    assert_eq!(bodies[1]["regarding"]["kind"], "NbdVolume");
    assert!(bodies[1]["note"].as_str().unwrap().contains("spec.publishedTo[0].node"), "{}", bodies[1]);
    let status = &bodies[0]["status"];
    assert_eq!(status["phase"], "Invalid");
    assert_eq!(status["conditions"][0]["type"], "Valid");
    assert_eq!(status["conditions"][0]["status"], "False");
    assert!(agent.volume_ids().is_empty());
    // Reconciled again with the status it wrote: no new patch, no new Event.
    let (client, handle) = mock_api::client();
    let nodes = NodeDirectory::unwatched(client.clone());
    let again = Reconciler::new(client, Arc::clone(&agent), NODE.into(), ExportKey::new(&KEY).unwrap(), nodes);
    let server = answer(handle, vec![]);
    let mut seen = parsed;
    seen.status = Some(bodies[0]["status"].clone());
    assert_eq!(again.reconcile_volume(Arc::new(seen)).await.unwrap(), Action::await_change());
    server.await.unwrap();
    agent.shutdown().await;
}

#[tokio::test]
async fn a_volume_of_another_storage_node_is_left_alone() {
    let (_dir, agent, reconciler, handle) = setup().await;
    let mut object = volume_object(1 << 20, &[], true);
    object["spec"]["storageNode"] = json!("storage-1");
    let server = answer(handle, vec![]);
    let action = reconciler.reconcile_volume(Arc::new(raw(object))).await.unwrap();
    assert_eq!(action, Action::await_change());
    server.await.unwrap();
    assert!(agent.volume_ids().is_empty());
    agent.shutdown().await;
}

#[tokio::test]
async fn an_object_being_deleted_takes_its_data_and_then_its_finalizer() {
    let (_dir, agent, reconciler, handle) = setup().await;
    let object = volume_object(1 << 20, &["worker-1"], true);
    let echoed = object.clone();
    let mut deleting = object.clone();
    deleting["metadata"]["deletionTimestamp"] = json!("2026-11-30T02:00:00Z");
    let mut released = deleting.clone();
    released["metadata"]["finalizers"] = json!([]);
    let marked = deleting.clone();
    let server = answer(
        handle,
        vec![
            (
                Method::GET,
                "/api/v1/nodes/worker-1".into(),
                Box::new(|_| (StatusCode::OK, node_object("worker-1", "127.0.0.1"))),
            ),
            (Method::PATCH, format!("{VOLUMES}/{VOL}/status"), Box::new(move |_| (StatusCode::OK, echoed))),
            (Method::PATCH, format!("{VOLUMES}/{VOL}/status"), Box::new(move |_| (StatusCode::OK, marked))),
            (Method::PATCH, format!("{VOLUMES}/{VOL}"), Box::new(move |_| (StatusCode::OK, released))),
        ],
    );
    reconciler.reconcile_volume(Arc::new(raw(object))).await.unwrap();
    assert!(agent.volume(VOL).is_some());
    reconciler.reconcile_volume(Arc::new(raw(deleting))).await.unwrap();
    let bodies = server.await.unwrap();
    assert!(agent.volume(VOL).is_none(), "deleted, although it was published");
    assert_eq!(bodies[2], json!({"status": {"phase": "Deleting"}}));
    assert!(bodies[3].to_string().contains("/metadata/finalizers"), "the finalizer is removed: {}", bodies[3]);
    agent.shutdown().await;
}

#[tokio::test]
async fn an_object_without_the_finalizer_gets_it_before_anything_is_done() {
    let (_dir, agent, reconciler, handle) = setup().await;
    let object = volume_object(1 << 20, &[], false);
    let mut with = object.clone();
    with["metadata"]["finalizers"] = json!([FINALIZER]);
    let server =
        answer(handle, vec![(Method::PATCH, format!("{VOLUMES}/{VOL}"), Box::new(move |_| (StatusCode::OK, with)))]);
    reconciler.reconcile_volume(Arc::new(raw(object))).await.unwrap();
    let bodies = server.await.unwrap();
    assert!(bodies[0].to_string().contains(FINALIZER), "{}", bodies[0]);
    assert!(agent.volume_ids().is_empty(), "created on the next reconcile, once the finalizer is there");
    agent.shutdown().await;
}

#[tokio::test]
async fn a_size_no_disk_here_holds_gets_a_condition_and_an_event_and_the_volume_serves_on() {
    let (dir, agent, reconciler, handle) = setup().await;
    stored(&agent, VOL).await;
    // Grown by hand far past the disk: 1 EiB.
    let object = volume_object(1 << 60, &[], true);
    let echoed = object.clone();
    let server = answer(
        handle,
        vec![
            (Method::PATCH, format!("{VOLUMES}/{VOL}/status"), Box::new(move |_| (StatusCode::OK, echoed))),
            (Method::POST, "/apis/events.k8s.io/v1/namespaces/default/events".into(), Box::new(echo_event)),
        ],
    );
    let e = reconciler.reconcile_volume(Arc::new(raw(object))).await.unwrap_err();
    assert!(matches!(&e, ReconcileError::Agent(e) if e.kind() == crate::Kind::ResourceExhausted), "{e}");
    let bodies = server.await.unwrap();
    let status = &bodies[0]["status"];
    assert_eq!(status["conditions"][1]["type"], "Ready");
    assert_eq!(status["conditions"][1]["status"], "False");
    assert_eq!(status["conditions"][1]["reason"], "ResourceExhausted");
    assert_eq!(status["sizeBytes"], 1 << 20, "the size it serves");
    assert_eq!(bodies[1]["reason"], "ReconcileFailed");
    assert_eq!(bodies[1]["regarding"]["name"], VOL);
    assert!(bodies[1]["note"].as_str().unwrap().contains("bytes requested"), "{}", bodies[1]);
    // Nothing else changed: the same record and image, still served.
    assert_eq!(agent.volume(VOL).unwrap().record.capacity_bytes, 1 << 20);
    let image = dir.path().join("volumes").join(format!("{VOL}.img"));
    assert_eq!(std::fs::metadata(image).unwrap().len(), 1 << 20);
    agent.shutdown().await;
}

#[tokio::test]
async fn an_object_served_elsewhere_gets_no_empty_volume_here_but_a_condition_and_an_event() {
    let (_dir, agent, reconciler, handle) = setup().await;
    // Stored on another storage node (its agent wrote the size), then
    // moved here by hand: this agent stores no such volume.
    let mut object = volume_object(1 << 20, &[], true);
    object["status"] = json!({"phase": "Available", "observedGeneration": 1, "port": 10900, "sizeBytes": 1 << 20});
    let echoed = object.clone();
    let server = answer(
        handle,
        vec![
            (Method::PATCH, format!("{VOLUMES}/{VOL}/status"), Box::new(move |_| (StatusCode::OK, echoed))),
            (Method::POST, "/apis/events.k8s.io/v1/namespaces/default/events".into(), Box::new(echo_event)),
        ],
    );
    let parsed: RawVolume = raw(object);
    let e = reconciler.reconcile_volume(Arc::new(parsed.clone())).await.unwrap_err();
    assert!(matches!(&e, ReconcileError::Agent(e) if e.kind() == crate::Kind::FailedPrecondition), "{e}");
    assert!(agent.volume_ids().is_empty(), "no empty volume made in its place");
    let bodies = server.await.unwrap();
    let status = &bodies[0]["status"];
    assert_eq!((&status["phase"], &status["sizeBytes"]), (&json!("Unavailable"), &json!(1 << 20)), "the size marks it");
    assert_eq!(status.get("port"), Some(&Value::Null), "no port: nothing serves it here");
    assert_eq!(status["conditions"][1]["reason"], "FailedPrecondition");
    assert!(status["conditions"][1]["message"].as_str().unwrap().contains("moved here"), "{status}");
    assert_eq!(bodies[1]["reason"], "ReconcileFailed");
    // The next pass, over the status it wrote: still nothing made, no new
    // patch and no new Event.
    let (client, handle) = mock_api::client();
    let nodes = NodeDirectory::unwatched(client.clone());
    let again = Reconciler::new(client, Arc::clone(&agent), NODE.into(), ExportKey::new(&KEY).unwrap(), nodes);
    let server = answer(handle, vec![]);
    let mut seen = parsed;
    seen.status = Some(status.clone());
    again.reconcile_volume(Arc::new(seen)).await.unwrap_err();
    server.await.unwrap();
    assert!(agent.volume_ids().is_empty());
    agent.shutdown().await;
}

/// Creates `id` in the agent directly, as an earlier reconcile would have.
async fn stored(agent: &Agent, id: &str) {
    let new = crate::NewVolume {
        id: Some(id.into()),
        name: id.into(),
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
    agent.create_volume(new).await.unwrap();
}

fn list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "nbd.csi.dev/v1alpha1", "kind": "NbdVolumeList", "metadata": {"resourceVersion": "9"}, "items": items})
}

#[tokio::test]
async fn a_volume_no_object_names_is_quarantined_and_reported_never_deleted() {
    let (dir, agent, reconciler, handle) = setup().await;
    stored(&agent, VOL).await;
    stored(&agent, ORPHAN).await;
    let snap = "snap-00000000000000000000000000000004";
    let new = crate::NewSnapshot {
        id: Some(snap.into()),
        name: "s".into(),
        source_volume_id: VOL.into(),
        parameters: Default::default(),
    };
    agent.create_snapshot(new).await.unwrap();
    let listed = list(vec![volume_object(1 << 20, &[], true)]);
    let snapshots = "/apis/nbd.csi.dev/v1alpha1/nbdsnapshots";
    let not_found = |_: &Value| (StatusCode::NOT_FOUND, status(404, "NotFound", "not found"));
    let no_snapshots = json!({"apiVersion": "nbd.csi.dev/v1alpha1", "kind": "NbdSnapshotList",
                              "metadata": {"resourceVersion": "9"}, "items": []});
    let events = "/apis/events.k8s.io/v1/namespaces/default/events";
    let server = answer(
        handle,
        vec![
            (Method::GET, VOLUMES.into(), Box::new(move |_| (StatusCode::OK, listed))),
            (Method::GET, format!("{VOLUMES}/{ORPHAN}"), Box::new(not_found)),
            (Method::POST, events.into(), Box::new(echo_event)),
            (Method::GET, snapshots.into(), Box::new(move |_| (StatusCode::OK, no_snapshots))),
            (Method::GET, format!("{snapshots}/{snap}"), Box::new(not_found)),
            (Method::POST, events.into(), Box::new(echo_event)),
        ],
    );
    assert_eq!(reconciler.quarantine_unclaimed().await.unwrap(), [ORPHAN, snap]);
    let bodies = server.await.unwrap();
    assert_eq!(agent.volume_ids(), [VOL]);
    assert!(agent.snapshots().is_empty());
    let aside = dir.path().join(crate::QUARANTINE);
    assert!(aside.join(ORPHAN).join(format!("{ORPHAN}.img")).exists(), "moved aside, not deleted");
    assert!(aside.join(snap).join(format!("{snap}.img")).exists(), "moved aside, not deleted");
    assert!(aside.join(snap).join(format!("{snap}.json")).exists());
    assert_eq!(bodies[2]["reason"], "VolumeQuarantined");
    assert_eq!(bodies[2]["regarding"]["kind"], "NbdStorageNode");
    assert_eq!(bodies[2]["regarding"]["name"], NODE);
    assert!(bodies[2]["note"].as_str().unwrap().contains(ORPHAN));
    assert_eq!(bodies[5]["reason"], "SnapshotQuarantined");
    assert!(bodies[5]["note"].as_str().unwrap().contains(snap));
    agent.shutdown().await;
    // A restart brings neither back.
    let agent = Agent::open(crate::tests::config(), dir.path(), Arc::new(LogsOnly)).await.unwrap();
    assert_eq!(agent.volume_ids(), [VOL]);
    assert!(agent.snapshots().is_empty());
    agent.shutdown().await;
}

#[tokio::test]
async fn nothing_is_quarantined_on_a_stale_list_or_a_failed_one() {
    let (_dir, agent, reconciler, handle) = setup().await;
    stored(&agent, ORPHAN).await;
    let mut found = volume_object(1 << 20, &[], true);
    found["metadata"]["name"] = json!(ORPHAN);
    let server = answer(
        handle,
        vec![
            // The list missed it, but the object is there.
            (Method::GET, VOLUMES.into(), Box::new(|_| (StatusCode::OK, list(vec![])))),
            (Method::GET, format!("{VOLUMES}/{ORPHAN}"), Box::new(move |_| (StatusCode::OK, found))),
            // The API server fails the list.
            (
                Method::GET,
                VOLUMES.into(),
                Box::new(|_| (StatusCode::INTERNAL_SERVER_ERROR, status(500, "InternalError", "etcd is down"))),
            ),
        ],
    );
    assert!(reconciler.quarantine_unclaimed().await.unwrap().is_empty());
    assert!(reconciler.quarantine_unclaimed().await.is_err());
    server.await.unwrap();
    assert_eq!(agent.volume_ids(), [ORPHAN]);
    agent.shutdown().await;
}

#[tokio::test]
async fn a_snapshot_is_cut_and_its_status_written_then_deleted_with_its_object() {
    let (_dir, agent, reconciler, handle) = setup().await;
    stored(&agent, VOL).await;
    let snap = "snap-00000000000000000000000000000003";
    let object = json!({
        "apiVersion": "nbd.csi.dev/v1alpha1", "kind": "NbdSnapshot",
        "metadata": {"name": snap, "uid": "u2", "generation": 1, "finalizers": [FINALIZER]},
        "spec": {"storageNode": NODE, "requestName": "snapshot-1", "sourceVolume": VOL}
    });
    let echoed = object.clone();
    let mut deleting = object.clone();
    deleting["metadata"]["deletionTimestamp"] = json!("2026-11-30T02:00:00Z");
    let released = deleting.clone();
    let path = "/apis/nbd.csi.dev/v1alpha1/nbdsnapshots";
    let server = answer(
        handle,
        vec![
            (Method::PATCH, format!("{path}/{snap}/status"), Box::new(move |_| (StatusCode::OK, echoed))),
            (Method::PATCH, format!("{path}/{snap}"), Box::new(move |_| (StatusCode::OK, released))),
        ],
    );
    reconciler.reconcile_snapshot(Arc::new(raw(object))).await.unwrap();
    assert_eq!(agent.snapshot(snap).unwrap().source_volume_id, VOL);
    reconciler.reconcile_snapshot(Arc::new(raw(deleting))).await.unwrap();
    let bodies = server.await.unwrap();
    assert_eq!(bodies[0]["status"]["phase"], "Ready");
    assert_eq!(bodies[0]["status"]["sizeBytes"], 1 << 20);
    assert!(bodies[0]["status"]["createdAt"].is_string());
    assert!(agent.snapshot(snap).is_none());
    agent.shutdown().await;
}

#[tokio::test]
async fn the_agent_announces_its_storage_node_and_renews_its_lease() {
    let (_dir, agent, reconciler, handle) = setup().await;
    let path = format!("/apis/nbd.csi.dev/v1alpha1/nbdstoragenodes/{NODE}");
    let leases = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases";
    let node = |body: &Value| {
        let mut object = body.clone();
        object["metadata"]["name"] = json!(NODE);
        object["apiVersion"] = json!("nbd.csi.dev/v1alpha1");
        object["kind"] = json!("NbdStorageNode");
        object["spec"] = json!({"address": "10.0.0.5", "ports": {"first": 1, "last": 2}});
        (StatusCode::OK, object)
    };
    let lease = |body: &Value| {
        let mut lease = body.clone();
        lease["metadata"]["name"] = json!(NODE);
        (StatusCode::OK, lease)
    };
    let server = answer(
        handle,
        vec![
            (Method::PATCH, path.clone(), Box::new(node)),
            (Method::PATCH, format!("{path}/status"), Box::new(node)),
            // The first renewal finds no Lease and creates it; the second renews it.
            (
                Method::PATCH,
                format!("{leases}/{NODE}"),
                Box::new(|_| (StatusCode::NOT_FOUND, status(404, "NotFound", "not found"))),
            ),
            (Method::POST, leases.into(), Box::new(move |b| (StatusCode::CREATED, lease(b).1))),
            (Method::PATCH, format!("{leases}/{NODE}"), Box::new(lease)),
        ],
    );
    reconciler.announce("10.0.0.5".parse().unwrap()).await.unwrap();
    reconciler.renew_lease("kube-system").await.unwrap();
    reconciler.renew_lease("kube-system").await.unwrap();
    let bodies = server.await.unwrap();
    let ports = agent.config().ports.clone();
    assert_eq!(
        bodies[0]["spec"],
        json!({"address": "10.0.0.5", "ports": {"first": ports.start(), "last": ports.end()}})
    );
    assert_eq!(bodies[0]["kind"], "NbdStorageNode", "a server-side apply carries its type");
    let status = &bodies[1]["status"];
    let space = agent.space().await.unwrap();
    assert_eq!(status["totalBytes"], space.total);
    assert!(status["freeBytes"].as_u64().unwrap() <= space.total);
    assert_eq!(status["agentVersion"], env!("CARGO_PKG_VERSION"));
    assert_eq!(bodies[3]["spec"]["holderIdentity"], NODE);
    assert_eq!(bodies[3]["spec"]["leaseDurationSeconds"], LEASE_DURATION.as_secs());
    assert!(bodies[3]["spec"]["acquireTime"].is_string());
    assert!(bodies[4]["spec"]["renewTime"].is_string());
    agent.shutdown().await;
}

#[tokio::test]
async fn a_write_the_api_server_never_answers_does_not_stop_the_lease_renewals() {
    let (_dir, agent, reconciler, mut handle) = setup().await;
    let reconciler = Arc::new(reconciler);
    let period = Duration::from_millis(100);
    let present = tokio::spawn(Arc::clone(&reconciler).keep_present_every(
        "10.0.0.5".parse().unwrap(),
        "ns".into(),
        period,
        period,
    ));
    // The first request is taken and never answered, as over a network that
    // drops packets; the others are answered. Renewals must keep coming.
    let renewals = async {
        let mut held = None;
        let mut renewals = 0;
        while let Some((request, send)) = handle.next_request().await {
            let renewal = request.uri().path().contains("/leases/");
            if held.is_none() {
                held = Some(send);
                continue;
            }
            let body = json_body(request).await;
            let mut object = body.clone();
            object["metadata"]["name"] = json!(NODE);
            if renewal {
                renewals += 1;
                if renewals == 3 {
                    return;
                }
            } else {
                object["apiVersion"] = json!("nbd.csi.dev/v1alpha1");
                object["kind"] = json!("NbdStorageNode");
                object["spec"] = json!({"address": "10.0.0.5", "ports": {"first": 1, "last": 2}});
            }
            reply(send, StatusCode::OK, &object);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), renewals).await.expect("three renewals after the unanswered request");
    present.abort();
    agent.shutdown().await;
}

/// The whole loop: `run` lists and watches only this node's objects (by
/// field selector) and reconciles what it finds.
#[tokio::test]
async fn run_watches_its_nodes_objects_and_reconciles_them() {
    let (_dir, agent, reconciler, mut handle) = setup().await;
    let object = volume_object(1 << 20, &[], true);
    let (patched, mut patches) = tokio::sync::mpsc::unbounded_channel();
    let lists = Arc::new(std::sync::Mutex::new(Vec::new()));
    let server = {
        let lists = Arc::clone(&lists);
        tokio::spawn(async move {
            // Watches stay open, unanswered, while the test runs.
            let mut watches = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                let (method, path) = (request.method().clone(), request.uri().path().to_owned());
                let query = request.uri().query().unwrap_or_default().to_owned();
                if query.contains("watch=true") {
                    watches.push(send);
                } else if method == Method::GET && path == VOLUMES {
                    lists.lock().unwrap().push(query);
                    reply(send, StatusCode::OK, &list(vec![object.clone()]));
                } else if method == Method::GET && path == "/apis/nbd.csi.dev/v1alpha1/nbdsnapshots" {
                    lists.lock().unwrap().push(query);
                    let empty = json!({"apiVersion": "nbd.csi.dev/v1alpha1", "kind": "NbdSnapshotList",
                                       "metadata": {"resourceVersion": "9"}, "items": []});
                    reply(send, StatusCode::OK, &empty);
                } else if method == Method::PATCH && path == format!("{VOLUMES}/{VOL}/status") {
                    patched.send(json_body(request).await).unwrap();
                    reply(send, StatusCode::OK, &object);
                } else {
                    panic!("unexpected {method} {path}?{query}");
                }
            }
        })
    };
    let running = tokio::spawn(Arc::new(reconciler).run());
    let body =
        tokio::time::timeout(Duration::from_secs(10), patches.recv()).await.expect("a status within 10 s").unwrap();
    assert_eq!(body["status"]["phase"], "Available");
    assert!(agent.volume(VOL).is_some());
    running.abort();
    let _ = running.await;
    server.abort();
    let lists = lists.lock().unwrap().clone();
    assert_eq!(lists.len(), 2, "{lists:?}");
    for query in lists {
        assert!(query.contains("fieldSelector=spec.storageNode%3Dstorage-0"), "{query}");
    }
    agent.shutdown().await;
}

#[tokio::test]
async fn an_invalid_snapshot_gets_a_condition_and_an_event_and_nothing_is_cut() {
    let (_dir, agent, reconciler, handle) = setup().await;
    stored(&agent, VOL).await;
    let snap = "snap-00000000000000000000000000000005";
    let object = json!({
        "apiVersion": "nbd.csi.dev/v1alpha1", "kind": "NbdSnapshot",
        "metadata": {"name": snap, "uid": "u3", "generation": 1, "finalizers": [FINALIZER]},
        "spec": {"storageNode": NODE, "requestName": "s", "sourceVolume": "vol-x"}
    });
    let echoed = object.clone();
    let server = answer(
        handle,
        vec![
            (
                Method::PATCH,
                format!("/apis/nbd.csi.dev/v1alpha1/nbdsnapshots/{snap}/status"),
                Box::new(move |_| (StatusCode::OK, echoed)),
            ),
            (Method::POST, "/apis/events.k8s.io/v1/namespaces/default/events".into(), Box::new(echo_event)),
        ],
    );
    let action = reconciler.reconcile_snapshot(Arc::new(raw(object))).await.unwrap();
    assert_eq!(action, Action::await_change());
    let bodies = server.await.unwrap();
    assert_eq!(bodies[0]["status"]["phase"], "Invalid");
    assert!(bodies[1]["note"].as_str().unwrap().contains("spec.sourceVolume"), "{}", bodies[1]);
    assert!(agent.snapshots().is_empty());
    agent.shutdown().await;
}

/// An object that does not even read as an NbdVolume (an access type this
/// version does not know, as a newer CRD could allow): reported on itself,
/// nothing done, and the watch of the others unaffected.
#[tokio::test]
async fn an_unreadable_volume_gets_a_condition_and_an_event_and_nothing_is_created() {
    let (_dir, agent, reconciler, handle) = setup().await;
    let mut object = volume_object(1 << 20, &[], true);
    object["spec"]["accessType"] = json!("Floppy");
    object["status"] = json!({"phase": "Pending"});
    let echoed = object.clone();
    let server = answer(
        handle,
        vec![
            (Method::PATCH, format!("{VOLUMES}/{VOL}/status"), Box::new(move |_| (StatusCode::OK, echoed))),
            (Method::POST, "/apis/events.k8s.io/v1/namespaces/default/events".into(), Box::new(echo_event)),
        ],
    );
    let unreadable: RawVolume = raw(object);
    assert!(unreadable.typed().is_err());
    let action = reconciler.reconcile_volume(Arc::new(unreadable)).await.unwrap();
    assert_eq!(action, Action::await_change());
    let bodies = server.await.unwrap();
    assert_eq!(bodies[0]["status"]["phase"], "Invalid");
    assert!(bodies[0]["status"]["conditions"][0]["message"].as_str().unwrap().contains("Floppy"), "{}", bodies[0]);
    assert_eq!(bodies[1]["reason"], "InvalidSpec");
    assert_eq!(bodies[1]["regarding"]["kind"], "NbdVolume");
    assert!(agent.volume_ids().is_empty());
    agent.shutdown().await;
}

/// A status the agent cannot read does not make a good spec invalid.
#[test]
fn a_status_that_does_not_read_is_ignored_not_held_against_the_spec() {
    let mut object = volume_object(1 << 20, &[], true);
    object["status"] = json!({"phase": "FromTheFuture"});
    let volume = raw::<RawVolume>(object).typed().expect("the spec reads");
    assert_eq!(volume.status, None);
    assert!(volume.desired().is_ok());
}
