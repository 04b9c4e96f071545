//! Volumes as desired state: create one (empty, a clone of a volume, or a
//! restore of a snapshot), delete one, grow one. Each returns once the
//! change is durable and served.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::agent::{Agent, Object, blocking, creation_id};
use crate::error::{Error, Kind, Result};
use crate::store::{self, ExportTls, FORMAT, Source, VolumeRecord};

/// A volume to create; the agent picks its id and export name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewVolume {
    /// The id to create it under, for a caller that names volumes itself
    /// (a reconciler, after the object asking for it); `None` picks a fresh
    /// one. Creating an id that exists returns that volume as it is.
    pub id: Option<String>,
    /// The name it is created under (the CSI request name); kept in the
    /// record so that a repeated request finds it.
    pub name: String,
    /// At least the source's size.
    pub capacity_bytes: u64,
    /// Raw block access (true) or a filesystem the node formats (false).
    pub block: bool,
    /// Access modes (CSI enum values), kept in the record.
    pub access_modes: Vec<i32>,
    pub fs_type: String,
    pub parameters: BTreeMap<String, String>,
    /// Content to start from: a snapshot, or a point-in-time copy of a
    /// live volume.
    pub source: Option<Source>,
    /// Every export of it refuses writes.
    pub read_only: bool,
    /// The export name to serve it under, for a caller that derives names
    /// itself (in a cluster, from a key both roles hold, so that no object
    /// carries it); `None` picks a random one, kept in the record.
    pub export_name: Option<String>,
    /// Whether its export speaks TLS: anything but off needs the storage
    /// role's certificates (FAILED_PRECONDITION without them).
    pub tls: ExportTls,
}

/// The longest export name the NBD protocol allows.
const MAX_EXPORT_NAME: usize = nbd::consts::limits::MAX_STRING_LEN as usize;

impl Agent {
    /// Creates the volume: its image (copied from the source, if any: a
    /// source volume as it is at this call, its writes going on), then its record, the commit
    /// point. It has no server and no port until it is published. NOT_FOUND
    /// for a missing source, FAILED_PRECONDITION for a volume that needs TLS
    /// without certificates that load, or for a source volume
    /// without its image, RESOURCE_EXHAUSTED without the space.
    pub async fn create_volume(&self, new: NewVolume) -> Result<VolumeRecord> {
        let id = creation_id(new.id, "vol-", store::is_volume_id)?;
        let _creating = self.lock(Object::Creation(id.clone())).await;
        if let Some(existing) = self.state().volume_record(&id) {
            return Ok(existing);
        }
        // Hold the source still while it is copied.
        let (source_guard, source_image, source_size) = match &new.source {
            None => (None, None, 0),
            Some(Source::Snapshot(id)) => {
                let guard = self.lock(Object::Snapshot(id.clone())).await;
                let size = self.state().snapshot(id).map(|s| s.size_bytes);
                let size = size.ok_or_else(|| Error::not_found(format!("source snapshot {id} not found")))?;
                (Some(guard), Some(self.store().snapshot_image(id)), size)
            }
            Some(Source::Volume(id)) => {
                let guard = self.lock(Object::Volume(id.clone())).await;
                let size = match self.state().volume(id) {
                    None => return Err(Error::not_found(format!("source volume {id} not found"))),
                    Some(v) => v.check_usable().map(|()| v.record().capacity_bytes)?,
                };
                (Some(guard), Some(self.store().volume_image(id)), size)
            }
        };
        let export_name = match new.export_name {
            None => store::random_hex(32)?,
            Some(name) if !name.is_empty() && name.len() <= MAX_EXPORT_NAME => name,
            Some(name) => {
                return Err(Error::new(
                    Kind::InvalidArgument,
                    format!("an export name of {} bytes is not 1 to {MAX_EXPORT_NAME}", name.len()),
                ));
            }
        };
        // Checked before any data is written: a volume that needs TLS is
        // never made where it could only be served in plaintext.
        self.export_mode(new.tls).await?;
        let size = new.capacity_bytes;
        if size < source_size {
            return Err(Error::new(
                Kind::InvalidArgument,
                format!("a volume of {size} bytes cannot hold its source's {source_size}"),
            ));
        }
        let store = Arc::clone(self.store());
        blocking(move || store.check_space(size)).await?;
        let record = VolumeRecord {
            format: FORMAT,
            id: id.clone(),
            name: new.name,
            capacity_bytes: size,
            block: new.block,
            read_only: new.read_only,
            access_modes: new.access_modes,
            fs_type: new.fs_type,
            parameters: new.parameters,
            source: new.source,
            port: None,
            export_name,
            published: Default::default(),
            tls: new.tls,
        };
        let (store, new_id) = (Arc::clone(self.store()), id.clone());
        // Held until the record is saved.
        let _source_guard = match (&record.source, source_image, source_guard) {
            (Some(Source::Volume(src)), Some(_), Some(lock)) => {
                // A clone of a live volume is point-in-time, like a
                // snapshot, and its writes go on meanwhile.
                let target = blocking(move || store.begin_volume_image(&new_id)).await?;
                let (target, lock) = self.copy_at_instant(src, target, lock).await?;
                blocking(move || target.commit(size)).await?;
                Some(lock)
            }
            (_, image, lock) => {
                blocking(move || store.create_volume_image(&new_id, size, image.as_deref())).await?;
                lock
            }
        };
        let (store, saved) = (Arc::clone(self.store()), record.clone());
        if let Err(e) = blocking(move || store.save_volume(&saved)).await {
            let (store, id) = (Arc::clone(self.store()), id.clone());
            let _ = blocking(move || store.remove_volume(&id)).await;
            return Err(e);
        }
        tracing::info!(volume.id = %id, size, "volume created");
        // No server until it is published (see `set_access`).
        self.state().add_volume(record.clone(), None);
        Ok(record)
    }

