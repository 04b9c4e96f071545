//! The reconciler against a real kube-apiserver with the CRDs installed
//! and a Node `worker-1` at 127.0.0.1: `tests/k8s/crds.sh` sets that up
//! and runs this test with `NBD_CSI_TEST_KUBECONFIG`; without it the test
//! says so and does nothing.

#![cfg(feature = "kubernetes")]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use nbd_csi_agent::resources::{
    AccessType, ExportKey, FINALIZER, NbdStorageNode, NbdVolume, NbdVolumeSpec, NodeDirectory, PublishedTo, Reconciler,
    VolumePhase,
};
use nbd_csi_agent::testing::{Client, eventually};
use nbd_csi_agent::{Agent, Config, ConnectionCaps, LogsOnly, NewVolume};

const VOL: &str = "vol-0000000000000000000000000000a001";
const ORPHAN: &str = "vol-0000000000000000000000000000a002";
const NODE: &str = "storage-0";
const KEY: [u8; 32] = [3; 32];

#[tokio::test]
async fn the_reconciler_drives_an_agent_from_objects_on_a_real_api_server() {
    let Some(kubeconfig) = std::env::var_os("NBD_CSI_TEST_KUBECONFIG") else {
        eprintln!("NBD_CSI_TEST_KUBECONFIG is not set: run tests/k8s/crds.sh");
        return;
    };
    let client = csi_events::client(Some(Path::new(&kubeconfig))).await.unwrap().expect("a client");
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        listen: "127.0.0.1".parse().unwrap(),
        ports: 29860..=29869,
        connection_caps: ConnectionCaps::default(),
        tls_dir: None,
    };
    let agent = Agent::open(config, dir.path(), Arc::new(LogsOnly)).await.unwrap();
    let nodes = NodeDirectory::watched(client.clone());
    let reconciler = Arc::new(Reconciler::new(
        client.clone(),
        Arc::clone(&agent),
        NODE.into(),
        ExportKey::new(&KEY).unwrap(),
        nodes,
    ));
    let running = tokio::spawn(Arc::clone(&reconciler).run());
    let volumes: Api<NbdVolume> = Api::all(client.clone());

    // Created, served and published to worker-1 (127.0.0.1).
    let spec = NbdVolumeSpec {
        storage_node: NODE.into(),
        request_name: "pvc-1".into(),
        size_bytes: 1 << 20,
        access_type: AccessType::Block,
        fs_type: String::new(),
        access_modes: Vec::new(),
        read_only: false,
        parameters: BTreeMap::new(),
        source: None,
        published_to: vec![PublishedTo { node: "worker-1".into(), read_only: false, access_mode: None }],
        tls: Default::default(),
    };
    volumes.create(&PostParams::default(), &NbdVolume::new(VOL, spec)).await.unwrap();
    let object = eventually("status Available", || async {
        let object = volumes.get(VOL).await.ok()?;
        (object.status.as_ref()?.phase == VolumePhase::Available).then_some(object)
    })
    .await;
    assert!(object.metadata.finalizers.unwrap_or_default().contains(&FINALIZER.to_string()));
    let status = object.status.unwrap();
    let port = status.port.expect("a port");
    let export_name = ExportKey::new(&KEY).unwrap().export_name(VOL);
    let stored = serde_json::to_string(&volumes.get(VOL).await.unwrap()).unwrap();
    assert!(!stored.contains(&export_name), "the object carries no export name: {stored}");
    let mut nbd = Client::connect(&format!("127.0.0.1:{port}"), &export_name).await.expect("worker-1 attaches");
    assert_eq!(nbd.size, 1 << 20);

    // Grown online, and unpublished: worker-1's connection is stopped.
    let patch = serde_json::json!({"spec": {"sizeBytes": 2 << 20, "publishedTo": []}});
    volumes.patch(VOL, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    eventually("status with the new size", || async {
        (volumes.get(VOL).await.ok()?.status?.size_bytes == Some(2 << 20)).then_some(())
    })
    .await;
    assert!(nbd.is_closed().await, "unpublished: the connection was stopped");

    // Deleted: data first, then the finalizer, then the object.
    volumes.delete(VOL, &DeleteParams::default()).await.unwrap();
    eventually("the object gone", || async { volumes.get_opt(VOL).await.ok()?.is_none().then_some(()) }).await;
    assert!(agent.volume(VOL).is_none(), "its data was deleted with it");

    // A volume no object names is quarantined and reported, not deleted.
    let orphan = NewVolume {
        id: Some(ORPHAN.into()),
        name: "orphan".into(),
        capacity_bytes: 1 << 20,
        block: true,
        access_modes: vec![1],
        fs_type: String::new(),
        parameters: BTreeMap::new(),
        source: None,
        read_only: false,
        export_name: None,
        tls: Default::default(),
    };
    agent.create_volume(orphan).await.unwrap();
    assert_eq!(reconciler.quarantine_unclaimed().await.unwrap(), [ORPHAN]);
    assert!(dir.path().join("quarantine").join(ORPHAN).join(format!("{ORPHAN}.img")).exists());
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let listed = events.list(&Default::default()).await.unwrap();
    assert!(
        listed.items.iter().any(|e| e.reason.as_deref() == Some("VolumeQuarantined")
            && e.note.as_deref().is_some_and(|n| n.contains(ORPHAN))),
        "a VolumeQuarantined Event"
    );

    // Its NbdStorageNode and Lease.
    reconciler.announce("127.0.0.1".parse().unwrap()).await.unwrap();
    reconciler.renew_lease("default").await.unwrap();
    reconciler.renew_lease("default").await.unwrap();
    let node = Api::<NbdStorageNode>::all(client.clone()).get(NODE).await.unwrap();
    assert_eq!(node.spec.address, "127.0.0.1");
    assert!(node.status.unwrap().total_bytes.unwrap() > 0);
    let lease = Api::<Lease>::namespaced(client, "default").get(NODE).await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some(NODE));

    running.abort();
    agent.shutdown().await;
}
