//! CSI Identity and Node over gRPC on a unix socket (or TCP for tests).

mod identity;
mod node;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use csi_proto::identity_server::IdentityServer;
use csi_proto::node_server::NodeServer;
use tonic::Status;

use crate::attach::KernelAttacher;
use crate::error::{Error, ErrorKind};
use crate::volumes::Volumes;

pub use identity::IdentityService;
pub use node::NodeService;

/// What NodeGetInfo and GetPluginInfo report.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub driver_name: String,
    pub node_id: String,
    pub max_volumes: i64,
}

pub fn status(e: Error) -> Status {
    // Logged once, with the RPC's span, by `#[tracing::instrument(err)]`.
    let message = e.chain();
    match e.kind {
        ErrorKind::InvalidArgument => Status::invalid_argument(message),
        ErrorKind::NotFound => Status::not_found(message),
        ErrorKind::Busy | ErrorKind::Unsupported => Status::failed_precondition(message),
        ErrorKind::Exhausted => Status::resource_exhausted(message),
        ErrorKind::Unavailable => Status::unavailable(message),
        ErrorKind::Kernel | ErrorKind::Io => Status::internal(message),
    }
}

/// Serves until `shutdown` resolves. `endpoint` is `unix:///path` or a path.
pub async fn serve(
    volumes: Arc<Volumes<KernelAttacher>>,
    info: NodeInfo,
    endpoint: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService(info.clone())))
        .add_service(NodeServer::new(NodeService { volumes, info }));
    let path = Path::new(endpoint.strip_prefix("unix://").unwrap_or(endpoint));
    let listener = csi_proto::uds::bind(path).with_context(|| format!("binding {}", path.display()))?;
    router.serve_with_incoming_shutdown(csi_proto::uds::incoming(listener), shutdown).await?;
    let _ = std::fs::remove_file(path);
    Ok(())
}
