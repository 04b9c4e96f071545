//! CSI Controller: the gRPC trait, dispatching to the Driver's RPC methods
//! in `volume_ops`, `publish` and `snapshots`.

use std::sync::Arc;

use csi_proto::controller_server::Controller;
use csi_proto::controller_service_capability::rpc::Type as Rpc;
use csi_proto::controller_service_capability::{Rpc as RpcCap, Type as CapType};
use csi_proto::*;
use tonic::{Request, Response, Status};

use super::call;
use crate::driver::Driver;

#[derive(Debug, Clone)]
pub struct ControllerService(pub Arc<Driver>);

/// Exactly the capabilities the driver implements.
pub const CAPABILITIES: [Rpc; 14] = [
    Rpc::CreateDeleteVolume,
    Rpc::PublishUnpublishVolume,
    Rpc::PublishReadonly,
    Rpc::ListVolumes,
    Rpc::ListVolumesPublishedNodes,
    Rpc::GetVolume,
    Rpc::VolumeCondition,
    Rpc::GetCapacity,
    Rpc::CreateDeleteSnapshot,
    Rpc::ListSnapshots,
    Rpc::CloneVolume,
    Rpc::ExpandVolume,
    Rpc::SingleNodeMultiWriter,
    Rpc::GetSnapshot,
];

fn capabilities() -> ControllerGetCapabilitiesResponse {
    let capabilities = CAPABILITIES
        .iter()
        .map(|rpc| ControllerServiceCapability { r#type: Some(CapType::Rpc(RpcCap { r#type: *rpc as i32 })) })
        .collect();
    ControllerGetCapabilitiesResponse { capabilities }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(&self, r: Request<CreateVolumeRequest>) -> Result<Response<CreateVolumeResponse>, Status> {
        call(&self.0, "CreateVolume", self.0.create_volume(r.into_inner())).await
    }

    async fn delete_volume(&self, r: Request<DeleteVolumeRequest>) -> Result<Response<DeleteVolumeResponse>, Status> {
        call(&self.0, "DeleteVolume", self.0.delete_volume(r.into_inner())).await
    }

    async fn controller_publish_volume(
        &self,
        r: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let req = r.into_inner();
        let (volume_id, node_id) = (req.volume_id.clone(), req.node_id.clone());
        let publish = async {
            let result = self.0.publish_volume(req).await;
            if let Err(e) = &result {
                self.0.report_publish_refused(&volume_id, &node_id, e).await;
            }
            result
        };
        call(&self.0, "ControllerPublishVolume", publish).await
    }

    async fn controller_unpublish_volume(
        &self,
        r: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        call(&self.0, "ControllerUnpublishVolume", self.0.unpublish_volume(r.into_inner())).await
    }

    async fn validate_volume_capabilities(
        &self,
        r: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        call(&self.0, "ValidateVolumeCapabilities", self.0.validate_capabilities(r.into_inner())).await
    }

    async fn list_volumes(&self, r: Request<ListVolumesRequest>) -> Result<Response<ListVolumesResponse>, Status> {
        call(&self.0, "ListVolumes", self.0.list_volumes(r.into_inner())).await
    }

    async fn get_capacity(&self, r: Request<GetCapacityRequest>) -> Result<Response<GetCapacityResponse>, Status> {
        call(&self.0, "GetCapacity", self.0.get_capacity(r.into_inner())).await
    }

    async fn controller_get_capabilities(
        &self,
        _r: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        call(&self.0, "ControllerGetCapabilities", async { Ok(capabilities()) }).await
    }

    async fn create_snapshot(
        &self,
        r: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        call(&self.0, "CreateSnapshot", self.0.create_snapshot(r.into_inner())).await
    }

    async fn delete_snapshot(
        &self,
        r: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        call(&self.0, "DeleteSnapshot", self.0.delete_snapshot(r.into_inner())).await
    }

    async fn list_snapshots(
        &self,
        r: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        call(&self.0, "ListSnapshots", self.0.list_snapshots(r.into_inner())).await
    }

    async fn get_snapshot(&self, r: Request<GetSnapshotRequest>) -> Result<Response<GetSnapshotResponse>, Status> {
        call(&self.0, "GetSnapshot", self.0.get_snapshot(r.into_inner())).await
    }

    async fn controller_expand_volume(
        &self,
        r: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        call(&self.0, "ControllerExpandVolume", self.0.expand_volume(r.into_inner())).await
    }

    async fn controller_get_volume(
        &self,
        r: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        call(&self.0, "ControllerGetVolume", self.0.get_volume(r.into_inner())).await
    }

    async fn controller_modify_volume(
        &self,
        _r: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        // MODIFY_VOLUME is not advertised; the spec's answer is UNIMPLEMENTED.
        let result: Result<Response<ControllerModifyVolumeResponse>, Status> =
            Err(Status::unimplemented("ControllerModifyVolume is not supported"));
        let code = tonic::Code::Unimplemented;
        self.0.metrics().observe("ControllerModifyVolume", code, std::time::Duration::ZERO);
        result
    }
}
