//! Copy-before-write: a point-in-time copy of the backing file made while
//! writes go on.
//!
//! The file is cut into chunks, each with a "copied" bit and a lock. The
//! guard is installed while the write gate is paused (every acknowledged
//! write is already in the file, none is half done): that is the copy's
//! instant. From then on, a WRITE, TRIM or WRITE_ZEROES touching a chunk
//! not yet copied first copies that chunk's data into the target, under the
//! chunk's lock, and only then changes the file; a chunk already copied
//! costs one atomic load. A background pass ([`CopyBeforeWrite::copy_rest`])
//! copies the chunks nobody wrote, under the same locks, so a write and the
//! copier never copy one chunk twice or race on it. A chunk whose bit is
//! still clear has not changed since the instant, which is why copying it
//! at any later time is still a copy of the instant.
//!
//! Copies keep holes: only data extents (SEEK_DATA/SEEK_HOLE) are read, and
//! all-zero pieces are not written, into a target that starts as one hole.
//! A copy into the target that fails (a full disk) never fails the client's
//! write: the guard is marked failed, stops copying and the copy's owner
//! gets the error from [`CopyBeforeWrite::copy_rest`].

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};

/// The smallest chunk: a first write to a chunk copies this much before it
/// is applied, a millisecond or so from the page cache.
pub const MIN_CHUNK: u64 = 1 << 20;
/// At most this many chunks (bits and locks, 8 bytes each with the lock),
/// so a huge volume gets larger chunks instead of a huge map.
pub const MAX_CHUNKS: u64 = 1 << 16;
/// What one read of a copy holds in memory.
const COPY_BUFFER: usize = 1 << 20;
/// The background pass writes the target back after about this many bytes
/// of chunks: a copy of a large volume must not fill the page cache with
/// dirty pages, or the kernel throttles every writer of the filesystem,
/// the volume's clients included.
const WRITE_BACK_EVERY: u64 = 64 << 20;

/// A copy of a file at one instant, filled in while the file changes.
#[derive(Debug)]
pub struct CopyBeforeWrite {
    target: File,
    /// The source's size at the instant; writes beyond it (after a resize)
    /// change nothing the copy holds.
    size: u64,
    chunk: u64,
    copied: Vec<AtomicU64>,
    locks: Vec<Mutex<()>>,
    failed: AtomicBool,
    error: Mutex<Option<io::Error>>,
    by_writes: AtomicU64,
}

/// Chunk size for a file of `size` bytes: [`MIN_CHUNK`], or the power of
/// two that keeps the count within [`MAX_CHUNKS`].
pub fn chunk_size(size: u64) -> u64 {
    size.div_ceil(MAX_CHUNKS).next_power_of_two().max(MIN_CHUNK)
}

