//! CSI Identity: plugin name and version, capabilities, readiness.

use std::sync::Arc;

use csi_proto::identity_server::Identity;
use csi_proto::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest, GetPluginInfoResponse,
    ProbeRequest, ProbeResponse,
};
use tonic::{Request, Response, Status};

use super::call;
use crate::driver::Driver;
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct IdentityService(pub Arc<Driver>);

impl Driver {
    #[tracing::instrument(err, skip_all)]
    async fn plugin_info(&self) -> Result<GetPluginInfoResponse> {
        Ok(GetPluginInfoResponse {
            name: self.config().driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        })
    }

    #[tracing::instrument(err, skip_all)]
    async fn probe(&self) -> Result<ProbeResponse> {
        Ok(ProbeResponse { ready: Some(self.ready()) })
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        call(&self.0, "GetPluginInfo", self.0.plugin_info()).await
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        call(&self.0, "GetPluginCapabilities", async { Ok(csi_proto::plugin::capabilities()) }).await
    }

    async fn probe(&self, _request: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        call(&self.0, "Probe", self.0.probe()).await
    }
}
