//! ControllerPublishVolume / ControllerUnpublishVolume: who may attach a
//! volume, and the NBD URI the node plugin connects to. A volume's NBD
//! server, and the port it takes, exist only while it is published: the
//! first publish starts it, the last unpublish stops it. In cluster mode the
//! volume's agent carries the change out and reports it in effect
//! ([`crate::storage::Cluster::publish`]), under the same rules.
//!
//! Both change who may use the volume's export, and both answer only once
//! the connections that change stopped can no longer touch the file: after
//! ControllerUnpublishVolume returns, nothing a node sent earlier (a WRITE
//! still arriving from a partitioned node, say) can land on top of what the
//! next node writes.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use agent::{Agent, ExportTls, Publication, VolumeRecord};
use csi_proto::contract::{NbdUri, PublishContext};
use csi_proto::*;

use super::{check_capability, is_reader_only, is_single_node, require};
use crate::driver::{Driver, LockKey};
use crate::error::{Error, Result};
use crate::storage::Storage;

/// How long publish and unpublish wait for the connections they stopped to
/// let go of the file. A stopped reader ends at its next poll, so this is
/// reached only when a file operation hangs (a stuck disk); the call then
/// fails with UNAVAILABLE, and its retry waits again.
const FENCE_TIMEOUT: Duration = Duration::from_secs(5);

impl Driver {
    /// No connection count: the node opens several only when the server's
    /// handshake sets CAN_MULTI_CONN, whatever a context says.
    fn publish_context(
        &self,
        record: &VolumeRecord,
        port: Option<u16>,
        read_only: bool,
    ) -> Result<HashMap<String, String>> {
        // Published and not broken (checked before): the agent serves it.
        let port = port.ok_or_else(|| Error::internal(format!("volume {} has no NBD port", record.id)))?;
        // Only `required` is nbds://: with `allowed` the node attaches in
        // plaintext, as the export lets it.
        let nbd_uri =
            NbdUri::new(self.nbd_address(port), record.export_name.clone()).with_tls(record.tls == ExportTls::Required);
        Ok(PublishContext { nbd_uri, read_only }.to_map())
    }

    /// Gives the agent volume `id`'s publications and waits, at most
    /// [`FENCE_TIMEOUT`], until every connection they no longer admit as it
    /// was admitted is done with the file. Also run when nothing changed, so
    /// that the retry of a call that timed out waits for the same stragglers.
    /// Returns the port the volume is served on while it is published.
    pub(crate) async fn set_access(
        &self,
        agent: &Agent,
        id: &str,
        published: BTreeMap<String, Publication>,
    ) -> Result<Option<u16>> {
        Ok(agent.set_access(id, published, FENCE_TIMEOUT).await?.port)
    }

    #[tracing::instrument(err, skip_all, fields(volume.id = %req.volume_id, node.id = %req.node_id))]
    pub async fn publish_volume(&self, req: ControllerPublishVolumeRequest) -> Result<ControllerPublishVolumeResponse> {
        require(&req.volume_id, "volume_id")?;
        require(&req.node_id, "node_id")?;
        let cap = req.volume_capability.as_ref().ok_or_else(|| Error::invalid("volume_capability is required"))?;
        let (block, mode) = check_capability(cap)?;
        let id = req.volume_id.clone();
        let exists = match self.storage() {
            Storage::Embedded(agent) => agent.volume(&id).is_some(),
            // Its publish reads the object and answers NOT_FOUND itself.
            Storage::Cluster(_) => true,
        };
        if !exists {
            return Err(Error::not_found(format!("volume {id} not found")));
        }
        let addresses = self.node_addresses(&req.node_id).await?;
        if addresses.as_ref().is_some_and(Vec::is_empty) {
            // The export would admit nobody: an attach that cannot work.
            return Err(Error::precondition(format!("node {:?} has no IP address in status.addresses", req.node_id)));
        }
        let agent = match self.storage() {
            Storage::Embedded(agent) => agent,
            // No lock in cluster mode: another replica may serve the same
            // volume at the same time anyway, so the change is made safe by
            // the API server (resourceVersion), and a call waiting on a lock
            // here would only queue behind one stuck on the API server.
            Storage::Cluster(cluster) => {
                // Its agent looks the node's addresses up itself.
                let publish_context = cluster.publish(&id, &req.node_id, block, mode, req.readonly).await?;
                tracing::info!("volume published");
                return Ok(ControllerPublishVolumeResponse { publish_context });
            }
        };
        let _guard = self.lock(LockKey::VolumeId(id.to_owned())).await;
        let mut record = match agent.volume(&id) {
            // A volume without its image has no server: an attach would hang.
            Some(volume) => volume.check_usable().map(|()| volume.record)?,
            None => return Err(Error::not_found(format!("volume {id} not found"))),
        };
        if block != record.block {
            return Err(Error::invalid(format!(
                "volume was created for {} access",
                if record.block { "block" } else { "mount" }
            )));
        }
        let publication = Publication {
            read_only: req.readonly || record.read_only || is_reader_only(mode),
            access_mode: mode,
            addresses,
        };
        if let Some(existing) = record.published.get(&req.node_id) {
            if existing.read_only == publication.read_only && existing.access_mode == publication.access_mode {
                // A retry after a fence timed out must wait for it too.
                let read_only = existing.read_only;
                let port = self.set_access(agent, &id, record.published.clone()).await?;
                return Ok(ControllerPublishVolumeResponse {
                    publish_context: self.publish_context(&record, port, read_only)?,
                });
            }
            return Err(Error::exists(format!("volume is published to {} with other options", req.node_id)));
        }
        if let Some((other, p)) = record.published.iter().next()
            && (is_single_node(mode) || is_single_node(p.access_mode))
        {
            return Err(Error::precondition(format!("volume is single-node and already published to {other}")));
        }
        let read_only = publication.read_only;
        record.published.insert(req.node_id.clone(), publication);
        let port = self.set_access(agent, &id, record.published.clone()).await?;
        tracing::info!(port, "volume published");
        Ok(ControllerPublishVolumeResponse { publish_context: self.publish_context(&record, port, read_only)? })
    }

    #[tracing::instrument(err, skip_all, fields(volume.id = %req.volume_id, node.id = %req.node_id))]
    pub async fn unpublish_volume(
        &self,
        req: ControllerUnpublishVolumeRequest,
    ) -> Result<ControllerUnpublishVolumeResponse> {
        require(&req.volume_id, "volume_id")?;
        let id = req.volume_id;
        let agent = match self.storage() {
            Storage::Embedded(agent) => agent,
            // No lock in cluster mode, as in ControllerPublishVolume.
            Storage::Cluster(cluster) => {
                cluster.unpublish(&id, &req.node_id).await?;
                self.report_fenced(&id, &req.node_id).await;
                return Ok(ControllerUnpublishVolumeResponse {});
            }
        };
        let _guard = self.lock(LockKey::VolumeId(id.to_owned())).await;
        let Some(mut record) = agent.volume(&id).map(|v| v.record) else {
            return Ok(ControllerUnpublishVolumeResponse {});
        };
        let before = record.published.len();
        if req.node_id.is_empty() {
            record.published.clear();
        } else {
            record.published.remove(&req.node_id);
        }
        let changed = record.published.len() != before;
        // Unchanged: already unpublished, a retry after a fence timed out.
        self.set_access(agent, &id, record.published).await?;
        if changed {
            tracing::info!("volume unpublished");
            self.report_fenced(&id, &req.node_id).await;
        }
        Ok(ControllerUnpublishVolumeResponse {})
    }
}
