use std::collections::BTreeMap;

use kube::CustomResourceExt;
use serde_json::json;

use super::*;
use crate::{ExportTls, Source};

const VOL: &str = "vol-0123456789abcdef0123456789abcdef";
const SNAP: &str = "snap-0123456789abcdef0123456789abcdef";

fn volume() -> NbdVolume {
    let mut volume = NbdVolume::new(
        VOL,
        NbdVolumeSpec {
            storage_node: "storage-0.example.internal".into(),
            request_name: "pvc-1".into(),
            size_bytes: 1 << 30,
            access_type: AccessType::Mount,
            fs_type: "ext4".into(),
            access_modes: vec![AccessMode::SingleNodeWriter],
            read_only: false,
            parameters: BTreeMap::from([("tier".into(), "fast".into())]),
            source: Some(VolumeSource::Snapshot(SNAP.into())),
            published_to: vec![
                PublishedTo {
                    node: "worker-1".into(),
                    read_only: false,
                    access_mode: Some(AccessMode::SingleNodeWriter),
                },
                PublishedTo { node: "worker-2".into(), read_only: true, access_mode: None },
            ],
            tls: ExportTls::Required,
        },
    );
    volume.metadata.generation = Some(3);
    volume.status = Some(NbdVolumeStatus {
        phase: VolumePhase::Available,
        observed_generation: Some(3),
        port: Some(10809),
        size_bytes: Some(1 << 30),
        conditions: vec![Condition::new(ConditionType::Ready, ConditionStatus::True, "Served", "")],
    });
    volume
}

#[test]
fn a_volume_round_trips_through_json_and_yaml_with_camel_case_fields() {
    let volume = volume();
    let value = serde_json::to_value(&volume).unwrap();
    assert_eq!(value["apiVersion"], "nbd.csi.dev/v1alpha1");
    assert_eq!(value["kind"], "NbdVolume");
    assert_eq!(value["spec"]["storageNode"], "storage-0.example.internal");
    assert_eq!(value["spec"]["sizeBytes"], 1 << 30);
    assert_eq!(value["spec"]["accessType"], "Mount");
    assert_eq!(value["spec"]["accessModes"], json!(["SingleNodeWriter"]));
    assert_eq!(value["spec"]["source"], json!({"snapshot": SNAP}));
    assert_eq!(value["spec"]["publishedTo"][1], json!({"node": "worker-2", "readOnly": true}));
    assert_eq!(value["spec"]["tls"], "required");
    assert_eq!(volume.desired().unwrap().tls, ExportTls::Required);
    let mut plain = volume.clone();
    plain.spec.tls = ExportTls::Off;
    let plain = serde_json::to_value(&plain).unwrap();
    assert!(plain["spec"].get("tls").is_none(), "off is left out, as in objects made before TLS");
    assert_eq!(parse::<NbdVolume>(plain).unwrap().spec.tls, ExportTls::Off);
    assert_eq!(value["status"]["observedGeneration"], 3);
    assert_eq!(value["status"]["conditions"][0]["type"], "Ready");
    assert_eq!(parse::<NbdVolume>(value).unwrap(), volume);
    let yaml = serde_saphyr::to_string(&volume).unwrap();
    assert!(yaml.contains("publishedTo:"), "{yaml}");
    let back: NbdVolume = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(back, volume);
}

#[test]
fn a_snapshot_and_a_storage_node_round_trip() {
    let mut snapshot = NbdSnapshot::new(
        SNAP,
        NbdSnapshotSpec {
            storage_node: "storage-0".into(),
            request_name: "snapshot-1".into(),
            source_volume: VOL.into(),
            parameters: BTreeMap::new(),
        },
    );
    snapshot.status = Some(NbdSnapshotStatus {
        phase: SnapshotPhase::Ready,
        size_bytes: Some(4096),
        created_at: Some("2026-11-30T01:00:00Z".into()),
        source_block: Some(false),
        ..Default::default()
    });
    let value = serde_json::to_value(&snapshot).unwrap();
    assert_eq!(value["spec"]["sourceVolume"], VOL);
    assert_eq!(value["status"]["createdAt"], "2026-11-30T01:00:00Z");
    assert_eq!(parse::<NbdSnapshot>(value).unwrap(), snapshot);
    let desired = snapshot.desired().unwrap();
    assert_eq!((desired.id.as_str(), desired.source_volume.as_str()), (SNAP, VOL));

    let mut node = NbdStorageNode::new(
        "storage-0",
        NbdStorageNodeSpec { address: "10.0.0.5".into(), ports: PortRange { first: 10809, last: 10909 } },
    );
    node.status = Some(NbdStorageNodeStatus {
        total_bytes: Some(100),
        free_bytes: Some(40),
        agent_version: "0.1.0".into(),
        serves_tls: true,
        conditions: vec![],
    });
    let value = serde_json::to_value(&node).unwrap();
    assert_eq!(value["status"]["freeBytes"], 40);
    assert_eq!(value["status"]["servesTls"], true);
    assert_eq!(value["spec"]["ports"], json!({"first": 10809, "last": 10909}));
    assert_eq!(parse::<NbdStorageNode>(value).unwrap(), node);
    assert_eq!(node.endpoint().unwrap(), ("10.0.0.5".parse().unwrap(), 10809..=10909));
}

