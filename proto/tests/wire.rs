//! Pins wire-level facts of the generated CSI v1.12.0 bindings: field tags,
//! enum values and gRPC service names. If any of these change, the plugin
//! stops interoperating with kubelet, the external sidecars and csi-sanity.

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use csi_proto::v1;
use csi_proto::{
    BlockMetadataType, CreateVolumeRequest, GetCapacityResponse, NodeGetInfoResponse, NodePublishVolumeRequest,
    ProbeResponse, Snapshot, VolumeCapability, controller_service_capability, group_controller_service_capability,
    identity_server, node_service_capability, plugin_capability, volume_capability, volume_usage,
};
use prost::Message;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

fn encode<M: Message>(m: &M) -> Vec<u8> {
    m.encode_to_vec()
}

#[test]
fn create_volume_request_field_numbers() {
    let req = CreateVolumeRequest { name: "x".into(), ..Default::default() };
    // Field 1, wire type 2 (length-delimited) => 0x0a.
    assert_eq!(encode(&req), [0x0a, 0x01, b'x']);

    let req = CreateVolumeRequest { secrets: HashMap::from([("k".into(), "v".into())]), ..Default::default() };
    // secrets = 5 => tag 0x2a; map entry is {key = 1, value = 2}.
    assert_eq!(encode(&req), [0x2a, 0x06, 0x0a, 0x01, b'k', 0x12, 0x01, b'v']);

    let req =
        CreateVolumeRequest { mutable_parameters: HashMap::from([("k".into(), "v".into())]), ..Default::default() };
    // mutable_parameters = 8 => tag 0x42.
    assert_eq!(encode(&req)[0], 0x42);
}

#[test]
fn volume_capability_layout() {
    let cap = VolumeCapability {
        access_type: Some(volume_capability::AccessType::Block(volume_capability::BlockVolume {})),
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    };
    // block = 1 (empty message), access_mode = 3 { mode = 1 (varint) = 1 }.
    assert_eq!(encode(&cap), [0x0a, 0x00, 0x1a, 0x02, 0x08, 0x01]);

    let cap = VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(volume_capability::MountVolume {
            fs_type: "ext4".into(),
            mount_flags: vec![],
            volume_mount_group: "g".into(),
        })),
        access_mode: None,
    };
    // mount = 2 { fs_type = 1, volume_mount_group = 3 }.
    assert_eq!(encode(&cap), [0x12, 0x09, 0x0a, 0x04, b'e', b'x', b't', b'4', 0x1a, 0x01, b'g']);
}

#[test]
fn node_publish_request_field_numbers() {
    let req = NodePublishVolumeRequest { target_path: "/t".into(), readonly: true, ..Default::default() };
    // target_path = 4 => 0x22; readonly = 6 (varint) => 0x30.
    assert_eq!(encode(&req), [0x22, 0x02, b'/', b't', 0x30, 0x01]);
}

#[test]
fn misc_field_numbers() {
    let snap = Snapshot { group_snapshot_id: "g".into(), ..Default::default() };
    assert_eq!(encode(&snap), [0x32, 0x01, b'g']);

    let cap = GetCapacityResponse { minimum_volume_size: Some(7), ..Default::default() };
    // minimum_volume_size = 3 is an Int64Value wrapper { value = 1 }.
    assert_eq!(encode(&cap), [0x1a, 0x02, 0x08, 0x07]);

    let info = NodeGetInfoResponse { node_id: "n".into(), max_volumes_per_node: 3, accessible_topology: None };
    assert_eq!(encode(&info), [0x0a, 0x01, b'n', 0x10, 0x03]);
}

#[test]
fn decodes_bytes_produced_by_other_implementations() {
    // ProbeResponse { ready: BoolValue { value: true } }
    let probe = ProbeResponse::decode(&[0x0a, 0x02, 0x08, 0x01][..]).unwrap();
    assert_eq!(probe.ready, Some(true));

    // Unknown fields (e.g. from a newer spec) must be skipped, not rejected.
    let req = CreateVolumeRequest::decode(&[0x0a, 0x01, b'x', 0xf8, 0x07, 0x01][..]).unwrap();
    assert_eq!(req.name, "x");
}

