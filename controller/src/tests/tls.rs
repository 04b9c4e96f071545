//! Volumes whose export speaks TLS, through the real gRPC services and the
//! volumes' real NBD servers: the StorageClass parameter `tls`, the
//! `nbds://` publish context, the export admitting the published node's
//! certificate only (a plaintext client learns nothing but
//! NBD_REP_ERR_TLS_REQD), the mode kept across a restart and by clones and
//! restores, and a clear error without certificates.

use std::path::Path;

use csi_proto::volume_capability::access_mode::Mode;
use csi_proto::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use csi_proto::*;
use nbd::consts::rep;
use tonic::Code;

use super::pki::Pki;
use super::*;
use agent::testing::Client;

const MIB: i64 = 1 << 20;
const MODE: Mode = Mode::SingleNodeWriter;

fn with_tls(mut req: CreateVolumeRequest, tls: &str) -> CreateVolumeRequest {
    req.parameters.insert("tls".into(), tls.into());
    req
}

async fn publish(c: &mut ControllerClient<Channel>, id: &str, node: &str) -> HashMap<String, String> {
    let req = publish_req(id, node, true, MODE, false);
    c.controller_publish_volume(req).await.unwrap().into_inner().publish_context
}

/// The controller of `dir` with its certificates in `tls_dir` (if any) and
/// `default_tls`, on `ports`.
async fn start(dir: &Path, ports: std::ops::RangeInclusive<u16>, tls_dir: Option<&Path>, default_tls: &str) -> Harness {
    let mut args = Harness::args(dir, ports);
    args.tls_dir = tls_dir.map(Path::to_path_buf);
    args.default_tls = service::parse_tls(default_tls).unwrap();
    Harness::start_with_args(args).await
}

/// Refused at the handshake with `reply`.
fn refused_with<T>(result: nbd::Result<T>, reply: u32) {
    match result {
        Err(nbd::Error::Refused { reply: got, .. }) => assert_eq!(got, reply, "refused with {got:#x}"),
        Err(other) => panic!("expected a refusal {reply:#x}, got {other}"),
        Ok(_) => panic!("expected a refusal {reply:#x}, the handshake succeeded"),
    }
}

#[tokio::test]
async fn a_volume_that_requires_tls_serves_its_nodes_certificate_only_and_keeps_the_mode() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("cluster");
    let tls_dir = dir.path().join("tls");
    pki.write_server(&tls_dir);
    let ports = Harness::ports();
    let h = start(dir.path(), ports.clone(), Some(&tls_dir), "off").await;
    let mut c = h.controller().await;

    let status = c.create_volume(with_tls(create_req("bad", MIB, true, MODE), "on")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("off, allowed, required"), "{}", status.message());

    let created = c.create_volume(with_tls(create_req("secure", 4 * MIB, true, MODE), "required")).await;
    let id = created.unwrap().into_inner().volume.unwrap().volume_id;
    let context = publish(&mut c, &id, NODE_A).await;
    assert!(context[contract::publish_key::NBD_URI].starts_with("nbds://127.0.0.1:"), "{context:?}");
    let uri = published(&context).nbd_uri;
    assert!(uri.tls);
    let addr = uri.authority();

    // Plaintext: refused before anything about the export is said.
    refused_with(Client::connect(&addr, &uri.export).await, rep::ERR_TLS_REQD);
    // The published node's certificate: reads and writes through STARTTLS.
    let node_a = pki.client(dir.path(), NODE_A, pki.ca_pem());
    let mut a = Client::connect_tls(&addr, &uri.export, &node_a).await.expect("node-a over TLS");
    assert_eq!(a.size, 4 * MIB as u64);
    let pattern: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(a.write(MIB as u64, &pattern).await.unwrap(), 0);
    assert_eq!(a.flush().await.unwrap(), 0);
    assert_eq!(a.read(MIB as u64, pattern.len() as u32).await.unwrap(), pattern);
    // Another node's certificate from the same CA: not admitted.
    let node_b = pki.client(dir.path(), NODE_B, pki.ca_pem());
    refused_with(Client::connect_tls(&addr, &uri.export, &node_b).await, rep::ERR_POLICY);
    // A certificate for node-a from another CA: the TLS handshake fails.
    let stranger = Pki::new("stranger").client(&dir.path().join("stranger"), NODE_A, pki.ca_pem());
    let err = Client::connect_tls(&addr, &uri.export, &stranger).await.err().expect("another CA is refused");
    assert!(matches!(err, nbd::Error::TlsHandshake(_) | nbd::Error::Io(_)), "{err}");
    drop(a);

    // `allowed`: the node attaches in plaintext (nbd://), TLS works too.
    let created = c.create_volume(with_tls(create_req("either", MIB, true, MODE), "allowed")).await;
    let either = created.unwrap().into_inner().volume.unwrap().volume_id;
    let context = publish(&mut c, &either, NODE_A).await;
    let plain_uri = published(&context).nbd_uri;
    assert!(!plain_uri.tls && context[contract::publish_key::NBD_URI].starts_with("nbd://"), "{context:?}");
    Client::connect(&plain_uri.authority(), &plain_uri.export).await.expect("plaintext is allowed");
    Client::connect_tls(&plain_uri.authority(), &plain_uri.export, &node_a).await.expect("so is TLS");
    h.stop().await;

    // Restarted: the record kept the mode; the published volume serves
    // TLS on its port again, and a publish retry answers nbds:// again.
    let h = start(dir.path(), ports, Some(&tls_dir), "off").await;
    let mut c = h.controller().await;
    let again = published(&publish(&mut c, &id, NODE_A).await).nbd_uri;
    assert_eq!(again, uri);
    refused_with(Client::connect(&addr, &uri.export).await, rep::ERR_TLS_REQD);
    let mut a = Client::connect_tls(&addr, &uri.export, &node_a).await.expect("node-a after the restart");
    assert_eq!(a.read(MIB as u64, pattern.len() as u32).await.unwrap(), pattern);
    h.stop().await;
}

