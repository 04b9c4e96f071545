//! The metadata reserve: a preallocated file in the data directory that
//! keeps room for records when the volumes fill the disk.
//!
//! Volumes are thin, so a full data filesystem is an expected state. It must
//! not wedge detach: taking a node's access away (ControllerUnpublishVolume)
//! rewrites a record, and it has to succeed before the volume may be
//! deleted, the only thing that frees space.
//! A record write that fails for lack of space gives back one slice of the
//! reserve (the file is truncated by [`SLICE`]) and tries again; the reserve
//! grows back to [`SIZE`] when space allows (after a delete, and in the
//! agent's periodic pass).
//!
//! The reserve's blocks are allocated (fallocate), so writes into volumes
//! cannot take them. A volume writer can win a released slice before the
//! record does; that costs one more slice, and a write gives up after
//! [`MAX_SLICES_PER_WRITE`]. Where the filesystem has no fallocate the
//! reserve is written with zeros (a compressing filesystem may then not
//! hold the space).

use std::fs::{File, Permissions};
use std::io::{self, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Mutex;

use nix::errno::Errno;

use super::atomic;

/// The reserve's file name in the data directory.
pub const NAME: &str = "reserve";
/// Full size: room for many records (a record is a few KiB at most).
pub const SIZE: u64 = 1 << 20;
/// What one record write that hit a full disk may release.
pub const SLICE: u64 = 64 << 10;
/// Slices one record write may release before it fails after all.
pub const MAX_SLICES_PER_WRITE: u32 = 4;

#[derive(Debug)]
pub struct Reserve {
    path: PathBuf,
    /// Releases and refills from concurrent record writes, one at a time.
    lock: Mutex<()>,
}

/// ENOSPC, or the quota the reserve counts against too.
pub fn is_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error().map(Errno::from_raw), Some(Errno::ENOSPC | Errno::EDQUOT))
}

impl Reserve {
    pub fn new(path: PathBuf) -> Self {
        Self { path, lock: Mutex::new(()) }
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes the reserve holds now (0 when it is missing).
    pub fn len(&self) -> io::Result<u64> {
        match std::fs::metadata(&self.path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Frees one slice; false when the reserve is used up.
    pub fn release(&self) -> io::Result<bool> {
        let _guard = self.guard();
        let len = self.len()?;
        if len == 0 {
            return Ok(false);
        }
        let file = File::options().write(true).open(&self.path)?;
        file.set_len(len.saturating_sub(SLICE))?;
        tracing::warn!(
            path = %self.path.display(),
            left = len.saturating_sub(SLICE),
            "data filesystem full: released part of the metadata reserve for a record write"
        );
        Ok(true)
    }

    /// Grows the reserve back to [`SIZE`]; fails (ENOSPC) while there is no
    /// room, leaving it as it was or partly grown (filesystems differ).
    pub fn refill(&self) -> io::Result<()> {
        let _guard = self.guard();
        let len = self.len()?;
        if len >= SIZE {
            return Ok(());
        }
        let mut file =
            File::options().write(true).create(true).truncate(false).mode(atomic::FILE_MODE).open(&self.path)?;
        file.set_permissions(Permissions::from_mode(atomic::FILE_MODE))?;
        match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, SIZE) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
                let zeros = vec![0u8; (SIZE - len) as usize];
                file.seek(io::SeekFrom::Start(len))?;
                file.write_all(&zeros)?;
            }
            Err(e) => return Err(e.into()),
        }
        file.sync_all()?;
        if len == 0 {
            tracing::info!(path = %self.path.display(), size = SIZE, "metadata reserve in place");
        }
        Ok(())
    }
}
