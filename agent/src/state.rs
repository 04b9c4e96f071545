//! What the agent knows right now: every volume (its record, its running
//! NBD server, why it cannot be served) and every snapshot record.
//!
//! Only this module changes them. The [`Agent`](crate::Agent) keeps the
//! [`State`] behind one mutex and its operations ask it through the methods
//! below, each after the store write that makes a change durable, under the
//! per-object lock the operation holds. Callers outside the crate see
//! copies: a [`VolumeStatus`] or a record.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use nbd::server::Export;

use crate::error::{Error, Result};
use crate::store::{Loaded, SnapshotRecord, VolumeRecord};
use crate::volumes::Served;

/// One stored volume.
#[derive(Debug)]
pub struct Volume {
    record: VolumeRecord,
    served: Option<Served>,
    /// Why the volume cannot be served at all (its image file is missing):
    /// it is reported abnormal and can still be deleted, while the other
    /// volumes serve normally.
    broken: Option<String>,
}

impl Volume {
    fn new(record: VolumeRecord, served: Option<Served>) -> Self {
        Self { record, served, broken: None }
    }

    pub fn record(&self) -> &VolumeRecord {
        &self.record
    }

    pub fn is_serving(&self) -> bool {
        self.served.as_ref().is_some_and(Served::is_serving)
    }

    /// A volume has a server (and a port) only while it is published.
    pub fn should_serve(&self) -> bool {
        !self.record.published.is_empty()
    }

    /// Why the volume cannot be served, when it cannot.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// The export of its running server; none while it has no server.
    pub fn export(&self) -> Option<Arc<Export>> {
        self.served.as_ref().map(|s| Arc::clone(&s.export))
    }

    /// FAILED_PRECONDITION for operations that need the volume's data.
    pub fn check_usable(&self) -> Result<()> {
        self.status().check_usable()
    }

    /// A copy of what callers may know of it.
    pub fn status(&self) -> VolumeStatus {
        let condition = match (&self.broken, self.should_serve(), self.is_serving()) {
            (Some(reason), _, _) => Condition::Broken(reason.clone()),
            (None, false, _) => Condition::Unpublished,
            (None, true, true) => Condition::Serving,
            (None, true, false) => Condition::NotServing,
        };
        VolumeStatus { record: self.record.clone(), condition }
    }
}

/// Whether a volume serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    Serving,
    /// Published to no node, so it has no server and holds no port: both
    /// are taken at its first publication.
    Unpublished,
    /// It is published but its server is down (retried in the background).
    NotServing,
    /// It cannot be served at all, for this reason (its image file is
    /// missing); it can still be deleted.
    Broken(String),
}

/// A stored volume as the agent's callers see it: a copy of its record and
/// its condition at the time of asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStatus {
    pub record: VolumeRecord,
    pub condition: Condition,
}

impl VolumeStatus {
    /// FAILED_PRECONDITION for operations that need the volume's data.
    pub fn check_usable(&self) -> Result<()> {
        match &self.condition {
            Condition::Broken(reason) => Err(Error::precondition(format!("volume {}: {reason}", self.record.id))),
            Condition::Serving | Condition::Unpublished | Condition::NotServing => Ok(()),
        }
    }
}

/// The volumes and snapshots by id (ids in order: lists page through them).
#[derive(Debug, Default)]
pub struct State {
    volumes: BTreeMap<String, Volume>,
    snapshots: BTreeMap<String, SnapshotRecord>,
}

impl State {
    /// The store's contents as loaded; no volume has a server yet.
    pub fn loaded(loaded: Loaded) -> Self {
        let volumes = loaded.volumes.into_iter().map(|(id, record)| (id, Volume::new(record, None))).collect();
        Self { volumes, snapshots: loaded.snapshots }
    }

    // ---------------------------------------------------------- volumes

    pub fn volume(&self, id: &str) -> Option<&Volume> {
        self.volumes.get(id)
    }

    /// A copy of volume `id`'s record, to change and save.
    pub fn volume_record(&self, id: &str) -> Option<VolumeRecord> {
        self.volumes.get(id).map(|v| v.record.clone())
    }

    /// The volume created with CreateVolume name `name`.
    pub fn find_volume_by_name(&self, name: &str) -> Option<&VolumeRecord> {
        self.volumes.values().map(|v| &v.record).find(|r| r.name == name)
    }

    /// Every volume id, in order.
    pub fn volume_ids(&self) -> impl Iterator<Item = &String> {
        self.volumes.keys()
    }

    /// The NBD ports the volumes hold.
    pub fn used_ports(&self) -> BTreeSet<u16> {
        self.volumes.values().filter_map(|v| v.record.port).collect()
    }

    /// Every published volume is serving, or broken (it never will serve,
    /// and says so through its condition).
    pub fn all_serving_or_broken(&self) -> bool {
        self.volumes.values().all(|v| !v.should_serve() || v.is_serving() || v.broken.is_some())
    }

    /// A volume created just now (with its server), or one being restored.
    pub fn add_volume(&mut self, record: VolumeRecord, served: Option<Served>) {
        self.volumes.insert(record.id.clone(), Volume::new(record, served));
    }

    /// Forgets volume `id` (DeleteVolume, once its files are gone).
    pub fn remove_volume(&mut self, id: &str) {
        self.volumes.remove(id);
    }

    /// Replaces the record of a volume that is still there with `record`,
    /// just saved.
    pub fn update_volume_record(&mut self, record: VolumeRecord) {
        if let Some(volume) = self.volumes.get_mut(&record.id) {
            volume.record = record;
        }
    }

