use csi_proto::controller_service_capability::rpc::Type as Rpc;
use csi_proto::volume_capability::access_mode::Mode;
use csi_proto::*;
use tonic::Code;

use super::*;
use crate::csi::DEFAULT_CAPACITY;
use agent::testing::Client;
use csi_proto::contract::{VolumeAccess, VolumeContext, publish_key};

const MIB: i64 = 1 << 20;

#[tokio::test]
async fn identity_reports_name_capabilities_and_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path()).await;
    let mut id = h.identity().await;
    let info = id.get_plugin_info(GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, "nbd.csi.dev");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = id.get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
    let debug = format!("{caps:?}");
    assert!(debug.contains("Service(Service { r#type: ControllerService })"), "{debug}");
    assert!(debug.contains("VolumeExpansion(VolumeExpansion { r#type: Online })"), "{debug}");
    assert_eq!(id.probe(ProbeRequest {}).await.unwrap().into_inner().ready, Some(true));

    let mut c = h.controller().await;
    let caps = c.controller_get_capabilities(ControllerGetCapabilitiesRequest {}).await.unwrap().into_inner();
    let mut got: Vec<i32> = caps
        .capabilities
        .iter()
        .map(|c| match &c.r#type {
            Some(controller_service_capability::Type::Rpc(rpc)) => rpc.r#type,
            None => panic!("capability without type"),
        })
        .collect();
    got.sort_unstable();
    let mut want: Vec<i32> = crate::csi::CAPABILITIES.iter().map(|r| *r as i32).collect();
    want.sort_unstable();
    assert_eq!(got, want);
    assert!(got.contains(&(Rpc::GetSnapshot as i32)), "GetSnapshot (CSI 1.12) is implemented and advertised");
    assert!(!got.contains(&(Rpc::ModifyVolume as i32)) && got.len() == 14);
    h.stop().await;
}

#[tokio::test]
async fn create_volume_validates_rounds_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path()).await;
    let mut c = h.controller().await;
    let mode = Mode::SingleNodeWriter;

    let v = c.create_volume(create_req("a", 1, false, mode)).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(v.capacity_bytes, MIB, "1 byte rounds up to 1 MiB");
    let context = VolumeContext::try_from(&v.volume_context).unwrap();
    assert_eq!(context, VolumeContext { name: "a".into(), access: VolumeAccess::Mount { fs_type: "ext4".into() } });
    assert!(!format!("{:?}", v.volume_context).contains("nbd://"), "no token in volume_context");
    let again = c.create_volume(create_req("a", 1, false, mode)).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(again.volume_id, v.volume_id);
    assert_eq!(code(c.create_volume(create_req("a", 8 * MIB, false, mode)).await), Code::AlreadyExists);
    assert_eq!(code(c.create_volume(create_req("a", 1, true, mode)).await), Code::AlreadyExists);

    let default = CreateVolumeRequest { capacity_range: None, ..create_req("b", 0, true, mode) };
    let b = c.create_volume(default).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(b.capacity_bytes as u64, DEFAULT_CAPACITY);

    let mut below = create_req("c", MIB + 1, true, mode);
    below.capacity_range.as_mut().unwrap().limit_bytes = MIB + 100;
    assert_eq!(code(c.create_volume(below).await), Code::OutOfRange);
    let mut inverted = create_req("c", 2 * MIB, true, mode);
    inverted.capacity_range.as_mut().unwrap().limit_bytes = MIB;
    assert_eq!(code(c.create_volume(inverted).await), Code::OutOfRange);

    assert_eq!(code(c.create_volume(create_req("", MIB, true, mode)).await), Code::InvalidArgument);
    let no_caps = CreateVolumeRequest { volume_capabilities: vec![], ..create_req("d", MIB, true, mode) };
    assert_eq!(code(c.create_volume(no_caps).await), Code::InvalidArgument);
    let mut params = create_req("d", MIB, true, mode);
    params.parameters.insert("bogus".into(), "1".into());
    assert_eq!(code(c.create_volume(params).await), Code::InvalidArgument);
    let mut reserved = create_req("d", MIB, true, mode);
    reserved.parameters.insert("csi.storage.k8s.io/pvc/name".into(), "x".into());
    c.create_volume(reserved).await.unwrap();

    assert_eq!(
        code(c.create_volume(create_req("e", MIB, false, Mode::MultiNodeMultiWriter)).await),
        Code::InvalidArgument
    );
    c.create_volume(create_req("e", MIB, true, Mode::MultiNodeMultiWriter)).await.unwrap();
    for m in [
        Mode::SingleNodeSingleWriter,
        Mode::SingleNodeMultiWriter,
        Mode::SingleNodeReaderOnly,
        Mode::MultiNodeReaderOnly,
    ] {
        c.create_volume(create_req(&format!("m{}", m as i32), MIB, false, m)).await.unwrap();
    }
    assert_eq!(
        code(c.create_volume(create_req("f", MIB, true, Mode::MultiNodeSingleWriter)).await),
        Code::InvalidArgument
    );
    assert_eq!(code(c.create_volume(create_req("huge", i64::MAX / 2, true, mode)).await), Code::ResourceExhausted);
    let missing_snap = CreateVolumeRequest {
        volume_content_source: Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
                snapshot_id: format!("snap-{}", "0".repeat(32)),
            })),
        }),
        ..create_req("g", MIB, true, mode)
    };
    assert_eq!(code(c.create_volume(missing_snap).await), Code::NotFound);
    h.stop().await;
}

