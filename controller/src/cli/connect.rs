//! Reaching a running controller: the endpoint a client subcommand uses
//! (the server's own default unless told), and the gRPC channel to it.

use std::time::Duration;

use anyhow::Context;
use csi_proto::controller_client::ControllerClient;
use tonic::transport::Channel;

use super::ClientArgs;
use crate::service::{self, Endpoint};

/// How long connecting may take before the client gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A channel to the CSI endpoint of a running controller; every RPC on it
/// gives up after `rpc_timeout`.
pub async fn connect(endpoint: &Endpoint, rpc_timeout: Duration) -> anyhow::Result<Channel> {
    // tonic dials unix:// URIs itself; a TCP endpoint is plain HTTP/2.
    let uri = match endpoint {
        Endpoint::Unix(path) => format!("unix://{}", path.display()),
        Endpoint::Tcp(addr) => format!("http://{addr}"),
    };
    let connected = tonic::transport::Endpoint::from_shared(uri)
        .with_context(|| format!("endpoint {endpoint}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(rpc_timeout)
        .connect()
        .await;
    connected.with_context(|| {
        format!("cannot reach the controller at {endpoint}; is nbd-csi-controller running there (same --data-dir or --endpoint)?")
    })
}

impl ClientArgs {
    /// `--endpoint`, or the server's default for `--data-dir`.
    pub(super) fn endpoint(&self) -> Endpoint {
        self.endpoint.clone().unwrap_or_else(|| {
            let dir = std::path::absolute(&self.data_dir).unwrap_or_else(|_| self.data_dir.clone());
            service::default_endpoint(&dir)
        })
    }

    pub(super) async fn channel(&self) -> anyhow::Result<Channel> {
        connect(&self.endpoint(), Duration::from_secs(self.timeout)).await
    }

    pub(super) async fn controller(&self) -> anyhow::Result<ControllerClient<Channel>> {
        Ok(ControllerClient::new(self.channel().await?))
    }
}
