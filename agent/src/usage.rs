//! What the store takes of its filesystem: per volume the bytes its sparse
//! image has allocated (thin usage) beside its capacity, and the data
//! directory's free and total bytes, so that over-commit shows before a
//! write fails with ENOSPC. Reads file metadata and statvfs: blocking calls
//! that the metrics make on the blocking pool, never on a runtime worker.

use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;

use crate::agent::Agent;
use crate::error::Result;
use crate::store::Space;

/// The unit of `st_blocks`, whatever the filesystem's block size.
const STAT_BLOCK: u64 = 512;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeUsage {
    pub id: String,
    pub capacity_bytes: u64,
    /// Bytes the image's blocks take on the filesystem (`st_blocks` × 512):
    /// what was written, rounded to the filesystem's blocks, plus its
    /// metadata.
    pub allocated_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct Usage {
    pub data_dir: PathBuf,
    /// Volumes whose image exists, in id order (a volume whose image is
    /// missing is reported through its condition instead).
    pub volumes: Vec<VolumeUsage>,
    pub space: Space,
}

impl Agent {
    /// The store's usage now. Blocking: call it off the async runtime.
    pub fn usage(&self) -> Result<Usage> {
        let records: Vec<(String, u64)> = {
            let state = self.state();
            state.volume_ids().filter_map(|id| state.volume_record(id)).map(|r| (r.id, r.capacity_bytes)).collect()
        };
        let store = self.store();
        let volumes = records
            .into_iter()
            .filter_map(|(id, capacity_bytes)| {
                // Gone meanwhile (deleted, or missing and reported): not listed.
                let meta = std::fs::metadata(store.volume_image(&id)).ok()?;
                Some(VolumeUsage { id, capacity_bytes, allocated_bytes: meta.blocks().saturating_mul(STAT_BLOCK) })
            })
            .collect();
        Ok(Usage { data_dir: store.root().to_path_buf(), volumes, space: store.space()? })
    }
}
