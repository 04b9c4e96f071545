//! The backing file: positioned I/O, hole punching, zeroing and extent
//! queries, all through safe std and nix calls on one shared descriptor.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, PosixFadviseAdvice, fallocate, posix_fadvise};
use nix::unistd::{Whence, lseek};

use crate::consts::base_allocation::{STATE_HOLE, STATE_ZERO};
use crate::consts::errno;
use crate::wire::Extent;

/// Zeroes written when the filesystem can neither punch nor zero a range.
static ZEROES: [u8; 1 << 20] = [0; 1 << 20];

/// Descriptor count cap for one BLOCK_STATUS reply; the spec only asks for
/// at least one, and a bounded reply keeps a fragmented file from
/// producing megabytes of descriptors.
const MAX_EXTENTS: usize = 1024;

#[derive(Debug)]
pub struct Backend {
    file: File,
    size: AtomicU64,
}

/// An NBD error value (the spec's errno) for a failed backend call.
pub fn nbd_errno(e: &io::Error) -> u32 {
    match e.raw_os_error().map(Errno::from_raw) {
        Some(Errno::ENOSPC | Errno::EDQUOT | Errno::EFBIG) => errno::ENOSPC,
        Some(Errno::EPERM | Errno::EACCES | Errno::EROFS) => errno::EPERM,
        Some(Errno::ENOMEM) => errno::ENOMEM,
        Some(Errno::EOPNOTSUPP) => errno::ENOTSUP,
        Some(Errno::EINVAL) => errno::EINVAL,
        _ => errno::EIO,
    }
}

fn is_unsupported(e: &Errno) -> bool {
    matches!(e, Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL)
}

impl Backend {
    pub fn new(file: File) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(Self { file, size: AtomicU64::new(size) })
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The descriptor, for sendfile(2).
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn resize(&self, size: u64) -> io::Result<()> {
        self.file.set_len(size)?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    pub fn write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// fdatasync: every write completed before this call is on stable storage.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    pub fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(&self.file, mode, offset as i64, len as i64) {
            Ok(()) => Ok(()),
            // TRIM is advisory: a filesystem that cannot punch holes just
            // keeps the data.
            Err(e) if is_unsupported(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Zeroes a range. `may_punch`: a hole is acceptable (no NO_HOLE flag).
    /// `fast_only`: fail with ENOTSUP rather than fall back to writing zeroes.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_punch: bool, fast_only: bool) -> io::Result<()> {
        let keep = FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let mut attempts = Vec::with_capacity(2);
        if may_punch {
            attempts.push(FallocateFlags::FALLOC_FL_PUNCH_HOLE | keep);
        }
        attempts.push(FallocateFlags::FALLOC_FL_ZERO_RANGE | keep);
        for mode in attempts {
            match fallocate(&self.file, mode, offset as i64, len as i64) {
                Ok(()) => return Ok(()),
                Err(e) if is_unsupported(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        if fast_only {
            return Err(io::Error::from_raw_os_error(Errno::EOPNOTSUPP as i32));
        }
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(ZEROES.len() as u64) as usize;
            self.write(&ZEROES[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Readahead hint for NBD_CMD_CACHE.
    pub fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        posix_fadvise(&self.file, offset as i64, len as i64, PosixFadviseAdvice::POSIX_FADV_WILLNEED)
            .map_err(io::Error::from)
    }

    /// `base:allocation` extents from `offset` for up to `len` bytes, found
    /// with SEEK_DATA/SEEK_HOLE. With `one`, only the first extent.
    pub fn extents(&self, offset: u64, len: u32, one: bool, out: &mut Vec<Extent>) -> io::Result<()> {
        let size = self.size();
        let end = (offset + u64::from(len)).min(size);
        let mut pos = offset;
        while pos < end && out.len() < MAX_EXTENTS {
            let data = match lseek(&self.file, pos as i64, Whence::SeekData) {
                Ok(d) => (d as u64).min(end),
                Err(Errno::ENXIO) => end,
                Err(e) if is_unsupported(&e) => {
                    out.push(Extent { length: (end - pos) as u32, flags: 0 });
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            let (next, flags) = if data > pos {
                (data, STATE_HOLE | STATE_ZERO)
            } else {
                let hole = match lseek(&self.file, pos as i64, Whence::SeekHole) {
                    Ok(h) => (h as u64).min(end),
                    Err(Errno::ENXIO) => end,
                    Err(e) => return Err(e.into()),
                };
                (hole.max(pos + 1), 0)
            };
            out.push(Extent { length: (next - pos) as u32, flags });
            pos = next;
            if one {
                break;
            }
        }
        Ok(())
    }
}
