//! The store under `--data-dir`: `volumes/<id>.img` and `snapshots/<id>.img`
//! (sparse backing files) with `<id>.json` records beside them.
//!
//! The record is the commit point. A volume or snapshot image is prepared as
//! `<id>.img.tmp`, fsynced and renamed into place before its record is
//! written; deletion removes the record first. So after a crash an image
//! without a record was never acknowledged (or was already deleted), and
//! loading removes it along with leftover `*.tmp` files. A record that does
//! not parse stops loading with an error naming the file; nothing is removed.
//! A record whose image is missing loads: the agent reports that volume.
//!
//! Files are 0600 and directories 0700 whatever the umask; opening fixes
//! the modes a store made by an older version has. A full filesystem does
//! not stop record writes: they draw on the metadata [`reserve`].

mod atomic;
pub mod copy;
pub mod records;
pub mod reserve;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use nix::sys::statvfs::statvfs;

pub use records::{ExportTls, FORMAT, Publication, SnapshotRecord, Source, VolumeRecord};

use crate::error::{Error, Result};

const VOLUMES: &str = "volumes";
/// Where volumes nobody claims are moved aside, never deleted.
pub const QUARANTINE: &str = "quarantine";
const SNAPSHOTS: &str = "snapshots";
const IMG: &str = ".img";
const JSON: &str = ".json";
/// Records are small; anything bigger is not ours.
const MAX_RECORD: u64 = 1 << 20;

/// Volume ids are `vol-` and snapshot ids `snap-` followed by 32 hex digits.
pub fn is_volume_id(id: &str) -> bool {
    id.strip_prefix("vol-").is_some_and(is_token)
}

pub fn is_snapshot_id(id: &str) -> bool {
    id.strip_prefix("snap-").is_some_and(is_token)
}

fn is_token(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// 16 random bytes as 32 hex digits (getrandom(2)).
pub fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    let mut filled = 0;
    while filled < bytes {
        let n = rustix::rand::getrandom(&mut buf[filled..], rustix::rand::GetRandomFlags::empty())
            .map_err(|e| Error::io("getrandom", e.into()))?;
        filled += n;
    }
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Space on the data directory's filesystem.
#[derive(Debug, Clone, Copy)]
pub struct Space {
    pub available: u64,
    pub total: u64,
}

#[derive(Debug, Default)]
pub struct Loaded {
    pub volumes: BTreeMap<String, VolumeRecord>,
    pub snapshots: BTreeMap<String, SnapshotRecord>,
}

#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    reserve: reserve::Reserve,
}

#[derive(Clone, Copy)]
enum Kind {
    Volume,
    Snapshot,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Self::Volume => VOLUMES,
            Self::Snapshot => SNAPSHOTS,
        }
    }
}

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> Error {
    move |e| Error::io(what.to_string(), e)
}

