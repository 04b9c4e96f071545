//! Who may connect to a volume: the nodes it is published to, each with
//! its addresses and whether it may write. Setting them saves the record
//! and applies the policy to the running export at once; connections the
//! new policy no longer admits as they were admitted are stopped, and the
//! returned [`Fence`] says when they are done with the file, so that
//! nothing a removed node sent earlier lands after the caller moves on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::agent::{Agent, Object, blocking};
use crate::error::{Error, Kind, Result};
use crate::store::Publication;
use crate::volumes;

/// The connections an access change stopped (and any stopped before that
/// are still open).
#[derive(Debug)]
#[must_use = "the stopped connections may still write until the fence is waited for"]
pub struct Fence {
    volume_id: String,
    inner: nbd::server::Fence,
}

impl Fence {
    /// Connections stopped by the change.
    pub fn stopped(&self) -> usize {
        self.inner.stopped()
    }

    /// Waits until every stopped connection is done with the file, at most
    /// `timeout`; then UNAVAILABLE, for the caller to retry (the retry sets
    /// the same access and waits for the same stragglers).
    pub async fn wait(mut self, timeout: Duration) -> Result<()> {
        if tokio::time::timeout(timeout, self.inner.wait()).await.is_err() {
            return Err(Error::new(
                Kind::Unavailable,
                format!(
                    "{} of {} stopped NBD connections still hold volume {} after {timeout:?}; \
                     their writes could still land, retry",
                    self.inner.remaining(),
                    self.inner.stopped(),
                    self.volume_id
                ),
            ));
        }
        Ok(())
    }
}

impl Agent {
    /// Volume `id` is published to exactly `published` (node id to
    /// publication). The record is saved when that changes; the policy is
    /// applied to the running export either way, so that a call repeated
    /// after its fence timed out waits for the same connections. A volume
    /// without a server (its image missing) takes the record change only.
    pub async fn set_access(&self, id: &str, published: BTreeMap<String, Publication>) -> Result<Fence> {
        let _guard = self.lock(Object::Volume(id.to_owned())).await;
        let Some(mut record) = self.state().volume_record(id) else {
            return Err(Error::not_found(format!("volume {id} not found")));
        };
        if record.published != published {
            record.published = published;
            let (store, saved) = (Arc::clone(self.store()), record.clone());
            blocking(move || store.save_volume(&saved)).await?;
            self.state().update_volume_record(record);
        }
        let state = self.state();
        let inner = match state.volume(id).and_then(|v| v.export().map(|e| (e, v))) {
            Some((export, volume)) => volumes::apply_policy(&export, &volume.record().published),
            None => nbd::server::Fence::default(),
        };
        drop(state);
        if inner.stopped() > 0 {
            let stopped = inner.stopped();
            tracing::info!(volume.id = %id, stopped, "stopping connections of revoked peers, or of peers whose right to write changed");
        }
        Ok(Fence { volume_id: id.to_owned(), inner })
    }
}