#[test]
fn a_valid_volume_reads_as_what_the_agent_acts_on() {
    let desired = volume().desired().unwrap();
    assert_eq!(desired.id, VOL);
    assert_eq!(desired.generation, Some(3));
    assert!(!desired.block);
    assert_eq!(desired.access_modes, [1]);
    assert_eq!(desired.source, Some(Source::Snapshot(SNAP.into())));
    assert_eq!(desired.published, BTreeMap::from([("worker-1".into(), (false, 1)), ("worker-2".into(), (true, 0))]));
}

/// A hand-edited object: every bad field gives an error naming the object
/// and the field, never a panic.
#[test]
fn a_hand_edited_volume_with_bad_fields_gives_a_clear_error() {
    let good = serde_json::to_value(volume()).unwrap();
    let edit = |pointer: &str, value: serde_json::Value| {
        let mut object = good.clone();
        *object.pointer_mut(pointer).unwrap() = value;
        object
    };
    // Wrong types: the parse names the object and what it wanted.
    for (pointer, value, expected) in [
        ("/spec/sizeBytes", json!("big"), "expected u64"),
        ("/spec/sizeBytes", json!(-1), "expected u64"),
        ("/spec/accessType", json!("Floppy"), "Floppy"),
        ("/spec/publishedTo", json!([{"readOnly": true}]), "missing field `node`"),
        ("/status/port", json!(70000), "expected u16"),
    ] {
        let err = parse::<NbdVolume>(edit(pointer, value)).unwrap_err();
        assert_eq!((err.kind.as_str(), err.name.as_str()), ("NbdVolume", VOL));
        assert!(err.to_string().contains(expected), "{pointer}: {err}");
        assert!(err.to_string().starts_with(&format!("NbdVolume {VOL:?}: ")), "{err}");
    }
    // Right types, wrong values: the check names the field.
    for (pointer, value, field) in [
        ("/metadata/name", json!("vol-../../etc"), "metadata.name"),
        ("/spec/sizeBytes", json!(0), "spec.sizeBytes"),
        ("/spec/storageNode", json!("Storage_0"), "spec.storageNode"),
        ("/spec/storageNode", json!("a".repeat(254)), "spec.storageNode"),
        ("/spec/source", json!({"volume": VOL}), "spec.source"),
        ("/spec/source", json!({"snapshot": "snap-x"}), "spec.source"),
        ("/spec/publishedTo/1/node", json!("worker-1"), "spec.publishedTo"),
        ("/spec/publishedTo/0/node", json!("-worker"), "spec.publishedTo[0].node"),
    ] {
        let object = parse::<NbdVolume>(edit(pointer, value)).expect("well-typed");
        let err = object.desired().unwrap_err();
        assert_eq!(err.kind, "NbdVolume");
        assert!(err.problem.contains(field), "{pointer}: {err}");
    }
}

#[test]
fn bad_snapshots_and_storage_nodes_give_clear_errors() {
    let snapshot = |name: &str, source: &str| {
        NbdSnapshot::new(
            name,
            NbdSnapshotSpec {
                storage_node: "storage-0".into(),
                request_name: "s".into(),
                source_volume: source.into(),
                parameters: BTreeMap::new(),
            },
        )
    };
    assert!(snapshot(VOL, VOL).desired().unwrap_err().problem.contains("metadata.name"));
    assert!(snapshot(SNAP, SNAP).desired().unwrap_err().problem.contains("spec.sourceVolume"));
    let node = |address: &str, first, last| {
        NbdStorageNode::new(
            "storage-0",
            NbdStorageNodeSpec { address: address.into(), ports: PortRange { first, last } },
        )
    };
    assert!(node("storage-0", 1, 2).endpoint().unwrap_err().problem.contains("spec.address"));
    assert!(node("10.0.0.5", 2000, 1000).endpoint().unwrap_err().problem.contains("spec.ports"));
    assert!(node("10.0.0.5", 0, 1000).endpoint().unwrap_err().problem.contains("spec.ports"));
    let err = parse::<NbdStorageNode>(json!({
        "apiVersion": "nbd.csi.dev/v1alpha1", "kind": "NbdStorageNode",
        "metadata": {"name": "storage-0"}, "spec": {"address": "10.0.0.5", "ports": {"first": 1}}
    }))
    .unwrap_err();
    assert!(err.to_string().contains("missing field `last`"), "{err}");
}