    /// Volume `id` was grown to `size` bytes (and its record saved).
    pub fn set_volume_capacity(&mut self, id: &str, size: u64) {
        if let Some(volume) = self.volumes.get_mut(id) {
            volume.record.capacity_bytes = size;
        }
    }

    /// Volume `id` cannot be served, for `reason`.
    pub fn mark_broken(&mut self, id: &str, reason: String) {
        if let Some(volume) = self.volumes.get_mut(id) {
            volume.broken = Some(reason);
        }
    }

    /// What made volume `id` unservable is gone.
    pub fn clear_broken(&mut self, id: &str) {
        if let Some(volume) = self.volumes.get_mut(id) {
            volume.broken = None;
        }
    }

    /// Gives volume `id` the server `served`; returns the one it replaces.
    /// A volume deleted meanwhile takes none: `served` is dropped, which
    /// stops it.
    pub fn replace_server(&mut self, id: &str, served: Served) -> Option<Served> {
        self.volumes.get_mut(id).and_then(|v| v.served.replace(served))
    }

    /// Takes volume `id`'s server out of it, to stop it.
    pub fn take_server(&mut self, id: &str) -> Option<Served> {
        self.volumes.get_mut(id).and_then(|v| v.served.take())
    }

    /// Takes every volume's server, to stop them all.
    pub fn take_all_servers(&mut self) -> Vec<Served> {
        self.volumes.values_mut().filter_map(|v| v.served.take()).collect()
    }

    // -------------------------------------------------------- snapshots

    pub fn snapshot(&self, id: &str) -> Option<&SnapshotRecord> {
        self.snapshots.get(id)
    }

    /// The snapshot created with CreateSnapshot name `name`.
    pub fn find_snapshot_by_name(&self, name: &str) -> Option<&SnapshotRecord> {
        self.snapshots.values().find(|s| s.name == name)
    }

    /// Every snapshot record, in id order.
    pub fn snapshots(&self) -> impl Iterator<Item = &SnapshotRecord> {
        self.snapshots.values()
    }

    pub fn snapshot_count(&self) -> usize {
        self.snapshots.len()
    }

    /// A snapshot just saved, or a saved change of one.
    pub fn insert_snapshot(&mut self, record: SnapshotRecord) {
        self.snapshots.insert(record.id.clone(), record);
    }

    /// Forgets snapshot `id` (DeleteSnapshot, once its files are gone).
    pub fn remove_snapshot(&mut self, id: &str) {
        self.snapshots.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::volume;

    fn state(volumes: &[VolumeRecord]) -> State {
        let volumes = volumes.iter().map(|r| (r.id.clone(), r.clone())).collect();
        State::loaded(Loaded { volumes, snapshots: BTreeMap::new() })
    }

    /// A DeleteVolume that won the race against a save of the same volume
    /// (an expansion, a publication, a background refresh) stays won.
    #[test]
    fn changes_to_a_volume_deleted_meanwhile_do_not_bring_it_back() {
        let mut state = state(&[volume("vol-a"), volume("vol-b")]);
        state.remove_volume("vol-a");
        state.update_volume_record(volume("vol-a"));
        state.set_volume_capacity("vol-a", 2 << 20);
        state.mark_broken("vol-a", "gone".into());
        assert!(state.volume("vol-a").is_none());
        assert_eq!(state.volume_ids().collect::<Vec<_>>(), ["vol-b"]);
        state.set_volume_capacity("vol-b", 2 << 20);
        assert_eq!(state.volume_record("vol-b").map(|r| r.capacity_bytes), Some(2 << 20));
    }

    #[test]
    fn ready_once_every_published_volume_serves_or_is_known_broken() {
        let publication = crate::store::Publication { read_only: false, access_mode: 1, addresses: None };
        let published = VolumeRecord { published: [("node".to_string(), publication)].into(), ..volume("vol-a") };
        let mut state = state(&[published, volume("vol-idle")]);
        assert_eq!(state.volume("vol-idle").unwrap().status().condition, Condition::Unpublished);
        assert_eq!(state.volume("vol-a").unwrap().status().condition, Condition::NotServing);
        assert!(!state.all_serving_or_broken(), "no server yet for the published volume");
        state.mark_broken("vol-a", "image file is missing".into());
        assert!(state.all_serving_or_broken());
        let error = state.volume("vol-a").unwrap().check_usable().unwrap_err();
        assert_eq!(error.to_string(), "volume vol-a: image file is missing");
        state.clear_broken("vol-a");
        assert!(!state.all_serving_or_broken());
        assert!(state.volume("vol-a").unwrap().check_usable().is_ok());
    }

    #[test]
    fn names_find_their_objects() {
        let mut state = state(&[volume("vol-a"), volume("vol-b")]);
        assert_eq!(state.find_volume_by_name("name-vol-b").map(|r| r.id.as_str()), Some("vol-b"));
        assert!(state.find_volume_by_name("vol-b").is_none());
        let snapshot = SnapshotRecord {
            format: 1,
            id: "snap-1".into(),
            name: "nightly".into(),
            source_volume_id: "vol-a".into(),
            size_bytes: 1 << 20,
            created_seconds: 0,
            created_nanos: 0,
            parameters: BTreeMap::new(),
            source_block: Some(true),
            source_tls: Default::default(),
        };
        state.insert_snapshot(snapshot);
        assert_eq!(state.find_snapshot_by_name("nightly").map(|s| s.id.as_str()), Some("snap-1"));
        assert_eq!(state.snapshot_count(), 1);
        state.remove_snapshot("snap-1");
        assert!(state.snapshot("snap-1").is_none());
    }
}
