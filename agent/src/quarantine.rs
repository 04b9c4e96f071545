//! Setting a volume or snapshot aside: a volume's server stops, and the
//! image and record move out of the store into `quarantine/<id>/`, kept
//! for a human to look at. For data nobody claims any more (in a cluster,
//! one whose object is gone without the agent having deleted it): data is
//! never deleted because a claim is missing.

use std::path::PathBuf;
use std::sync::Arc;

use crate::agent::{Agent, Object, blocking};
use crate::error::{Error, Result};

impl Agent {
    /// Quarantines volume `id`; returns where its files went. NOT_FOUND
    /// when there is no such volume. On failure the volume serves again.
    pub async fn quarantine_volume(&self, id: &str) -> Result<PathBuf> {
        let _guard = self.lock(Object::Volume(id.to_owned())).await;
        if self.state().volume(id).is_none() {
            return Err(Error::not_found(format!("volume {id} not found")));
        }
        if let Some(served) = self.take_server(id)
            && let Err(e) = served.stop().await
        {
            tracing::warn!(volume.id = %id, error = %e, "flushing on stop failed; quarantining anyway");
        }
        let (store, rid) = (Arc::clone(self.store()), id.to_owned());
        match blocking(move || store.quarantine_volume(&rid)).await {
            Ok(path) => {
                self.state().remove_volume(id);
                tracing::warn!(volume.id = %id, path = %path.display(), "volume quarantined");
                Ok(path)
            }
            Err(e) => {
                self.resume_serving(id).await;
                Err(e)
            }
        }
    }

    /// Quarantines snapshot `id`; returns where its files went. NOT_FOUND
    /// when there is no such snapshot. Volumes restored from it keep their
    /// own copies.
    pub async fn quarantine_snapshot(&self, id: &str) -> Result<PathBuf> {
        let _guard = self.lock(Object::Snapshot(id.to_owned())).await;
        if self.state().snapshot(id).is_none() {
            return Err(Error::not_found(format!("snapshot {id} not found")));
        }
        let (store, rid) = (Arc::clone(self.store()), id.to_owned());
        let path = blocking(move || store.quarantine_snapshot(&rid)).await?;
        self.state().remove_snapshot(id);
        tracing::warn!(snapshot.id = %id, path = %path.display(), "snapshot quarantined");
        Ok(path)
    }
}
