//! Cluster mode against a real kube-apiserver with the CRDs installed:
//! `tests/k8s/crds.sh` sets it up and runs this test with
//! `NBD_CSI_TEST_KUBECONFIG`; without it the test says so and does nothing.
//!
//! Three agents run in this process, each an `agent::Agent` on its own
//! tmpfs (64, 128 and 192 MiB, so that their free space differs) with its
//! `Reconciler` and presence, serving on 127.0.1.1, 127.0.1.2 and
//! 127.0.1.3; a fourth storage node reports far more room but its Lease is
//! stale. The controller's gRPC services run in cluster mode on a Unix
//! socket and are driven through the generated CSI client.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use agent::resources::{ExportKey, NbdStorageNode, NbdVolume, NodeDirectory, Reconciler};
use agent::testing::{Client, Tmpfs, eventually};
use agent::{Agent, Config, ConnectionCaps, LogsOnly};
use csi_proto::volume_capability::access_mode::Mode;
use csi_proto::volume_content_source::{Type as SourceType, VolumeSource};
use csi_proto::*;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};

use super::{Harness, code, create_req, export_of, publish_req};
use crate::service::{self, Endpoint, StorageMode};
use crate::storage::objects::{snapshot_id, volume_id};

const NAMESPACE: &str = "default";
const SECRET: &str = "nbd-csi-export-key";
const WORKER: &str = "worker-1";
const STALE: &str = "storage-stale";
const MIB: u64 = 1 << 20;
const VOLUME: i64 = 16 << 20;
const AGENTS: [(&str, &str, u64, u16); 3] = [
    ("storage-1", "127.0.1.1", 64 * MIB, 30100),
    ("storage-2", "127.0.1.2", 128 * MIB, 30200),
    ("storage-3", "127.0.1.3", 192 * MIB, 30300),
];

/// Creates `object` unless it exists.
async fn ensure<K>(api: &Api<K>, object: &K)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(e) => panic!("creating {:?}: {e}", object.meta().name),
    }
}