#[tokio::test]
async fn clones_and_restores_keep_their_sources_tls_and_the_default_applies_when_the_class_is_silent() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("cluster");
    let tls_dir = dir.path().join("tls");
    pki.write_server(&tls_dir);
    let h = start(dir.path(), Harness::ports(), Some(&tls_dir), "required").await;
    let mut c = h.controller().await;
    let is_tls = |context: &HashMap<String, String>| published(context).nbd_uri.tls;

    // The class says nothing: --default-tls (required here).
    let source = c.create_volume(create_req("source", MIB, true, MODE)).await.unwrap().into_inner();
    let source = source.volume.unwrap().volume_id;
    // The class says off: that is what it gets.
    let plain = c.create_volume(with_tls(create_req("plain", MIB, true, MODE), "off")).await.unwrap();
    let plain = plain.into_inner().volume.unwrap().volume_id;
    assert!(!is_tls(&publish(&mut c, &plain, NODE_A).await));
    assert!(is_tls(&publish(&mut c, &source, NODE_A).await));

    // A clone asking for off still speaks its source's TLS: never less.
    let clone_source =
        Some(VolumeContentSource { r#type: Some(SourceType::Volume(VolumeSource { volume_id: source.clone() })) });
    let clone = CreateVolumeRequest {
        volume_content_source: clone_source,
        ..with_tls(create_req("clone", MIB, true, MODE), "off")
    };
    let clone = c.create_volume(clone).await.unwrap().into_inner().volume.unwrap().volume_id;
    assert!(is_tls(&publish(&mut c, &clone, NODE_B).await));
    // A restore of a snapshot of it, likewise.
    let snap = CreateSnapshotRequest { name: "snap".into(), source_volume_id: source.clone(), ..Default::default() };
    let snap = c.create_snapshot(snap).await.unwrap().into_inner().snapshot.unwrap().snapshot_id;
    let restore = CreateVolumeRequest {
        volume_content_source: Some(VolumeContentSource {
            r#type: Some(SourceType::Snapshot(SnapshotSource { snapshot_id: snap })),
        }),
        ..with_tls(create_req("restore", MIB, true, MODE), "off")
    };
    let restore = c.create_volume(restore).await.unwrap().into_inner().volume.unwrap().volume_id;
    assert!(is_tls(&publish(&mut c, &restore, NODE_B).await));
    // A VolumeSnapshotClass cannot say tls.
    let mut snap = CreateSnapshotRequest { name: "s2".into(), source_volume_id: source, ..Default::default() };
    snap.parameters.insert("tls".into(), "off".into());
    assert_eq!(code(c.create_snapshot(snap).await), Code::InvalidArgument);
    h.stop().await;
}

/// Without certificates a TLS volume is refused, and GetCapacity offers it
/// no room (the external-provisioner's capacity tracking would otherwise
/// schedule pods onto storage that cannot take their volume).
#[tokio::test]
async fn a_volume_that_needs_tls_without_certificates_is_a_failed_precondition_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path(), Harness::ports(), None, "off").await;
    let mut c = h.controller().await;
    for tls in ["required", "allowed"] {
        let status = c.create_volume(with_tls(create_req(tls, MIB, true, MODE), tls)).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{tls}: {}", status.message());
        assert!(status.message().contains("--tls-dir"), "{}", status.message());
    }
    c.create_volume(create_req("plaintext", MIB, true, MODE)).await.expect("off needs no certificates");
    // GetCapacity agrees: no room for a TLS class, the disk's for the others.
    let capacity = |tls: &str| GetCapacityRequest {
        parameters: [("tls".to_owned(), tls.to_owned())].into(),
        ..Default::default()
    };
    for tls in ["required", "allowed"] {
        let got = c.get_capacity(capacity(tls)).await.unwrap().into_inner();
        assert_eq!((got.available_capacity, got.maximum_volume_size), (0, Some(0)), "{tls}");
    }
    let got = c.get_capacity(capacity("off")).await.unwrap().into_inner();
    assert!(got.available_capacity > 0, "{got:?}");
    h.stop().await;

    // A --tls-dir whose files are not there yet: named in the error.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let other = tempfile::tempdir().unwrap();
    let h = start(other.path(), Harness::ports(), Some(&empty), "required").await;
    let mut c = h.controller().await;
    let status = c.create_volume(create_req("default", MIB, true, MODE)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("tls.crt"), "{}", status.message());
    assert!(h.driver.agent().unwrap().volume_ids().is_empty(), "nothing stored");
    let got = c.get_capacity(GetCapacityRequest::default()).await.unwrap().into_inner();
    assert_eq!(got.available_capacity, 0, "the default (required) has no certificates to serve with");
    h.stop().await;
}
