//! CSI Identity for the node plugin.

use csi_proto::identity_server::Identity;
use csi_proto::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest, GetPluginInfoResponse,
    ProbeRequest, ProbeResponse,
};
use tonic::{Request, Response, Status};

use super::NodeInfo;

#[derive(Debug, Clone)]
pub struct IdentityService(pub NodeInfo);

#[tonic::async_trait]
impl Identity for IdentityService {
    #[tracing::instrument(err, skip_all)]
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.0.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    #[tracing::instrument(err, skip_all)]
    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(csi_proto::plugin::capabilities()))
    }

    #[tracing::instrument(err, skip_all)]
    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}
