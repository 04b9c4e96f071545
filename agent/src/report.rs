//! What the agent tells its owner about failures a human must act on. The
//! agent logs them itself; a [`Reporter`] carries them further (the
//! controller records Kubernetes Events on the volume's claim).

use crate::error::Error;
use crate::store::VolumeRecord;

pub trait Reporter: Send + Sync + std::fmt::Debug {
    /// A stored volume's NBD server did not start; it is retried on every
    /// refresh, and reported again while it stays down.
    fn server_down(&self, volume: &VolumeRecord, error: &Error);
    /// A stored volume's image file is missing: its data is gone until the
    /// file is put back; the volume can still be deleted.
    fn image_missing(&self, volume: &VolumeRecord, reason: &str);
}

/// Reports nothing beyond the agent's own log lines.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogsOnly;

impl Reporter for LogsOnly {
    fn server_down(&self, _volume: &VolumeRecord, _error: &Error) {}
    fn image_missing(&self, _volume: &VolumeRecord, _reason: &str) {}
}
