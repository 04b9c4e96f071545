//! Who may connect to a volume: the nodes it is published to, each with
//! its addresses and whether it may write. Setting them saves the record
//! and applies the policy to the running export at once; connections the
//! new policy no longer admits as they were admitted are stopped, and the
//! change returns only once they are done with the file, so that nothing a
//! removed node sent earlier lands after the caller moves on.
//!
//! A volume has an NBD server, and holds a port of the agent's range, only
//! while it is published: the first publication starts the server on the
//! first free port, the last unpublication stops it and gives the port
//! back. So the range bounds how many volumes are attached at once, not
//! how many exist.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::agent::{Agent, Object, blocking};
use crate::error::{Error, Kind, Result};
use crate::store::{Publication, VolumeRecord};
use crate::volumes;

/// What an access change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessChange {
    /// Connections it stopped (all of them done with the file now).
    pub stopped: usize,
    /// The port the volume's server listens on; `None` once it is
    /// published nowhere, or while its image is missing.
    pub port: Option<u16>,
}

impl Agent {
    /// Volume `id` is published to exactly `published` (node id to
    /// publication). The record is saved when that changes, the policy is
    /// applied to the running export, and the call waits, at most
    /// `timeout`, until every connection the change stopped is done with
    /// the file; then UNAVAILABLE, for the caller to retry (the retry sets
    /// the same access and waits for the same stragglers: the policy is
    /// applied even when nothing changed).
    ///
    /// The first publication starts the volume's server on a free port of
    /// the range (RESOURCE_EXHAUSTED when none is left); the last
    /// unpublication stops it, once its connections are done, and gives
    /// the port back. A volume whose image is missing takes the record
    /// change only; its server starts when the image is back.
    pub async fn set_access(
        &self,
        id: &str,
        published: BTreeMap<String, Publication>,
        timeout: Duration,
    ) -> Result<AccessChange> {
        let _guard = self.lock(Object::Volume(id.to_owned())).await;
        let Some(mut record) = self.state().volume_record(id) else {
            return Err(Error::not_found(format!("volume {id} not found")));
        };
        let broken = self.state().volume(id).is_some_and(|v| v.broken().is_some());
        let changed = record.published != published;
        record.published = published;
        if !record.published.is_empty() && record.port.is_none() && !broken {
            // The server first, on the port the record will name: a crash
            // in between leaves the volume unpublished.
            return self.serve_first_publication(record).await;
        }
        if changed {
            self.save(record.clone()).await?;
        }
        let fence = {
            let state = self.state();
            match state.volume(id).and_then(|v| v.export().map(|e| (e, v))) {
                Some((export, volume)) => volumes::apply_policy(&export, volume.record()),
                None => nbd::server::Fence::default(),
            }
        };
        let stopped = fence.stopped();
        if stopped > 0 {
            tracing::info!(volume.id = %id, stopped, "stopping connections of revoked peers, or of peers whose right to write changed");
        }
        wait_for(fence, id, timeout).await?;
        if record.published.is_empty() && record.port.is_some() {
            self.release_port(record).await?;
            return Ok(AccessChange { stopped, port: None });
        }
        Ok(AccessChange { stopped, port: record.port })
    }

    /// Starts the server of a volume published for the first time and saves
    /// the record naming its port and publications.
    async fn serve_first_publication(&self, mut record: VolumeRecord) -> Result<AccessChange> {
        let served = self.serve_new(&mut record).await?;
        let port = served.addr.port();
        if let Err(e) = self.save(record.clone()).await {
            let _ = served.stop().await;
            return Err(e);
        }
        tracing::info!(volume.id = %record.id, port, "volume published: serving");
        self.install_server(&record.id, served).await;
        Ok(AccessChange { stopped: 0, port: Some(port) })
    }

    /// Stops the server of a volume published nowhere (its connections are
    /// done with the file: the fence said so) and gives its port back.
    pub(crate) async fn release_port(&self, mut record: VolumeRecord) -> Result<()> {
        if let Some(served) = self.take_server(&record.id)
            && let Err(e) = served.stop().await
        {
            // Every write acknowledged as durable (FLUSH, FUA) already is.
            tracing::warn!(volume.id = %record.id, error = %e, "flushing on stop failed");
        }
        let (id, port) = (record.id.clone(), record.port.take());
        self.save(record).await?;
        tracing::info!(volume.id = %id, port = ?port, "volume published nowhere: server stopped, port given back");
        Ok(())
    }

    /// Saves `record` and makes it the volume's record.
    pub(crate) async fn save(&self, record: VolumeRecord) -> Result<()> {
        let (store, saved) = (Arc::clone(self.store()), record.clone());
        blocking(move || store.save_volume(&saved)).await?;
        self.state().update_volume_record(record);
        Ok(())
    }
}

/// Waits, at most `timeout`, for the connections `fence` covers to be done
/// with volume `id`'s file.
async fn wait_for(mut fence: nbd::server::Fence, id: &str, timeout: Duration) -> Result<()> {
    if tokio::time::timeout(timeout, fence.wait()).await.is_err() {
        return Err(Error::new(
            Kind::Unavailable,
            format!(
                "{} of {} stopped NBD connections still hold volume {id} after {timeout:?}; \
                 their writes could still land, retry",
                fence.remaining(),
                fence.stopped(),
            ),
        ));
    }
    Ok(())
}