/// A read-only publication is enforced by the export, not only by the
/// node's mount: the session is READ_ONLY and a write gets EPERM. Without
/// node addresses (static nodes here) that holds while every publication
/// is read-only.
#[tokio::test]
async fn read_only_publication_makes_the_export_refuse_writes() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path()).await;
    let mut c = h.controller().await;
    let mode = Mode::MultiNodeMultiWriter;
    let v = c.create_volume(create_req("ro", 4 * MIB, true, mode)).await.unwrap().into_inner().volume.unwrap();
    let id = v.volume_id.clone();
    let ctx = c.controller_publish_volume(publish_req(&id, NODE_A, true, mode, true)).await.unwrap().into_inner();
    assert!(published(&ctx.publish_context).read_only);
    let (addr, name) = export_of(&ctx.publish_context);
    let mut reader = Client::connect(&addr, &name).await.unwrap();
    assert!(reader.transmission_flags.contains(nbd::TransmissionFlags::READ_ONLY));
    assert_eq!(reader.write(0, b"nope").await.unwrap(), nbd::errno::EPERM);
    assert_eq!(reader.read(0, 4).await.unwrap(), [0u8; 4]);

    // A writer joins: the reader's session was read-only and is closed (its
    // flags cannot change); new sessions may write.
    c.controller_publish_volume(publish_req(&id, NODE_B, true, mode, false)).await.unwrap();
    assert!(reader.is_closed().await, "the policy change closes the read-only session");
    let mut writer = Client::connect(&addr, &name).await.unwrap();
    assert!(!writer.transmission_flags.contains(nbd::TransmissionFlags::READ_ONLY));
    assert_eq!(writer.write(0, b"yes!").await.unwrap(), 0);
    h.stop().await;
}