    /// Stops the volume's server and removes it, record first. Deleting a
    /// volume that is not there succeeds; one still published to a node is
    /// FAILED_PRECONDITION (take its access away first).
    pub async fn delete_volume(&self, id: &str) -> Result<()> {
        let _guard = self.lock(Object::Volume(id.to_owned())).await;
        {
            let state = self.state();
            let Some(volume) = state.volume(id) else { return Ok(()) };
            if !volume.record().published.is_empty() {
                let nodes: Vec<&String> = volume.record().published.keys().collect();
                return Err(Error::precondition(format!("volume is still published to {nodes:?}")));
            }
        }
        let served = self.take_server(id);
        if let Some(served) = served
            && let Err(e) = served.stop().await
        {
            tracing::warn!(volume.id = %id, error = %e, "flushing on stop failed; deleting anyway");
        }
        let (store, rid) = (Arc::clone(self.store()), id.to_owned());
        if let Err(e) = blocking(move || store.remove_volume(&rid)).await {
            // Still stored: serve it again rather than leave it dark.
            self.resume_serving(id).await;
            return Err(e);
        }
        self.state().remove_volume(id);
        tracing::info!(volume.id = %id, "volume deleted");
        Ok(())
    }

    /// Grows volume `id` to `size` bytes, online: connected clients see the
    /// new size at once. Never shrinks (a smaller `size` changes nothing).
    /// Returns the volume's size.
    pub async fn expand_volume(&self, id: &str, size: u64) -> Result<u64> {
        let _guard = self.lock(Object::Volume(id.to_owned())).await;
        let (mut record, export) = {
            let state = self.state();
            let v = state.volume(id).ok_or_else(|| Error::not_found(format!("volume {id} not found")))?;
            v.check_usable()?;
            (v.record().clone(), v.export())
        };
        if size <= record.capacity_bytes {
            return Ok(record.capacity_bytes);
        }
        let (store, image, grow) =
            (Arc::clone(self.store()), self.store().volume_image(id), size - record.capacity_bytes);
        blocking(move || {
            store.check_space(grow)?;
            match export {
                Some(export) => export.resize(size),
                None => std::fs::OpenOptions::new().write(true).open(&image).and_then(|f| f.set_len(size)),
            }
            .map_err(|e| Error::io("growing image", e))
        })
        .await?;
        record.capacity_bytes = size;
        let (store, saved) = (Arc::clone(self.store()), record);
        blocking(move || store.save_volume(&saved)).await?;
        self.state().set_volume_capacity(id, size);
        tracing::info!(volume.id = %id, size, "volume expanded");
        Ok(size)
    }
}
