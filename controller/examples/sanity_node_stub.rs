//! A stand-in CSI node endpoint for running csi-sanity's controller specs
//! without the node plugin: csi-sanity asks the node endpoint for a node id
//! (NodeGetInfo) and, when cleaning up, for its capabilities and to
//! NodeUnpublish. This answers exactly those; everything that would attach
//! or mount is UNIMPLEMENTED. It is not the node plugin and is only used by
//! `tests/csi-sanity.sh`, whose --ginkgo.skip excludes the Node specs.
//!
//! Usage: sanity_node_stub SOCKET NODE_ID

use csi_proto::identity_server::{Identity, IdentityServer};
use csi_proto::node_server::{Node, NodeServer};
use csi_proto::*;
use tonic::{Request, Response, Status};

#[derive(Debug, Clone)]
struct Stub {
    node_id: String,
}

#[tonic::async_trait]
impl Identity for Stub {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: nbd_csi_controller::service::DEFAULT_DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse { capabilities: vec![] }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("sanity node stub"))
}

#[tonic::async_trait]
impl Node for Stub {
    async fn node_stage_volume(
        &self,
        _: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        unimplemented()
    }

    async fn node_unstage_volume(
        &self,
        _: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        unimplemented()
    }

    async fn node_publish_volume(
        &self,
        _: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        unimplemented()
    }

    /// Nothing is ever published here, so unpublishing is a no-op.
    async fn node_unpublish_volume(
        &self,
        r: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = r.into_inner();
        if r.volume_id.is_empty() || r.target_path.is_empty() {
            return Err(Status::invalid_argument("volume_id and target_path are required"));
        }
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        _: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        unimplemented()
    }

    async fn node_expand_volume(
        &self,
        _: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        unimplemented()
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities: vec![] }))
    }

    async fn node_get_info(&self, _: Request<NodeGetInfoRequest>) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse { node_id: self.node_id.clone(), ..Default::default() }))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(socket), Some(node_id)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: sanity_node_stub SOCKET NODE_ID");
    };
    let listener = csi_proto::uds::bind(std::path::Path::new(&socket))?;
    let stub = Stub { node_id };
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(stub.clone()))
        .add_service(NodeServer::new(stub))
        .serve_with_incoming(csi_proto::uds::incoming(listener))
        .await?;
    Ok(())
}