#[tokio::test]
async fn publish_guards_the_export_and_unpublish_revokes() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path()).await;
    let mut c = h.controller().await;
    let mode = Mode::SingleNodeWriter;
    let v = c.create_volume(create_req("pub", 4 * MIB, true, mode)).await.unwrap().into_inner().volume.unwrap();
    let id = v.volume_id.clone();

    assert_eq!(code(c.controller_publish_volume(publish_req(&id, "ghost", true, mode, false)).await), Code::NotFound);
    assert_eq!(
        code(c.controller_publish_volume(publish_req("vol-missing", NODE_A, true, mode, false)).await),
        Code::NotFound
    );
    assert_eq!(code(c.controller_publish_volume(publish_req(&id, "", true, mode, false)).await), Code::InvalidArgument);
    let ctx = c.controller_publish_volume(publish_req(&id, NODE_A, true, mode, false)).await.unwrap().into_inner();
    // Nothing but what the node reads: how many connections it opens is the
    // server's CAN_MULTI_CONN flag to decide, never a context key.
    let mut keys: Vec<&str> = ctx.publish_context.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, [publish_key::NBD_URI, publish_key::READ_ONLY]);
    let first = published(&ctx.publish_context);
    assert!(!first.read_only);
    let (addr, name) = export_of(&ctx.publish_context);
    assert_eq!(name.len(), 64, "a 32-byte hex token");
    assert!(addr.starts_with("127.0.0.1:"));
    // Idempotent; different options for the same node → ALREADY_EXISTS;
    // a single-writer volume on a second node → FAILED_PRECONDITION.
    let same = c.controller_publish_volume(publish_req(&id, NODE_A, true, mode, false)).await.unwrap().into_inner();
    assert_eq!(published(&same.publish_context), first);
    assert_eq!(
        code(c.controller_publish_volume(publish_req(&id, NODE_A, true, mode, true)).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.controller_publish_volume(publish_req(&id, NODE_B, true, mode, false)).await),
        Code::FailedPrecondition
    );

    let mut client = Client::connect(&addr, &name).await.expect("published export accepts the token");
    assert_eq!(client.size, 4 << 20);
    assert_eq!(client.write(0, b"hello").await.unwrap(), 0);
    assert_eq!(client.read(0, 5).await.unwrap(), b"hello");
    assert!(Client::connect(&addr, "wrong-name").await.is_err(), "a wrong export name learns nothing");

    assert_eq!(
        code(c.delete_volume(DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() }).await),
        Code::FailedPrecondition
    );
    let list = c.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner();
    assert_eq!(list.entries[0].status.as_ref().unwrap().published_node_ids, vec![NODE_A.to_string()]);

    c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: NODE_A.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(client.is_closed().await, "unpublish closes the node's connections");
    assert!(Client::connect(&addr, &name).await.is_err(), "an unpublished export admits nobody");
    c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: NODE_A.into(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Multi-node modes may be published to several nodes.
    let multi = Mode::MultiNodeMultiWriter;
    let m = c.create_volume(create_req("multi", MIB, true, multi)).await.unwrap().into_inner().volume.unwrap();
    c.controller_publish_volume(publish_req(&m.volume_id, NODE_A, true, multi, false)).await.unwrap();
    c.controller_publish_volume(publish_req(&m.volume_id, NODE_B, true, multi, false)).await.unwrap();
    let ro = Mode::MultiNodeReaderOnly;
    let r = c.create_volume(create_req("ro", MIB, false, ro)).await.unwrap().into_inner().volume.unwrap();
    let ctx = c.controller_publish_volume(publish_req(&r.volume_id, NODE_A, false, ro, false)).await.unwrap();
    assert!(published(&ctx.into_inner().publish_context).read_only);

    c.delete_volume(DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() }).await.unwrap();
    c.delete_volume(DeleteVolumeRequest { volume_id: id, ..Default::default() }).await.unwrap();
    assert_eq!(code(c.delete_volume(DeleteVolumeRequest::default()).await), Code::InvalidArgument);
    h.stop().await;
}

/// Requests the volume's export has received and not yet answered.
fn in_flight(h: &Harness, id: &str) -> u64 {
    let exports = h.driver.agent().expect("embedded").exports().snapshot();
    let (_, export) = exports.iter().find(|(served, _)| served == id).expect("volume served");
    export.stats().in_flight.load(std::sync::atomic::Ordering::Relaxed)
}

/// ControllerUnpublishVolume fences the node's writes already under way: a
/// WRITE whose payload is still arriving when the call returns is dropped,
/// so it cannot land on top of what the next node writes, and its sender
/// never gets a success reply.
#[tokio::test]
async fn unpublish_fences_a_write_whose_payload_is_still_arriving() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path()).await;
    let mut c = h.controller().await;
    let mode = Mode::SingleNodeWriter;
    let v = c.create_volume(create_req("fence", 4 * MIB, true, mode)).await.unwrap().into_inner().volume.unwrap();
    let id = v.volume_id.clone();
    let ctx = c.controller_publish_volume(publish_req(&id, NODE_A, true, mode, false)).await.unwrap().into_inner();
    let (addr, name) = export_of(&ctx.publish_context);

    let len = 1 << 20;
    let stale = vec![0xaau8; len];
    let mut first = Client::connect(&addr, &name).await.unwrap();
    first.start_write(0, len as u32, &stale[..len / 2]).await.unwrap();
    for _ in 0..500 {
        if in_flight(&h, &id) == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(in_flight(&h, &id), 1, "the server is receiving the WRITE");

    let started = std::time::Instant::now();
    let unpublish =
        ControllerUnpublishVolumeRequest { volume_id: id.clone(), node_id: NODE_A.into(), ..Default::default() };
    c.controller_unpublish_volume(unpublish).await.unwrap();
    let fenced = started.elapsed();
    eprintln!("ControllerUnpublishVolume with a session mid-payload returned in {fenced:?}");

    // The next node takes over, writes and flushes.
    let ctx = c.controller_publish_volume(publish_req(&id, NODE_B, true, mode, false)).await.unwrap().into_inner();
    let (addr, name) = export_of(&ctx.publish_context);
    let mut second = Client::connect(&addr, &name).await.unwrap();
    let fresh = vec![0xbbu8; len];
    assert_eq!(second.write(0, &fresh).await.unwrap(), 0);
    assert_eq!(second.flush().await.unwrap(), 0);

    // Only now does the rest of the first node's payload arrive.
    let _ = first.send_raw(&stale[len / 2..]).await;
    assert!(first.is_closed().await, "the fenced WRITE got a reply instead of a closed connection");
    assert!(
        second.read(0, len as u32).await.unwrap() == fresh,
        "the unpublished node's WRITE overwrote the next node's data"
    );
    assert_eq!(in_flight(&h, &id), 0);
    h.stop().await;
}