impl Store {
    /// Opens (creating if needed) the store and loads every record.
    pub fn open(root: &Path) -> Result<(Self, Loaded)> {
        match atomic::create_private_dir(root) {
            Ok(()) => {}
            // A data directory owned by someone else: the 0700 directories
            // inside still keep the records and images private.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied && root.is_dir() => {
                tracing::warn!(path = %root.display(), error = %e, "cannot make the data directory 0700");
            }
            Err(e) => return Err(Error::io(format!("creating {}", root.display()), e)),
        }
        for dir in [root.join(VOLUMES), root.join(SNAPSHOTS)] {
            atomic::create_private_dir(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        let store = Self { root: root.to_path_buf(), reserve: reserve::Reserve::new(root.join(reserve::NAME)) };
        let mut loaded = Loaded::default();
        for record in store.scan::<VolumeRecord>(Kind::Volume, is_volume_id)? {
            loaded.volumes.insert(record.id.clone(), record);
        }
        for record in store.scan::<SnapshotRecord>(Kind::Snapshot, is_snapshot_id)? {
            loaded.snapshots.insert(record.id.clone(), record);
        }
        store.refill_reserve();
        Ok((store, loaded))
    }

    /// Grows the metadata reserve back to full size if space allows; a
    /// failure is logged (the next refill tries again). A full disk is
    /// expected and retried every refresh, so it is only a debug line.
    pub fn refill_reserve(&self) {
        match self.reserve.refill() {
            Ok(()) => {}
            Err(e) if reserve::is_full(&e) => tracing::debug!(error = %e, "no room for the metadata reserve yet"),
            Err(e) => tracing::warn!(error = %e, "refilling the metadata reserve failed"),
        }
    }

    /// Bytes the metadata reserve holds now.
    pub fn reserve_len(&self) -> Result<u64> {
        self.reserve.len().map_err(io_err("reading the metadata reserve"))
    }

    fn dir(&self, kind: Kind) -> PathBuf {
        self.root.join(kind.dir())
    }

    fn scan<T: serde::de::DeserializeOwned + HasId>(&self, kind: Kind, valid_id: fn(&str) -> bool) -> Result<Vec<T>> {
        let dir = self.dir(kind);
        let mut records = Vec::new();
        let mut images = Vec::new();
        let mut record_ids = std::collections::BTreeSet::new();
        for entry in fs::read_dir(&dir).map_err(io_err(format!("reading {}", dir.display())))? {
            let entry = entry.map_err(io_err(format!("reading {}", dir.display())))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            if name.ends_with(atomic::TMP_SUFFIX) {
                // Never renamed into place: never acknowledged.
                tracing::info!(path = %path.display(), "removing leftover temporary file");
                fs::remove_file(&path).map_err(io_err(format!("removing {}", path.display())))?;
            } else if let Some(id) = name.strip_suffix(JSON) {
                make_private(&path)?;
                if !valid_id(id) {
                    return Err(corrupt(&path, "file name is not a valid id"));
                }
                let record: T = read_record(&path)?;
                if record.id() != id {
                    return Err(corrupt(&path, &format!("record id {:?} does not match file name", record.id())));
                }
                record_ids.insert(id.to_string());
                records.push(record);
            } else if let Some(id) = name.strip_suffix(IMG) {
                make_private(&path)?;
                images.push((id.to_string(), path));
            }
        }
        for (id, path) in images {
            if !record_ids.contains(&id) {
                tracing::warn!(path = %path.display(), "removing image without a record (unfinished create or delete)");
                fs::remove_file(&path).map_err(io_err(format!("removing {}", path.display())))?;
            }
        }
        if !records.is_empty() || !record_ids.is_empty() {
            atomic::sync_dir(&dir).map_err(io_err(format!("syncing {}", dir.display())))?;
        }
        Ok(records)
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn volume_image(&self, id: &str) -> PathBuf {
        self.dir(Kind::Volume).join(format!("{id}{IMG}"))
    }

    pub fn snapshot_image(&self, id: &str) -> PathBuf {
        self.dir(Kind::Snapshot).join(format!("{id}{IMG}"))
    }

    pub fn space(&self) -> Result<Space> {
        let st = statvfs(&self.root).map_err(|e| Error::io("statvfs", e.into()))?;
        let frsize = st.fragment_size() as u64;
        Ok(Space { available: st.blocks_available() as u64 * frsize, total: st.blocks() as u64 * frsize })
    }

    /// Fails with RESOURCE_EXHAUSTED unless `bytes` fit in the free space.
    pub fn check_space(&self, bytes: u64) -> Result<()> {
        let space = self.space()?;
        if bytes > space.available {
            return Err(Error::exhausted(format!(
                "{bytes} bytes requested, {} available in {}",
                space.available,
                self.root.display()
            )));
        }
        Ok(())
    }

    /// Creates `<id>.img` of `size` bytes, empty or copied from `source`
    /// (grown to `size`), fully durable before it appears under its name.
    fn create_image(&self, kind: Kind, id: &str, size: u64, source: Option<&Path>) -> Result<()> {
        let pending = self.begin_image(kind, id)?;
        if let Some(source) = source {
            let copied = File::open(source).and_then(|from| copy::copy_file(&from, pending.file()));
            let method = copied.map_err(io_err(format!("copying {}", source.display())))?;
            tracing::debug!(?method, from = %source.display(), "copied image");
        }
        pending.commit(size)
    }

    fn begin_image(&self, kind: Kind, id: &str) -> Result<PendingImage> {
        let dir = self.dir(kind);
        let name = format!("{id}{IMG}");
        let tmp_name = format!("{name}{}", atomic::TMP_SUFFIX);
        let file = atomic::create_private(&dir.join(&tmp_name), true)
            .map_err(io_err(format!("creating {}", dir.join(&name).display())))?;
        Ok(PendingImage { dir, tmp_name, name, file, committed: false })
    }

    /// An empty `volumes/<id>.img.tmp`, to fill and then commit.
    pub fn begin_volume_image(&self, id: &str) -> Result<PendingImage> {
        self.begin_image(Kind::Volume, id)
    }

    /// An empty `snapshots/<id>.img.tmp`, to fill and then commit.
    pub fn begin_snapshot_image(&self, id: &str) -> Result<PendingImage> {
        self.begin_image(Kind::Snapshot, id)
    }

    pub fn create_volume_image(&self, id: &str, size: u64, source: Option<&Path>) -> Result<()> {
        self.create_image(Kind::Volume, id, size, source)
    }

    /// A snapshot image copied from a file nothing writes to (the agent
    /// copies live volumes with `Agent::copy_at_instant`).
    #[cfg(test)]
    pub fn create_snapshot_image(&self, id: &str, source: &Path) -> Result<()> {
        self.create_image(Kind::Snapshot, id, 0, Some(source))
    }

    pub fn save_volume(&self, record: &VolumeRecord) -> Result<()> {
        self.save(Kind::Volume, &record.id, record)
    }

    pub fn save_snapshot(&self, record: &SnapshotRecord) -> Result<()> {
        self.save(Kind::Snapshot, &record.id, record)
    }

    /// Writes a record; on a full filesystem it draws on the reserve.
    fn save<T: serde::Serialize>(&self, kind: Kind, id: &str, record: &T) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| Error::internal(format!("encoding record: {e}")))?;
        let (dir, name) = (self.dir(kind), format!("{id}{JSON}"));
        let mut released = 0;
        loop {
            match atomic::write(&dir, &name, &bytes) {
                Err(e) if reserve::is_full(&e) && released < reserve::MAX_SLICES_PER_WRITE => {
                    match self.reserve.release() {
                        Ok(true) => released += 1,
                        Ok(false) => {
                            return Err(Error::io(format!("writing record {id} (metadata reserve used up)"), e));
                        }
                        Err(re) => {
                            tracing::warn!(error = %re, "releasing the metadata reserve failed");
                            return Err(Error::io(format!("writing record {id}"), e));
                        }
                    }
                }
                result => return result.map_err(io_err(format!("writing record {id}"))),
            }
        }
    }