/// A Node with `labels` whose only address is `address`.
async fn node(client: &kube::Client, name: &str, address: &str, labels: &[(&str, &str)]) {
    let api: Api<Node> = Api::all(client.clone());
    let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let meta = ObjectMeta { name: Some(name.into()), labels: Some(labels.clone()), ..Default::default() };
    ensure(&api, &Node { metadata: meta, ..Default::default() }).await;
    api.patch(name, &PatchParams::default(), &Patch::Merge(serde_json::json!({"metadata": {"labels": labels}})))
        .await
        .unwrap();
    let status = serde_json::json!({"status": {"addresses": [{"type": "InternalIP", "address": address}]}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
}

/// A storage node that reports 1 TiB free but whose agent's Lease was last
/// renewed ten minutes ago.
async fn stale_storage_node(client: &kube::Client) {
    let nodes: Api<NbdStorageNode> = Api::all(client.clone());
    let spec =
        serde_json::from_value(serde_json::json!({"address": "127.0.1.9", "ports": {"first": 30900, "last": 30999}}))
            .unwrap();
    ensure(&nodes, &NbdStorageNode::new(STALE, spec)).await;
    let status = serde_json::json!({"status": {"freeBytes": 1u64 << 40, "totalBytes": 1u64 << 40}});
    nodes.patch_status(STALE, &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    let long_ago =
        k8s_openapi::jiff::Timestamp::from_second(k8s_openapi::jiff::Timestamp::now().as_second() - 600).unwrap();
    let lease = Lease {
        metadata: ObjectMeta { name: Some(STALE.into()), ..Default::default() },
        spec: Some(LeaseSpec {
            holder_identity: Some(STALE.into()),
            lease_duration_seconds: Some(40),
            renew_time: Some(MicroTime(long_ago)),
            ..Default::default()
        }),
    };
    ensure(&Api::<Lease>::namespaced(client.clone(), NAMESPACE), &lease).await;
}

struct StorageAgent {
    name: &'static str,
    agent: Arc<Agent>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    // Dropped last: unmounted once the agent let go of its files.
    _disk: Tmpfs,
}

/// An agent on its own tmpfs, its reconciler and its presence, the export
/// key read from a file as a storage node mounts it from the Secret.
async fn storage_agent(
    client: &kube::Client,
    key_file: &Path,
    (name, address, bytes, first_port): (&'static str, &str, u64, u16),
) -> StorageAgent {
    let disk = Tmpfs::mount(bytes);
    let config = Config {
        listen: address.parse().unwrap(),
        ports: first_port..=first_port + 63,
        connection_caps: ConnectionCaps::default(),
        tls_dir: None,
    };
    let agent = Agent::open(config, disk.path(), Arc::new(LogsOnly)).await.unwrap();
    let key = ExportKey::from_file(key_file).unwrap();
    let nodes = NodeDirectory::watched(client.clone());
    let reconciler = Arc::new(Reconciler::new(client.clone(), Arc::clone(&agent), name.into(), key, nodes));
    let tasks = vec![
        tokio::spawn(Arc::clone(&reconciler).run()),
        tokio::spawn(Arc::clone(&reconciler).keep_present(address.parse().unwrap(), NAMESPACE.into())),
    ];
    StorageAgent { name, agent, tasks, _disk: disk }
}

fn clone_req(name: &str, source: &str) -> CreateVolumeRequest {
    CreateVolumeRequest {
        volume_content_source: Some(VolumeContentSource {
            r#type: Some(SourceType::Volume(VolumeSource { volume_id: source.into() })),
        }),
        ..create_req(name, VOLUME, false, Mode::SingleNodeWriter)
    }
}

#[tokio::test]
async fn cluster_mode_places_serves_and_fences_volumes_on_storage_nodes() {
    let Some(kubeconfig) = std::env::var_os("NBD_CSI_TEST_KUBECONFIG") else {
        eprintln!("NBD_CSI_TEST_KUBECONFIG is not set: run tests/k8s/crds.sh");
        return;
    };
    let client = csi_events::client(Some(Path::new(&kubeconfig))).await.unwrap().expect("a client");
    let volumes: Api<NbdVolume> = Api::all(client.clone());
    assert!(
        volumes.list(&ListParams::default()).await.unwrap().items.is_empty(),
        "this test needs a cluster without NbdVolumes"
    );
    node(&client, WORKER, "127.0.0.1", &[]).await;
    for (name, address, _, _) in AGENTS {
        let zone = if name == "storage-1" { "a" } else { "b" };
        node(&client, name, address, &[("nbd.csi.dev/storage", "true"), ("zone", zone)]).await;
    }
    stale_storage_node(&client).await;

    // The controller first: it creates the export-key Secret.
    let dir = tempfile::tempdir().unwrap();
    let args = service::Args {
        endpoint: Some(Endpoint::Unix(dir.path().join("csi.sock"))),
        allow_insecure_tcp_endpoint: false,
        data_dir: dir.path().join("unused"),
        driver_name: service::DEFAULT_DRIVER_NAME.into(),
        advertise_address: None,
        nbd_listen_address: "127.0.0.1".parse().unwrap(),
        nbd_port_range: 10900..=10999,
        nbd_max_connections: 128,
        nbd_max_connections_per_peer: 32,
        default_tls: Default::default(),
        tls_dir: None,
        metrics_address: None,
        kubeconfig: Some(kubeconfig.into()),
        known_nodes: Vec::new(),
        storage_mode: StorageMode::Cluster,
        export_key_secret: Some(SECRET.into()),
        namespace: Some(NAMESPACE.into()),
        storage_timeout: 30,
        tls: Default::default(),
    };
    let mut second = args.clone();
    second.endpoint = Some(Endpoint::Unix(dir.path().join("csi-2.sock")));
    let h = Harness::start_with_args(args).await;
    assert!(!dir.path().join("unused").exists(), "cluster mode keeps no data");
    let secret = Api::<Secret>::namespaced(client.clone(), NAMESPACE).get(SECRET).await.unwrap();
    let key_bytes = secret.data.unwrap().remove("key").expect("the Secret's key").0;
    assert_eq!(key_bytes.len(), 32);
    // A Secret volume writes the raw bytes as the file the agents read.
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, &key_bytes).unwrap();
    let mut agents = Vec::new();
    for spec in AGENTS {
        agents.push(storage_agent(&client, &key_file, spec).await);
    }
    let storage_nodes: Api<NbdStorageNode> = Api::all(client.clone());
    for agent in &agents {
        eventually(&format!("{} reports its free space", agent.name), || async {
            storage_nodes.get(agent.name).await.ok()?.status?.free_bytes
        })
        .await;
    }
    let mut c = h.controller().await;

    // GetCapacity: the live nodes only (not the stale one's 1 TiB).
    let mut free = BTreeMap::new();
    for agent in &agents {
        free.insert(agent.name, storage_nodes.get(agent.name).await.unwrap().status.unwrap().free_bytes.unwrap());
    }
    let capacity = c.get_capacity(GetCapacityRequest::default()).await.unwrap().into_inner();
    let whole = |b: u64| (b / MIB * MIB) as i64;
    assert_eq!(capacity.available_capacity, whole(free.values().sum()));
    assert_eq!(capacity.maximum_volume_size, Some(whole(free["storage-3"])));
    let zone_a = GetCapacityRequest {
        parameters: [("storageNodeSelector".to_owned(), "zone=a".to_owned())].into(),
        ..Default::default()
    };
    let capacity = c.get_capacity(zone_a).await.unwrap().into_inner();
    assert_eq!(capacity.available_capacity, whole(free["storage-1"]), "the selector narrows it");

    // 30 volumes, spread by free space, none on the stale node.
    let mut ids = Vec::new();
    let mut took = Vec::new();
    for i in 0..30 {
        let volume = c.create_volume(create_req(&format!("pvc-spread-{i}"), VOLUME, false, Mode::SingleNodeWriter));
        let start = std::time::Instant::now();
        let volume = volume.await.unwrap().into_inner().volume.unwrap();
        took.push(start.elapsed());
        assert_eq!(volume.volume_id, volume_id(&format!("pvc-spread-{i}")));
        assert_eq!(volume.capacity_bytes, VOLUME);
        ids.push(volume.volume_id);
    }
    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    for object in volumes.list(&ListParams::default()).await.unwrap().items {
        *spread.entry(object.spec.storage_node).or_default() += 1;
    }
    took.sort();
    println!("spread of 30 volumes of 16 MiB over free space {free:?}: {spread:?}");
    println!("CreateVolume through the API server, one at a time: median {:?}, slowest {:?}", took[15], took[29]);
    assert!(!spread.contains_key(STALE), "a storage node with a stale Lease got volumes: {spread:?}");
    let on = |name: &str| spread.get(name).copied().unwrap_or(0);
    assert_eq!(on("storage-1") + on("storage-2") + on("storage-3"), 30);
    assert!(
        on("storage-1") > 0 && on("storage-2") > on("storage-1") && on("storage-3") > on("storage-2"),
        "{spread:?}"
    );
    for agent in &agents {
        for id in volumes
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|v| v.spec.storage_node == agent.name)
        {
            let id = kube::ResourceExt::name_any(id);
            assert!(agent.agent.volume(&id).is_some(), "{id} is stored on {}", agent.name);
        }
    }

    // The same request again: the same volume, no second object; another
    // size under the same name: ALREADY_EXISTS.
    let again = c.create_volume(create_req("pvc-spread-0", VOLUME, false, Mode::SingleNodeWriter)).await.unwrap();
    assert_eq!(again.into_inner().volume.unwrap().volume_id, ids[0]);
    assert_eq!(volumes.list(&ListParams::default()).await.unwrap().items.len(), 30);
    let bigger = c.create_volume(create_req("pvc-spread-0", 2 * VOLUME, false, Mode::SingleNodeWriter)).await;
    assert_eq!(code(bigger), tonic::Code::AlreadyExists);

    // A second controller replica reads the same export key, and the same
    // CreateVolume sent to both at once makes one object, both answering
    // with it.
    let h2 = Harness::start_with_args(second).await;
    let mut c2 = h2.controller().await;
    let twice = || create_req("pvc-twice", VOLUME, false, Mode::SingleNodeWriter);
    let (first, other) = tokio::join!(c.create_volume(twice()), c2.create_volume(twice()));
    let first = first.unwrap().into_inner().volume.unwrap();
    assert_eq!(first, other.unwrap().into_inner().volume.unwrap());
    assert_eq!(volumes.list(&ListParams::default()).await.unwrap().items.len(), 31);
    ids.push(first.volume_id);

    // 9 CreateVolume at once, as the provisioner sends a burst: the
    // placements overlap (none waits for another's POST), yet each counts
    // the others' choices, so the burst spreads as one after another would
    // (the 31 above left the nodes' room within a volume of each other)
    // instead of all landing where the room was largest when it began.
    let before = volumes.list(&ListParams::default()).await.unwrap().items;
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..9 {
        let mut c = c.clone();
        let request = create_req(&format!("pvc-burst-{i}"), VOLUME, false, Mode::SingleNodeWriter);
        burst.spawn(async move { c.create_volume(request).await });
    }
    while let Some(created) = burst.join_next().await {
        ids.push(created.unwrap().unwrap().into_inner().volume.unwrap().volume_id);
    }
    let mut burst_spread: BTreeMap<String, usize> = BTreeMap::new();
    for object in volumes.list(&ListParams::default()).await.unwrap().items {
        if !before.iter().any(|b| b.metadata.name == object.metadata.name) {
            *burst_spread.entry(object.spec.storage_node).or_default() += 1;
        }
    }
    println!("spread of a burst of 9: {burst_spread:?}");
    assert_eq!(burst_spread.values().sum::<usize>(), 9);
    for (name, ..) in AGENTS.iter().filter(|a| a.0 != STALE) {
        assert!(
            burst_spread.get(*name).copied().unwrap_or(0) >= 2,
            "{name} got too few of the burst: {burst_spread:?}"
        );
    }

    // Too large for every live agent: RESOURCE_EXHAUSTED, nothing left
    // behind; smaller volumes are still accepted.
    let huge = c.create_volume(create_req("pvc-huge", 1 << 30, false, Mode::SingleNodeWriter)).await;
    assert_eq!(code(huge), tonic::Code::ResourceExhausted);
    assert!(volumes.get_opt(&volume_id("pvc-huge")).await.unwrap().is_none(), "no object for a refused volume");
    let small = c.create_volume(create_req("pvc-after-huge", VOLUME, false, Mode::SingleNodeWriter)).await.unwrap();
    ids.push(small.into_inner().volume.unwrap().volume_id);

    // A clone lands on its source's node.
    let source_node = volumes.get(&ids[0]).await.unwrap().spec.storage_node;
    let clone = c.create_volume(clone_req("pvc-clone", &ids[0])).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(volumes.get(&clone.volume_id).await.unwrap().spec.storage_node, source_node);
    ids.push(clone.volume_id);

    // Publish: the nbdUri is the storage node's address and the volume's
    // port there; the export answers from 127.0.0.1 (worker-1).
    let published = c.controller_publish_volume(publish_req(&ids[0], WORKER, false, Mode::SingleNodeWriter, false));
    let context = published.await.unwrap().into_inner().publish_context;
    let (authority, export) = export_of(&context);
    let source_address = AGENTS.iter().find(|a| a.0 == source_node).unwrap().1;
    let port = volumes.get(&ids[0]).await.unwrap().status.unwrap().port.unwrap();
    assert_eq!(authority, format!("{source_address}:{port}"));
    assert_eq!(export, ExportKey::new(&key_bytes).unwrap().export_name(&ids[0]));
    let mut nbd = Client::connect(&authority, &export).await.expect("worker-1 attaches");
    assert_eq!(nbd.size, VOLUME as u64);
    let pattern = vec![0xa5u8; 4096];
    assert_eq!(nbd.write(8192, &pattern).await.unwrap(), 0);
    assert_eq!(nbd.read(8192, 4096).await.unwrap(), pattern);
    // Published again with the same options: the same context.
    let again = c.controller_publish_volume(publish_req(&ids[0], WORKER, false, Mode::SingleNodeWriter, false));
    assert_eq!(again.await.unwrap().into_inner().publish_context, context);

    let from_second = c2.controller_publish_volume(publish_req(&ids[0], WORKER, false, Mode::SingleNodeWriter, false));
    assert_eq!(from_second.await.unwrap().into_inner().publish_context, context, "the same key on both replicas");
    h2.stop().await;

    // Expanded online: the connected client's export grows.
    let expand = ControllerExpandVolumeRequest {
        volume_id: ids[0].clone(),
        capacity_range: Some(CapacityRange { required_bytes: 2 * VOLUME, limit_bytes: 0 }),
        ..Default::default()
    };
    let expanded = c.controller_expand_volume(expand).await.unwrap().into_inner();
    assert_eq!((expanded.capacity_bytes, expanded.node_expansion_required), (2 * VOLUME, true));

    // Unpublish: the connection is stopped and a new one refused.
    let unpublish =
        ControllerUnpublishVolumeRequest { volume_id: ids[0].clone(), node_id: WORKER.into(), ..Default::default() };
    c.controller_unpublish_volume(unpublish.clone()).await.unwrap();
    assert!(nbd.is_closed().await, "unpublished: the connection was stopped");
    let refused = Client::connect(&authority, &export).await;
    assert!(refused.is_err(), "an unpublished export admits nobody");
    c.controller_unpublish_volume(unpublish).await.expect("unpublishing again is a no-op");

    // A snapshot is cut on its volume's node, and restores there.
    let snapshot =
        CreateSnapshotRequest { name: "snap-1".into(), source_volume_id: ids[0].clone(), ..Default::default() };
    let snapshot = c.create_snapshot(snapshot).await.unwrap().into_inner().snapshot.unwrap();
    assert_eq!(snapshot.snapshot_id, snapshot_id("snap-1"));
    assert!(snapshot.ready_to_use);
    assert_eq!(snapshot.size_bytes, 2 * VOLUME);
    let restore = CreateVolumeRequest {
        volume_content_source: Some(VolumeContentSource {
            r#type: Some(SourceType::Snapshot(csi_proto::volume_content_source::SnapshotSource {
                snapshot_id: snapshot.snapshot_id.clone(),
            })),
        }),
        ..create_req("pvc-restored", 0, false, Mode::SingleNodeWriter)
    };
    let restored = c.create_volume(restore).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(restored.capacity_bytes, 2 * VOLUME, "a restore gets the snapshot's size");
    assert_eq!(volumes.get(&restored.volume_id).await.unwrap().spec.storage_node, source_node);
    ids.push(restored.volume_id);
    let listed = c.list_snapshots(ListSnapshotsRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.entries.len(), 1);
    c.delete_snapshot(DeleteSnapshotRequest { snapshot_id: snapshot.snapshot_id, ..Default::default() }).await.unwrap();

    // ListVolumes and ControllerGetVolume answer from the objects.
    let listed = c.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.entries.len(), ids.len());
    let got = c.controller_get_volume(ControllerGetVolumeRequest { volume_id: ids[0].clone() }).await.unwrap();
    let status = got.into_inner().status.unwrap();
    assert!(status.published_node_ids.is_empty());
    assert!(!status.volume_condition.unwrap().abnormal);

    // Deleted: each object gone, and its data with it.
    for id in &ids {
        c.delete_volume(DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() }).await.unwrap();
        assert!(volumes.get_opt(id).await.unwrap().is_none(), "{id} is gone when DeleteVolume returns");
        assert!(agents.iter().all(|a| a.agent.volume(id).is_none()), "{id}'s data is gone");
    }

    h.stop().await;
    for agent in agents {
        for task in &agent.tasks {
            task.abort();
        }
        agent.agent.shutdown().await;
    }
}
