//! CSI Identity for the node plugin.

use csi_proto::identity_server::Identity;
use csi_proto::plugin_capability::volume_expansion;
use csi_proto::plugin_capability::{Service, Type, VolumeExpansion};
use csi_proto::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest, GetPluginInfoResponse,
    PluginCapability, ProbeRequest, ProbeResponse, plugin_capability,
};
use tonic::{Request, Response, Status};

use super::NodeInfo;

#[derive(Debug, Clone)]
pub struct IdentityService(pub NodeInfo);

/// The plugin's capabilities "as a whole": the CSI spec has every instance
/// of one version report the same set, whichever RPCs it serves, so the
/// node plugin names the controller service and online expansion exactly
/// as nbd-csi-controller does (csi-sanity, for one, reads them here to
/// decide whether to ControllerPublish before staging).
pub fn plugin_capabilities() -> GetPluginCapabilitiesResponse {
    let service = PluginCapability {
        r#type: Some(Type::Service(Service { r#type: plugin_capability::service::Type::ControllerService as i32 })),
    };
    let expansion = PluginCapability {
        r#type: Some(Type::VolumeExpansion(VolumeExpansion { r#type: volume_expansion::Type::Online as i32 })),
    };
    GetPluginCapabilitiesResponse { capabilities: vec![service, expansion] }
}

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
        Ok(Response::new(plugin_capabilities()))
    }

    #[tracing::instrument(err, skip_all)]
    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_the_plugin_wide_capabilities() {
        let caps = plugin_capabilities().capabilities;
        let has = |t: &Type| caps.iter().any(|c| c.r#type.as_ref() == Some(t));
        assert!(has(&Type::Service(Service { r#type: plugin_capability::service::Type::ControllerService as i32 })));
        assert!(has(&Type::VolumeExpansion(VolumeExpansion { r#type: volume_expansion::Type::Online as i32 })));
    }
}