    /// Removes record then image: once the record is gone the object is
    /// gone. The space freed refills the metadata reserve first.
    fn remove(&self, kind: Kind, id: &str) -> Result<()> {
        let dir = self.dir(kind);
        atomic::remove(&dir, &format!("{id}{JSON}")).map_err(io_err(format!("removing record {id}")))?;
        atomic::remove(&dir, &format!("{id}{IMG}")).map_err(io_err(format!("removing image {id}")))?;
        self.refill_reserve();
        Ok(())
    }

    pub fn remove_volume(&self, id: &str) -> Result<()> {
        self.remove(Kind::Volume, id)
    }

    pub fn remove_snapshot(&self, id: &str) -> Result<()> {
        self.remove(Kind::Snapshot, id)
    }

    /// Moves volume `id`'s image and record into `quarantine/<id>/`, where
    /// the store no longer loads them and nothing deletes them; returns
    /// that directory. The image moves first: a crash between the two
    /// renames leaves the record behind, which loads as a volume whose
    /// image is missing (reported, never deleted), while a record moved
    /// first would leave an image without a record, which loading removes.
    pub fn quarantine_volume(&self, id: &str) -> Result<PathBuf> {
        self.quarantine(Kind::Volume, id)
    }

    /// Moves snapshot `id`'s image and record aside, likewise (a crash
    /// between the renames leaves a record whose image is missing, which
    /// fails only restores from it).
    pub fn quarantine_snapshot(&self, id: &str) -> Result<PathBuf> {
        self.quarantine(Kind::Snapshot, id)
    }