#[test]
fn node_names_are_dns_subdomains() {
    for good in ["a", "worker-1", "ip-10-0-0-1.ec2.internal", &"a".repeat(63)] {
        assert!(is_node_name(good), "{good}");
    }
    for bad in ["", "-a", "a-", "A", "a..b", "a_b", ".a", &"a".repeat(254)] {
        assert!(!is_node_name(bad), "{bad}");
    }
}

#[test]
fn access_modes_map_to_csi_values_both_ways() {
    for value in 1..=7 {
        assert_eq!(AccessMode::from_csi(value).map(AccessMode::csi_value), Some(value));
    }
    assert_eq!(AccessMode::from_csi(0), None);
    assert_eq!(AccessMode::from_csi(8), None);
}

#[test]
fn a_condition_keeps_its_transition_time_until_its_status_changes() {
    let mut conditions = Vec::new();
    let ready = |status| Condition::new(ConditionType::Ready, status, "Served", "");
    Condition::set(&mut conditions, ready(ConditionStatus::True), "t1");
    Condition::set(&mut conditions, ready(ConditionStatus::True), "t2");
    assert_eq!(conditions[0].last_transition_time.as_deref(), Some("t1"));
    Condition::set(&mut conditions, ready(ConditionStatus::False), "t3");
    assert_eq!(conditions.len(), 1);
    assert_eq!(conditions[0].last_transition_time.as_deref(), Some("t3"));
}

/// The schema carries the cheap rules, for the API server to enforce.
#[test]
fn the_crds_carry_the_validation_rules() {
    let crds = serde_json::to_string(&crds()).unwrap();
    for rule in [
        "self.first <= self.last",
        "self.sizeBytes >= oldSelf.sizeBytes",
        "self.metadata.name.matches('^vol-[0-9a-f]{32}$')",
        "self.metadata.name.matches('^snap-[0-9a-f]{32}$')",
    ] {
        assert!(crds.contains(rule), "{rule}");
    }
    let volume = serde_json::to_value(NbdVolume::crd()).unwrap();
    let spec = &volume["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(spec["sizeBytes"]["minimum"].as_f64(), Some(1.0));
    assert_eq!(spec["storageNode"]["pattern"], super::invalid::NODE_NAME_PATTERN);
    assert_eq!(spec["publishedTo"]["x-kubernetes-list-map-keys"], json!(["node"]));
    assert_eq!(volume["spec"]["scope"], "Cluster");
    assert_eq!(volume["spec"]["versions"][0]["subresources"]["status"], json!({}));
}

/// The chart installs what the types generate, byte for byte.
#[test]
fn the_charts_crds_are_the_generated_ones() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(CRD_FILE);
    let chart = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = crds_yaml().unwrap();
    assert!(
        chart == generated,
        "{} differs from the CRDs the types generate; regenerate it from the repository root with \
         `cargo run -p nbd-csi-controller -- crds > {CRD_FILE}`",
        path.display()
    );
    // One document per resource, each a CRD that reads back.
    let documents: Vec<_> = generated.split("\n---\n").skip(1).collect();
    assert_eq!(documents.len(), 3);
    for (document, crd) in documents.iter().zip(crds()) {
        let back: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
            serde_saphyr::from_str(document).unwrap();
        assert_eq!(back.metadata.name, crd.metadata.name);
    }
}