impl CopyBeforeWrite {
    /// A guard copying `size` bytes into `target`, which becomes a hole of
    /// that size (it must be empty).
    pub fn new(target: File, size: u64) -> io::Result<Self> {
        target.set_len(size)?;
        let chunk = chunk_size(size);
        let chunks = size.div_ceil(chunk);
        Ok(Self {
            target,
            size,
            chunk,
            copied: (0..chunks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            locks: (0..chunks).map(|_| Mutex::new(())).collect(),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
            by_writes: AtomicU64::new(0),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    pub fn chunks(&self) -> usize {
        self.locks.len()
    }

    /// Chunks a write had to copy before it could go on (the copier did
    /// the others).
    pub fn copied_by_writes(&self) -> u64 {
        self.by_writes.load(Ordering::Relaxed)
    }

    pub fn is_copied(&self, index: usize) -> bool {
        self.copied[index / 64].load(Ordering::Acquire) & (1 << (index % 64)) != 0
    }

    fn mark(&self, index: usize) {
        self.copied[index / 64].fetch_or(1 << (index % 64), Ordering::Release);
    }

    /// Every chunk is in the target (or the copy failed).
    pub fn is_complete(&self) -> bool {
        self.failed.load(Ordering::Acquire) || (0..self.chunks()).all(|i| self.is_copied(i))
    }

    /// Called before `len` bytes at `offset` of `source` change: copies the
    /// chunks they touch that are not copied yet. Never fails the write;
    /// a failure fails the copy.
    pub fn preserve(&self, source: &File, offset: u64, len: u64) {
        if len == 0 || offset >= self.size || self.failed.load(Ordering::Acquire) {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let (first, last) = ((offset / self.chunk) as usize, ((end - 1) / self.chunk) as usize);
        let mut buf = Vec::new();
        for index in first..=last {
            if self.is_copied(index) {
                continue;
            }
            match self.copy_chunk(source, index, &mut buf) {
                Ok(true) => {
                    self.by_writes.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => {}
                Err(e) => return self.fail(e),
            }
        }
    }

    /// Copies chunk `index` unless someone already did (true when this call
    /// copied it). The lock makes a write and the copier take turns.
    fn copy_chunk(&self, source: &File, index: usize, buf: &mut Vec<u8>) -> io::Result<bool> {
        let _held = self.locks[index].lock().unwrap_or_else(|p| p.into_inner());
        if self.is_copied(index) {
            return Ok(false);
        }
        let start = index as u64 * self.chunk;
        let end = (start + self.chunk).min(self.size);
        if buf.is_empty() {
            buf.resize(COPY_BUFFER, 0);
        }
        copy_sparse(source, &self.target, start, end, buf)?;
        self.mark(index);
        Ok(true)
    }

    fn fail(&self, error: io::Error) {
        tracing::warn!(%error, "copy-before-write failed; the copy is abandoned, writes go on");
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(error);
        self.failed.store(true, Ordering::Release);
    }

    /// The background pass: copies every chunk no write has copied, then
    /// makes the target durable. Returns the first failure, a writer's too.
    pub fn copy_rest(&self, source: &File) -> io::Result<()> {
        let mut buf = vec![0u8; COPY_BUFFER];
        let mut unsynced = 0;
        for index in 0..self.chunks() {
            if self.failed.load(Ordering::Acquire) {
                break;
            }
            if self.is_copied(index) {
                continue;
            }
            match self.copy_chunk(source, index, &mut buf) {
                Ok(_) => unsynced += self.chunk,
                Err(e) => self.fail(e),
            }
            if unsynced >= WRITE_BACK_EVERY {
                unsynced = 0;
                // Outside any chunk's lock: writes never wait for it.
                if let Err(e) = self.target.sync_data() {
                    self.fail(e);
                }
            }
        }
        if let Some(e) = self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        if self.failed.load(Ordering::Acquire) {
            return Err(io::Error::other("copy-before-write failed"));
        }
        self.target.sync_all()
    }
}

/// Copies bytes `start..end` of `from` into `to` at the same offsets,
/// reading only data extents and writing only pieces that are not all
/// zero: `to` (a hole there) stays as sparse as `from`, or sparser.
pub fn copy_sparse(from: &File, to: &File, start: u64, end: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut pos = start;
    while pos < end {
        let data = match lseek(from, pos as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(Errno::ENXIO) => return Ok(()),
            // No SEEK_DATA here: treat the rest as data.
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => pos,
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            return Ok(());
        }
        let hole = match lseek(from, data as i64, Whence::SeekHole) {
            Ok(h) => (h as u64).min(end),
            Err(Errno::ENXIO | Errno::EINVAL | Errno::EOPNOTSUPP) => end,
            Err(e) => return Err(e.into()),
        };
        let mut at = data;
        while at < hole {
            let n = ((hole - at) as usize).min(buf.len());
            let piece = &mut buf[..n];
            from.read_exact_at(piece, at)?;
            if piece.iter().any(|&b| b != 0) {
                to.write_all_at(piece, at)?;
            }
            at += n as u64;
        }
        pos = hole.max(data + 1);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