    fn quarantine(&self, kind: Kind, id: &str) -> Result<PathBuf> {
        let aside = self.root.join(QUARANTINE);
        let target = aside.join(id);
        for dir in [&aside, &target] {
            atomic::create_private_dir(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        let dir = self.dir(kind);
        for name in [format!("{id}{IMG}"), format!("{id}{JSON}")] {
            match fs::rename(dir.join(&name), target.join(&name)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("moving {name} to {}", target.display()), e)),
            }
            for synced in [&target, &dir] {
                atomic::sync_dir(synced).map_err(io_err(format!("syncing {}", synced.display())))?;
            }
        }
        atomic::sync_dir(&aside).map_err(io_err(format!("syncing {}", aside.display())))?;
        Ok(target)
    }
}

/// An image being made under its temporary name: filled through
/// [`PendingImage::file`], then [`PendingImage::commit`]ted under its own
/// name. Dropped uncommitted, it removes itself; a crash leaves the
/// temporary file, which the next open removes. So an image that is not
/// complete never appears under its name, let alone with a record.
#[derive(Debug)]
pub struct PendingImage {
    dir: PathBuf,
    tmp_name: String,
    name: String,
    file: File,
    committed: bool,
}

impl PendingImage {
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Grows the image to `size` if it is smaller, makes it durable and
    /// renames it into place.
    pub fn commit(mut self, size: u64) -> Result<()> {
        let finish = || -> io::Result<()> {
            if self.file.metadata()?.len() < size {
                self.file.set_len(size)?;
            }
            self.file.sync_all()
        };
        finish().map_err(io_err(format!("creating {}", self.dir.join(&self.name).display())))?;
        atomic::commit(&self.dir, &self.tmp_name, &self.name).map_err(io_err(format!("committing {}", self.name)))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PendingImage {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(self.dir.join(&self.tmp_name));
        }
    }
}

trait HasId {
    fn id(&self) -> &str;
    fn format(&self) -> u32;
}

impl HasId for VolumeRecord {
    fn id(&self) -> &str {
        &self.id
    }
    fn format(&self) -> u32 {
        self.format
    }
}

impl HasId for SnapshotRecord {
    fn id(&self) -> &str {
        &self.id
    }
    fn format(&self) -> u32 {
        self.format
    }
}

/// Files made by an older version were 0644; a record holds a secret.
fn make_private(path: &Path) -> Result<()> {
    if atomic::restrict(path, atomic::FILE_MODE).map_err(io_err(format!("chmod {}", path.display())))? {
        tracing::info!(path = %path.display(), "made private (0600)");
    }
    Ok(())
}

fn corrupt(path: &Path, reason: &str) -> Error {
    Error::internal(format!(
        "corrupt record {}: {reason}; nothing was changed, fix or remove the record (and its .img) by hand",
        path.display()
    ))
}

fn read_record<T: serde::de::DeserializeOwned + HasId>(path: &Path) -> Result<T> {
    let len = fs::metadata(path).map_err(io_err(format!("reading {}", path.display())))?.len();
    if len > MAX_RECORD {
        return Err(corrupt(path, &format!("{len} bytes, more than a record can be")));
    }
    let bytes = fs::read(path).map_err(io_err(format!("reading {}", path.display())))?;
    let record: T = serde_json::from_slice(&bytes).map_err(|e| corrupt(path, &e.to_string()))?;
    if record.format() != FORMAT {
        return Err(corrupt(path, &format!("format {} is not {FORMAT}", record.format())));
    }
    Ok(record)
}

#[cfg(test)]
pub(crate) mod tests;