#[test]
fn export_names_derive_deterministically_per_key_and_volume() {
    let key = ExportKey::new(&[7; 32]).unwrap();
    let name = key.export_name(VOL);
    assert_eq!(name.len(), 64);
    assert!(name.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(ExportKey::new(&[7; 32]).unwrap().export_name(VOL), name, "same key, same id: same name");
    let other_id = VOL.replace('0', "1");
    assert_ne!(key.export_name(&other_id), name, "another volume, another name");
    let mut other_key = [7; 32];
    other_key[31] = 8;
    assert_ne!(ExportKey::new(&other_key).unwrap().export_name(VOL), name, "another key, another name");
    // HMAC-SHA256 itself, not something else that happens to be stable.
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[7; 32]),
        format!("nbd-csi export name v1\0{VOL}").as_bytes(),
    );
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(name, hex);
    assert_eq!(format!("{key:?}"), "ExportKey(..)", "Debug shows no key bytes");
}

#[test]
fn export_keys_are_long_enough_and_read_with_a_cap() {
    assert!(matches!(ExportKey::new(&[1; 31]), Err(KeyError::TooShort(31))));
    assert!(matches!(ExportKey::new(&[1; ExportKey::MAX_LEN + 1]), Err(KeyError::TooLong)));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    std::fs::write(&path, [9u8; 48]).unwrap();
    let from_file = ExportKey::from_file(&path).unwrap();
    assert_eq!(from_file.export_name(VOL), ExportKey::new(&[9; 48]).unwrap().export_name(VOL));
    std::fs::write(&path, vec![9u8; 1 << 20]).unwrap();
    assert!(matches!(ExportKey::from_file(&path), Err(KeyError::TooLong)));
    let err = ExportKey::from_file(&dir.path().join("missing")).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

/// What an NbdVolume says never lets a reader attach it: neither the name
/// derived from the cluster key nor the random one in the agent's record
/// appears in a published volume's object, and no field could carry one.
#[tokio::test]
async fn a_published_volume_object_carries_no_export_name() {
    let key = ExportKey::new(&[5; 32]).unwrap();
    let derived = key.export_name(VOL);
    let dir = tempfile::tempdir().unwrap();
    let agent =
        crate::Agent::open(crate::tests::config(), dir.path(), std::sync::Arc::new(crate::LogsOnly)).await.unwrap();
    let new = crate::NewVolume {
        id: Some(VOL.into()),
        name: "pvc-1".into(),
        capacity_bytes: 1 << 20,
        block: false,
        access_modes: vec![1],
        fs_type: "ext4".into(),
        parameters: BTreeMap::new(),
        source: None,
        read_only: false,
        export_name: Some(derived.clone()),
        tls: Default::default(),
    };
    let record = agent.create_volume(new).await.unwrap();
    assert_eq!(record.export_name, derived);
    let mut object = volume();
    object.spec.source = None;
    object.status.as_mut().unwrap().port = Some(10809);
    let yaml = serde_saphyr::to_string(&object).unwrap();
    let json = serde_json::to_string(&object).unwrap();
    assert!(!object.spec.published_to.is_empty());
    for text in [&yaml, &json] {
        assert!(!text.contains(&derived), "{text}");
        assert!(!text.to_lowercase().contains("export"), "{text}");
    }
    assert!(!crds_yaml().unwrap().to_lowercase().contains("exportname"), "no field for one in any schema");
    agent.shutdown().await;
}

mod plans {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::IpAddr;

    use super::super::plan::{self, VolumeAction};
    use super::*;
    use crate::error::{Error, Kind};
    use crate::{Publication, VolumeRecord, VolumeStatus};

    fn desired(size: u64, published: &[(&str, bool)]) -> DesiredVolume {
        let mut volume = volume();
        volume.spec.size_bytes = size;
        volume.spec.published_to = published
            .iter()
            .map(|(node, read_only)| PublishedTo { node: (*node).into(), read_only: *read_only, access_mode: None })
            .collect();
        volume.desired().unwrap()
    }

    fn record(size: u64, published: BTreeMap<String, Publication>) -> VolumeRecord {
        VolumeRecord {
            format: crate::FORMAT,
            id: VOL.into(),
            name: "pvc-1".into(),
            capacity_bytes: size,
            block: false,
            access_modes: vec![1],
            fs_type: "ext4".into(),
            parameters: BTreeMap::new(),
            source: None,
            port: Some(10809),
            export_name: "secret".into(),
            read_only: false,
            published,
            tls: Default::default(),
        }
    }

    fn ips(list: &[&str]) -> Option<Vec<IpAddr>> {
        Some(list.iter().map(|a| a.parse().unwrap()).collect())
    }

    fn publication(read_only: bool, addresses: &[&str]) -> Publication {
        Publication { read_only, access_mode: 0, addresses: ips(addresses) }
    }

    #[test]
    fn a_missing_volume_is_created_then_published_with_the_nodes_addresses() {
        let want = desired(1 << 20, &[("worker-1", false), ("worker-2", true)]);
        let addresses = BTreeMap::from([("worker-1".to_string(), ips(&["10.0.0.1"]))]);
        let actions = plan::volume_actions(&want, None, &addresses);
        let published = BTreeMap::from([
            ("worker-1".to_string(), publication(false, &["10.0.0.1"])),
            ("worker-2".to_string(), publication(true, &[])),
        ]);
        assert_eq!(
            actions,
            [VolumeAction::Create, VolumeAction::SetAccess(published)],
            "an unresolved node admits nothing"
        );
        assert_eq!(plan::volume_actions(&desired(1, &[]), None, &BTreeMap::new()), [VolumeAction::Create]);
    }

    #[test]
    fn an_existing_volume_grows_and_changes_access_only_where_the_spec_differs() {
        let addresses = BTreeMap::from([("worker-1".to_string(), ips(&["10.0.0.1"]))]);
        let published = BTreeMap::from([("worker-1".to_string(), publication(false, &["10.0.0.1"]))]);
        let same = record(1 << 20, published.clone());
        let want = desired(1 << 20, &[("worker-1", false)]);
        assert_eq!(plan::volume_actions(&want, Some(&same), &addresses), [], "nothing to do");
        assert_eq!(
            plan::volume_actions(&desired(1 << 19, &[("worker-1", false)]), Some(&same), &addresses),
            [],
            "never shrinks"
        );
        assert_eq!(
            plan::volume_actions(&desired(2 << 20, &[("worker-1", false)]), Some(&same), &addresses),
            [VolumeAction::Grow(2 << 20)]
        );
        let moved = BTreeMap::from([("worker-1".to_string(), ips(&["10.0.0.9"]))]);
        let actions = plan::volume_actions(&want, Some(&same), &moved);
        let expected = BTreeMap::from([("worker-1".to_string(), publication(false, &["10.0.0.9"]))]);
        assert_eq!(actions, [VolumeAction::SetAccess(expected)], "the node's address changed");
        let read_only = desired(1 << 20, &[("worker-1", true)]);
        assert!(matches!(&plan::volume_actions(&read_only, Some(&same), &addresses)[..], [VolumeAction::SetAccess(_)]));
        assert_eq!(
            plan::volume_actions(&desired(1 << 20, &[]), Some(&same), &addresses),
            [VolumeAction::SetAccess(BTreeMap::new())],
            "unpublished"
        );
    }

    #[test]
    fn deleting_fences_every_node_before_the_data_goes() {
        assert_eq!(plan::cleanup_actions(None), []);
        assert_eq!(plan::cleanup_actions(Some(&record(1, BTreeMap::new()))), [VolumeAction::Delete]);
        let published = record(1, BTreeMap::from([("worker-1".to_string(), publication(false, &[]))]));
        assert_eq!(
            plan::cleanup_actions(Some(&published)),
            [VolumeAction::SetAccess(BTreeMap::new()), VolumeAction::Delete]
        );
    }

    #[test]
    fn a_volume_stored_before_but_not_here_is_stored_elsewhere_and_keeps_its_mark() {
        let served = NbdVolumeStatus { size_bytes: Some(1 << 20), ..Default::default() };
        let stored = record(1 << 20, BTreeMap::new());
        assert!(plan::stored_elsewhere(Some(&served), None));
        assert!(!plan::stored_elsewhere(Some(&served), Some(&stored)), "stored here");
        assert!(!plan::stored_elsewhere(None, None), "a new object");
        assert!(!plan::stored_elsewhere(Some(&NbdVolumeStatus::default()), None), "never stored: a failed create");
        let unpublished = NbdVolumeStatus { port: None, ..served.clone() };
        assert!(plan::stored_elsewhere(Some(&unpublished), None), "a volume published nowhere has no port");

        let refused = Error::precondition("not stored here");
        let want = desired(1 << 20, &[]);
        let status = plan::volume_status(Ok(&want), Some(3), None, Some(&refused), Some(&served), "t1");
        assert_eq!(status.size_bytes, Some(1 << 20), "kept, so that the next pass still sees it");
        assert_eq!(status.phase, VolumePhase::Unavailable);
        let ready = status.conditions.iter().find(|c| c.type_ == ConditionType::Ready).unwrap();
        assert_eq!((ready.status, ready.reason.as_str()), (ConditionStatus::False, "FailedPrecondition"));
        assert!(plan::stored_elsewhere(Some(&status), None), "and it still is on the next pass");
    }

    #[test]
    fn unclaimed_volumes_are_those_no_object_names() {
        let stored = vec!["vol-a".to_string(), "vol-b".to_string()];
        let claimed = BTreeSet::from(["vol-b".to_string(), "vol-c".to_string()]);
        assert_eq!(plan::unclaimed(&stored, &claimed), ["vol-a"]);
    }

    #[test]
    fn a_status_patch_deletes_what_the_new_status_leaves_out() {
        let before = NbdVolumeStatus {
            phase: VolumePhase::Available,
            observed_generation: Some(3),
            port: Some(10809),
            size_bytes: Some(1 << 20),
            conditions: Vec::new(),
        };
        let after = NbdVolumeStatus { port: None, observed_generation: Some(4), ..before.clone() };
        let patch = plan::status_patch(Some(&before), &after);
        assert_eq!(
            patch,
            serde_json::json!({"status": {"phase": "Available", "observedGeneration": 4, "port": null, "sizeBytes": 1048576}})
        );
        let first = plan::status_patch(None, &after);
        assert_eq!(first["status"].get("port"), None, "nothing to delete on a first status");
    }

    #[test]
    fn the_status_says_what_the_agent_made_of_the_spec() {
        let want = desired(1 << 20, &[]);
        let serving = VolumeStatus { record: record(1 << 20, BTreeMap::new()), condition: crate::Condition::Serving };
        let status = plan::volume_status(Ok(&want), Some(4), Some(&serving), None, None, "t1");
        assert_eq!(status.phase, VolumePhase::Available);
        assert_eq!((status.port, status.size_bytes, status.observed_generation), (Some(10809), Some(1 << 20), Some(4)));
        let ready = status.conditions.iter().find(|c| c.type_ == ConditionType::Ready).unwrap();
        assert_eq!((ready.status, ready.last_transition_time.as_deref()), (ConditionStatus::True, Some("t1")));

        let idle = VolumeStatus {
            record: VolumeRecord { port: None, ..serving.record.clone() },
            condition: crate::Condition::Unpublished,
        };
        let unpublished = plan::volume_status(Ok(&want), Some(4), Some(&idle), None, Some(&status), "t1");
        assert_eq!((unpublished.phase, unpublished.port), (VolumePhase::Available, None), "no port, still usable");
        let ready = unpublished.conditions.iter().find(|c| c.type_ == ConditionType::Ready).unwrap();
        assert_eq!((ready.status, ready.reason.as_str()), (ConditionStatus::True, "Unpublished"));

        let broken = VolumeStatus { condition: crate::Condition::Broken("image gone".into()), ..serving.clone() };
        let status = plan::volume_status(Ok(&want), Some(4), Some(&broken), None, Some(&status), "t2");
        assert_eq!(status.phase, VolumePhase::Unavailable);
        let ready = status.conditions.iter().find(|c| c.type_ == ConditionType::Ready).unwrap();
        assert_eq!((ready.reason.as_str(), ready.message.as_str()), ("ImageMissing", "image gone"));
        assert_eq!(ready.last_transition_time.as_deref(), Some("t2"));
        let valid = status.conditions.iter().find(|c| c.type_ == ConditionType::Valid).unwrap();
        assert_eq!(valid.last_transition_time.as_deref(), Some("t1"), "unchanged, so its time is kept");

        let full = Error::new(Kind::ResourceExhausted, "no space");
        let status = plan::volume_status(Ok(&want), Some(4), None, Some(&full), None, "t3");
        assert_eq!(status.phase, VolumePhase::Pending);
        assert_eq!(status.port, None);
        let ready = status.conditions.iter().find(|c| c.type_ == ConditionType::Ready).unwrap();
        assert_eq!((ready.reason.as_str(), ready.message.as_str()), ("ResourceExhausted", "no space"));

        let mut bad = volume();
        bad.spec.size_bytes = 0;
        let invalid = bad.desired().unwrap_err();
        let status = plan::volume_status(Err(&invalid), Some(5), None, None, None, "t4");
        assert_eq!(status.phase, VolumePhase::Invalid);
        let valid = status.conditions.iter().find(|c| c.type_ == ConditionType::Valid).unwrap();
        assert_eq!(valid.status, ConditionStatus::False);
        assert!(valid.message.contains("spec.sizeBytes"), "{}", valid.message);
        assert_eq!(valid.observed_generation, Some(5));
    }
}