#[test]
fn enum_values() {
    use controller_service_capability::rpc::Type as Ctrl;
    use node_service_capability::rpc::Type as NodeCap;
    use plugin_capability::service::Type as Svc;
    use volume_capability::access_mode::Mode;

    assert_eq!(Mode::Unknown as i32, 0);
    assert_eq!(Mode::SingleNodeWriter as i32, 1);
    assert_eq!(Mode::SingleNodeReaderOnly as i32, 2);
    assert_eq!(Mode::MultiNodeReaderOnly as i32, 3);
    assert_eq!(Mode::MultiNodeSingleWriter as i32, 4);
    assert_eq!(Mode::MultiNodeMultiWriter as i32, 5);
    assert_eq!(Mode::SingleNodeSingleWriter as i32, 6);
    assert_eq!(Mode::SingleNodeMultiWriter as i32, 7);
    assert_eq!(Mode::SingleNodeMultiWriter.as_str_name(), "SINGLE_NODE_MULTI_WRITER");

    assert_eq!(Ctrl::CreateDeleteVolume as i32, 1);
    assert_eq!(Ctrl::PublishUnpublishVolume as i32, 2);
    assert_eq!(Ctrl::GetCapacity as i32, 4);
    assert_eq!(Ctrl::CloneVolume as i32, 7);
    assert_eq!(Ctrl::ExpandVolume as i32, 9);
    assert_eq!(Ctrl::SingleNodeMultiWriter as i32, 13);
    assert_eq!(Ctrl::ModifyVolume as i32, 14);
    assert_eq!(Ctrl::GetSnapshot as i32, 15);

    assert_eq!(NodeCap::StageUnstageVolume as i32, 1);
    assert_eq!(NodeCap::GetVolumeStats as i32, 2);
    assert_eq!(NodeCap::ExpandVolume as i32, 3);
    assert_eq!(NodeCap::SingleNodeMultiWriter as i32, 5);
    assert_eq!(NodeCap::VolumeMountGroup as i32, 6);

    assert_eq!(Svc::ControllerService as i32, 1);
    assert_eq!(Svc::VolumeAccessibilityConstraints as i32, 2);
    assert_eq!(Svc::GroupControllerService as i32, 3);
    assert_eq!(Svc::SnapshotMetadataService as i32, 4);
    assert_eq!(plugin_capability::volume_expansion::Type::Offline as i32, 2);

    assert_eq!(group_controller_service_capability::rpc::Type::CreateDeleteGetVolumeGroupSnapshot as i32, 1);
    assert_eq!(volume_usage::Unit::Inodes as i32, 2);
    assert_eq!(BlockMetadataType::VariableLength as i32, 2);
}

#[test]
fn service_names() {
    assert_eq!(v1::identity_server::SERVICE_NAME, "csi.v1.Identity");
    assert_eq!(v1::controller_server::SERVICE_NAME, "csi.v1.Controller");
    assert_eq!(v1::node_server::SERVICE_NAME, "csi.v1.Node");
    assert_eq!(v1::group_controller_server::SERVICE_NAME, "csi.v1.GroupController");
    assert_eq!(v1::snapshot_metadata_server::SERVICE_NAME, "csi.v1.SnapshotMetadata");
}

/// Names every generated server and client type, so a rename or a missing
/// service fails to compile.
#[allow(dead_code)]
fn all_services_exist<I, C, N, G, S>(identity: I, controller: C, node: N, group: G, metadata: S)
where
    I: v1::identity_server::Identity,
    C: v1::controller_server::Controller,
    N: v1::node_server::Node,
    G: v1::group_controller_server::GroupController,
    S: v1::snapshot_metadata_server::SnapshotMetadata,
{
    let _ = v1::identity_server::IdentityServer::new(identity);
    let _ = v1::controller_server::ControllerServer::new(controller);
    let _ = v1::node_server::NodeServer::new(node);
    let _ = v1::group_controller_server::GroupControllerServer::new(group);
    let _ = v1::snapshot_metadata_server::SnapshotMetadataServer::new(metadata);

    let _: Option<v1::identity_client::IdentityClient<Channel>> = None;
    let _: Option<v1::controller_client::ControllerClient<Channel>> = None;
    let _: Option<v1::node_client::NodeClient<Channel>> = None;
    let _: Option<v1::group_controller_client::GroupControllerClient<Channel>> = None;
    let _: Option<v1::snapshot_metadata_client::SnapshotMetadataClient<Channel>> = None;
}

struct TestIdentity;

#[tonic::async_trait]
impl identity_server::Identity for TestIdentity {
    async fn get_plugin_info(
        &self,
        _: Request<v1::GetPluginInfoRequest>,
    ) -> Result<Response<v1::GetPluginInfoResponse>, Status> {
        Ok(Response::new(v1::GetPluginInfoResponse {
            name: "nbd.csi.test".into(),
            vendor_version: "0.0.0".into(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<v1::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<v1::GetPluginCapabilitiesResponse>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn probe(&self, _: Request<v1::ProbeRequest>) -> Result<Response<v1::ProbeResponse>, Status> {
        Ok(Response::new(v1::ProbeResponse { ready: Some(true) }))
    }
}

/// Polls a future that never actually waits (no runtime needed).
fn ready<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("future unexpectedly pending"),
    }
}

#[test]
fn identity_trait_is_implementable() {
    use identity_server::Identity;
    let svc = TestIdentity;
    let info = ready(svc.get_plugin_info(Request::new(v1::GetPluginInfoRequest {}))).unwrap().into_inner();
    assert_eq!(info.name, "nbd.csi.test");
    let probe = ready(svc.probe(Request::new(v1::ProbeRequest {}))).unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));

    let _server = identity_server::IdentityServer::new(TestIdentity);
}