#[tokio::test]
async fn list_get_capacity_validate_and_online_expand() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path()).await;
    let mut c = h.controller().await;
    let mode = Mode::SingleNodeWriter;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            c.create_volume(create_req(&format!("l{i}"), MIB, true, mode))
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap()
                .volume_id,
        );
    }
    ids.sort();
    let first = c.list_volumes(ListVolumesRequest { max_entries: 2, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(first.entries.len(), 2);
    assert!(!first.next_token.is_empty());
    let rest = c
        .list_volumes(ListVolumesRequest { starting_token: first.next_token.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut seen: Vec<String> =
        first.entries.iter().chain(&rest.entries).map(|e| e.volume.as_ref().unwrap().volume_id.clone()).collect();
    seen.sort();
    assert_eq!(seen, ids);
    assert!(rest.next_token.is_empty());
    let bad = ListVolumesRequest { starting_token: "invalid-token".into(), ..Default::default() };
    assert_eq!(code(c.list_volumes(bad).await), Code::Aborted);

    let got =
        c.controller_get_volume(ControllerGetVolumeRequest { volume_id: ids[0].clone() }).await.unwrap().into_inner();
    let condition = got.status.unwrap().volume_condition.unwrap();
    assert!(!condition.abnormal);
    assert_eq!(
        code(c.controller_get_volume(ControllerGetVolumeRequest { volume_id: "nope".into() }).await),
        Code::NotFound
    );

    let capacity = c.get_capacity(GetCapacityRequest::default()).await.unwrap().into_inner();
    assert!(capacity.available_capacity > 0);
    let mut bad_params = GetCapacityRequest::default();
    bad_params.parameters.insert("bogus".into(), "1".into());
    assert_eq!(code(c.get_capacity(bad_params).await), Code::InvalidArgument);

    let validate = |caps| ValidateVolumeCapabilitiesRequest {
        volume_id: ids[0].clone(),
        volume_capabilities: caps,
        ..Default::default()
    };
    let ok = c.validate_volume_capabilities(validate(vec![cap(true, mode)])).await.unwrap().into_inner();
    assert!(ok.confirmed.is_some());
    let mount = c.validate_volume_capabilities(validate(vec![cap(false, mode)])).await.unwrap().into_inner();
    assert!(mount.confirmed.is_none() && !mount.message.is_empty());
    assert_eq!(code(c.validate_volume_capabilities(validate(vec![])).await), Code::InvalidArgument);

    // Online expansion: a connected client can write past the old end.
    let id = ids[0].clone();
    let ctx = c.controller_publish_volume(publish_req(&id, NODE_A, true, mode, false)).await.unwrap().into_inner();
    let (addr, name) = export_of(&ctx.publish_context);
    let mut client = Client::connect(&addr, &name).await.unwrap();
    assert_ne!(client.write(MIB as u64, b"past").await.unwrap(), 0, "beyond the end before expansion");
    let expand = |bytes| ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        ..Default::default()
    };
    let grown = c.controller_expand_volume(expand(3 * MIB - 5)).await.unwrap().into_inner();
    assert_eq!(grown.capacity_bytes, 3 * MIB);
    assert!(grown.node_expansion_required, "the kernel's device learns the size from NodeExpandVolume");
    assert_eq!(client.write(MIB as u64, b"past").await.unwrap(), 0);
    let same = c.controller_expand_volume(expand(MIB)).await.unwrap().into_inner();
    assert_eq!(same.capacity_bytes, 3 * MIB, "never shrinks");
    let no_range = ControllerExpandVolumeRequest { volume_id: id.clone(), ..Default::default() };
    assert_eq!(code(c.controller_expand_volume(no_range).await), Code::InvalidArgument);
    let missing = ControllerExpandVolumeRequest { volume_id: "vol-x".into(), ..expand(MIB) };
    assert_eq!(code(c.controller_expand_volume(missing).await), Code::NotFound);
    let got = c.controller_get_volume(ControllerGetVolumeRequest { volume_id: id }).await.unwrap().into_inner();
    assert_eq!(got.volume.unwrap().capacity_bytes, 3 * MIB);
    // Every RPC above was counted.
    let text = h.driver.metrics().render();
    assert!(text.contains("nbd_csi_rpc_requests_total{method=\"CreateVolume\",code=\"Ok\"} 5"), "{text}");
    assert!(text.contains("nbd_csi_volume_written_bytes_total{volume_id="), "{text}");
    h.stop().await;
}

#[tokio::test]
async fn restart_keeps_ports_export_names_publications_and_data() {
    let dir = tempfile::tempdir().unwrap();
    let ports = 27000..=27031;
    let h = Harness::start_with_ports(dir.path(), ports.clone()).await;
    let mut c = h.controller().await;
    let mode = Mode::SingleNodeWriter;
    let mut uris = Vec::new();
    for i in 0..3u8 {
        let v = c.create_volume(create_req(&format!("r{i}"), 2 * MIB, true, mode)).await.unwrap().into_inner();
        let id = v.volume.unwrap().volume_id;
        let ctx = c.controller_publish_volume(publish_req(&id, NODE_A, true, mode, false)).await.unwrap().into_inner();
        let uri = published(&ctx.publish_context).nbd_uri;
        let (addr, name) = (uri.authority(), uri.export.clone());
        let mut client = Client::connect(&addr, &name).await.unwrap();
        assert_eq!(client.write(4096 * u64::from(i), &[i + 1; 4096]).await.unwrap(), 0);
        assert_eq!(client.flush().await.unwrap(), 0);
        uris.push((id, uri));
    }
    h.stop().await;

    let h = Harness::start_with_ports(dir.path(), ports).await;
    let mut id = h.identity().await;
    assert_eq!(id.probe(ProbeRequest {}).await.unwrap().into_inner().ready, Some(true));
    let mut c = h.controller().await;
    for (i, (volume_id, uri)) in uris.iter().enumerate() {
        let again =
            c.controller_publish_volume(publish_req(volume_id, NODE_A, true, mode, false)).await.unwrap().into_inner();
        assert_eq!(&published(&again.publish_context).nbd_uri, uri, "same port and export name after restart");
        let (addr, name) = (uri.authority(), uri.export.clone());
        let mut client = Client::connect(&addr, &name).await.unwrap();
        assert_eq!(client.read(4096 * i as u64, 4096).await.unwrap(), vec![i as u8 + 1; 4096]);
    }
    let list = c.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner();
    assert_eq!(list.entries.len(), 3);
    assert!(list.entries.iter().all(|e| e.status.as_ref().unwrap().published_node_ids == vec![NODE_A.to_string()]));
    h.stop().await;
}

/// The port range bounds how many volumes are attached at once, not how
/// many exist: ControllerPublishVolume takes a port, the last
/// ControllerUnpublishVolume gives it back, and a publish with none left is
/// RESOURCE_EXHAUSTED until one is.
#[tokio::test]
async fn ports_follow_publication_so_volumes_outnumber_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let ports = 27040..=27041;
    let h = Harness::start_with_ports(dir.path(), ports.clone()).await;
    let mut c = h.controller().await;
    let mode = Mode::SingleNodeWriter;
    let mut ids = Vec::new();
    for i in 0..4 {
        let v =
            c.create_volume(create_req(&format!("many{i}"), MIB, true, mode)).await.expect("more volumes than ports");
        ids.push(v.into_inner().volume.unwrap().volume_id);
    }
    let mut addresses = Vec::new();
    for id in &ids[..2] {
        let ctx = c.controller_publish_volume(publish_req(id, NODE_A, true, mode, false)).await.unwrap();
        addresses.push(export_of(&ctx.into_inner().publish_context).0);
    }
    assert_eq!(addresses, ["127.0.0.1:27040", "127.0.0.1:27041"]);
    let full = c.controller_publish_volume(publish_req(&ids[2], NODE_A, true, mode, false)).await;
    assert_eq!(code(full), Code::ResourceExhausted);
    let listed = c.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner();
    let unpublished = listed.entries.iter().find(|e| e.volume.as_ref().unwrap().volume_id == ids[2]).unwrap();
    assert!(unpublished.status.as_ref().unwrap().published_node_ids.is_empty(), "the refused publish left nothing");
    assert!(!unpublished.status.as_ref().unwrap().volume_condition.as_ref().unwrap().abnormal);

    let addr = addresses[0].clone();
    c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: ids[0].clone(),
        node_id: NODE_A.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(tokio::net::TcpStream::connect(&addr).await.is_err(), "the unpublished volume's server is gone");
    let ctx = c.controller_publish_volume(publish_req(&ids[2], NODE_A, true, mode, false)).await.unwrap();
    let (addr2, export) = export_of(&ctx.into_inner().publish_context);
    assert_eq!(addr2, addr, "the port given back serves the next volume published");
    let client = Client::connect(&addr2, &export).await.unwrap();
    assert_eq!(client.size, MIB as u64);
    h.stop().await;
}
