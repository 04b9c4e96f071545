//! Copy-before-write: a point-in-time copy of the backing file made while
//! writes go on.
//!
//! The file is cut into chunks of 64 KiB (larger past 256 GiB), each with a
//! "claimed" bit. The guard is installed while the write gate is paused
//! (every acknowledged write is already in the file, none is half done):
//! that is the copy's instant. From then on, a WRITE, TRIM or WRITE_ZEROES
//! touching a chunk not claimed yet first copies that chunk into the
//! target, and only then changes the file: a 4 KiB write copies the 64 KiB
//! around it, never more than the chunks it touches. A chunk already
//! claimed costs one atomic load. A background pass
//! ([`CopyBeforeWrite::copy_rest`]) copies the chunks nobody wrote, 1 MiB
//! at a time.
//!
//! No lock is held across I/O, so a write never waits for the pass (nor
//! for another write): whoever copies reads the source first and claims
//! the chunks afterwards (an atomic fetch_or), and only the one whose claim
//! set a chunk's bit writes what it read into the target. The file changes
//! in a chunk only after the chunk is claimed, and every claim comes after
//! its claimer's read: a read followed by a successful claim holds the
//! data of the instant, and a reader that lost the race drops what it
//! read. A chunk whose bit is still clear has not changed since the
//! instant, which is why copying it at any later time is still a copy of
//! the instant. Writes hold `copying` (a lock) shared between
//! their read and their write into the target; the pass takes it once, at
//! its end, to wait for the last of them before the target is made
//! durable.
//!
//! Copies keep holes: only data extents (SEEK_DATA/SEEK_HOLE) are read, and
//! all-zero pieces are not written, into a target that starts as one hole.
//! A copy into the target that fails (a full disk) never fails the client's
//! write: the guard is marked failed, stops copying and the copy's owner
//! gets the error from [`CopyBeforeWrite::copy_rest`].

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};

/// The smallest chunk, what a small write copies before it is applied:
/// tens of microseconds from the page cache, where a 1 MiB chunk cost a
/// millisecond and more under write-back, which a queue of writes on one
/// connection paid once each.
pub const MIN_CHUNK: u64 = 64 << 10;
/// At most this many chunks (one bit each: 512 KiB of map), so a huge
/// volume gets larger chunks instead of a huge map.
pub const MAX_CHUNKS: u64 = 1 << 22;
/// What one read of a copy holds in memory: the pass reads this much at a
/// time (or one chunk, if larger).
const COPY_BUFFER: usize = 1 << 20;
/// The background pass writes the target back after about this many bytes
/// of chunks: a copy of a large volume must not fill the page cache with
/// dirty pages, or the kernel throttles every writer of the filesystem,
/// the volume's clients included. Small, because a write whose chunk is
/// not in the page cache reads it from the disk, behind whatever the pass
/// has queued there: 64 MiB at a time made such a read wait 150 ms.
const WRITE_BACK_EVERY: u64 = 8 << 20;

/// A copy of a file at one instant, filled in while the file changes.
#[derive(Debug)]
pub struct CopyBeforeWrite {
    target: File,
    /// The source's size at the instant; writes beyond it (after a resize)
    /// change nothing the copy holds.
    size: u64,
    chunk: u64,
    chunks: u64,
    /// One bit per chunk: someone read its data of the instant and writes
    /// it into the target (or has written it).
    claimed: Vec<AtomicU64>,
    /// Held shared by a write from its read of the source until its write
    /// into the target, exclusively by the pass once every chunk is claimed.
    copying: RwLock<()>,
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
            chunks,
            claimed: (0..chunks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            copying: RwLock::new(()),
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
        self.chunks as usize
    }

    /// Chunks a write had to copy before it could go on (the pass did
    /// the others).
    pub fn copied_by_writes(&self) -> u64 {
        self.by_writes.load(Ordering::Relaxed)
    }

    /// Chunk `index` is claimed: its data of the instant is in the target,
    /// or on its way there (it is, once [`Self::copy_rest`] returns).
    pub fn is_copied(&self, index: usize) -> bool {
        self.claimed[index / 64].load(Ordering::Acquire) & (1 << (index % 64)) != 0
    }

    /// True when this call set chunk `index`'s bit: the data its caller
    /// read before is the instant's, and the caller must write it.
    fn claim(&self, index: u64) -> bool {
        let bit = 1 << (index % 64);
        self.claimed[(index / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// Every chunk is claimed (or the copy failed).
    pub fn is_complete(&self) -> bool {
        self.failed.load(Ordering::Acquire) || (0..self.chunks()).all(|i| self.is_copied(i))
    }

    /// Called before `len` bytes at `offset` of `source` change: copies the
    /// chunks they touch that are not claimed yet. Never fails the write;
    /// a failure fails the copy.
    pub fn preserve(&self, source: &File, offset: u64, len: u64) {
        if len == 0 || offset >= self.size || self.failed.load(Ordering::Acquire) {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let (first, last) = (offset / self.chunk, (end - 1) / self.chunk);
        if (first..=last).all(|i| self.is_copied(i as usize)) {
            return;
        }
        let _copying = self.copying.read().unwrap_or_else(|p| p.into_inner());
        let mut buf = Vec::new();
        match self.copy_chunks(source, first, last + 1, &mut buf) {
            Ok(copied) => {
                self.by_writes.fetch_add(copied, Ordering::Relaxed);
            }
            Err(e) => self.fail(e),
        }
    }

    /// Copies the chunks of `first..end` nobody claimed yet, a buffer's
    /// worth at a time: read, then claim, then write what was claimed.
    /// Returns how many chunks this call copied.
    fn copy_chunks(&self, source: &File, first: u64, end: u64, buf: &mut Vec<u8>) -> io::Result<u64> {
        let per_read = (COPY_BUFFER as u64 / self.chunk).max(1);
        let mut copied = 0;
        let mut index = first;
        while index < end {
            if self.is_copied(index as usize) {
                index += 1;
                continue;
            }
            let mut run_end = index + 1;
            while run_end < end && run_end - index < per_read && !self.is_copied(run_end as usize) {
                run_end += 1;
            }
            let start = index * self.chunk;
            let len = ((run_end * self.chunk).min(self.size) - start) as usize;
            if buf.len() < len {
                buf.resize(len, 0);
            }
            read_with_holes(source, start, &mut buf[..len])?;
            copied += self.claim_and_write(index, run_end, &buf[..len])?;
            index = run_end;
        }
        Ok(copied)
    }

    /// Claims chunks `first..end`, whose data `data` was read before this
    /// call, and writes into the target those this call claimed (one write
    /// per run of them), leaving all-zero chunks as holes. Returns how many
    /// it claimed.
    fn claim_and_write(&self, first: u64, end: u64, data: &[u8]) -> io::Result<u64> {
        let bytes = |from: u64, to: u64| {
            let (at, until) = ((from - first) * self.chunk, (to - first) * self.chunk);
            &data[at as usize..(until as usize).min(data.len())]
        };
        let mut claimed = 0;
        let mut run = None;
        for index in first..=end {
            let write = if index < end && self.claim(index) {
                claimed += 1;
                bytes(index, index + 1).iter().any(|&b| b != 0)
            } else {
                false
            };
            match (write, run) {
                (true, None) => run = Some(index),
                (false, Some(from)) => {
                    self.target.write_all_at(bytes(from, index), from * self.chunk)?;
                    run = None;
                }
                _ => {}
            }
        }
        Ok(claimed)
    }

    fn fail(&self, error: io::Error) {
        tracing::warn!(%error, "copy-before-write failed; the copy is abandoned, writes go on");
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(error);
        self.failed.store(true, Ordering::Release);
    }

    /// The background pass: copies every chunk no write has claimed, waits
    /// for the writes still copying, then makes the target durable.
    /// Returns the first failure, a writer's too.
    pub fn copy_rest(&self, source: &File) -> io::Result<()> {
        let mut buf = vec![0u8; COPY_BUFFER.max(self.chunk as usize)];
        let per_read = (buf.len() as u64 / self.chunk).max(1);
        let mut unsynced = 0;
        let mut index = 0;
        while index < self.chunks && !self.failed.load(Ordering::Acquire) {
            let end = (index + per_read).min(self.chunks);
            match self.copy_chunks(source, index, end, &mut buf) {
                Ok(copied) => unsynced += copied * self.chunk,
                Err(e) => self.fail(e),
            }
            index = end;
            if unsynced >= WRITE_BACK_EVERY {
                unsynced = 0;
                if let Err(e) = self.target.sync_data() {
                    self.fail(e);
                }
            }
        }
        // Every chunk is claimed (or the copy failed): what is left are
        // writes that claimed one and are still writing it into the target.
        drop(self.copying.write().unwrap_or_else(|p| p.into_inner()));
        if let Some(e) = self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        if self.failed.load(Ordering::Acquire) {
            return Err(io::Error::other("copy-before-write failed"));
        }
        self.target.sync_all()
    }
}

/// Fills `buf` with `from`'s bytes at `start`, reading only data extents
/// (SEEK_DATA/SEEK_HOLE): holes read as zeros without touching the disk.
fn read_with_holes(from: &File, start: u64, buf: &mut [u8]) -> io::Result<()> {
    let end = start + buf.len() as u64;
    let mut pos = start;
    while pos < end {
        let data = match lseek(from, pos as i64, Whence::SeekData) {
            Ok(d) => (d as u64).min(end),
            Err(Errno::ENXIO) => end,
            // No SEEK_DATA here: treat the rest as data.
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => pos,
            Err(e) => return Err(e.into()),
        };
        buf[(pos - start) as usize..(data - start) as usize].fill(0);
        if data >= end {
            break;
        }
        let hole = match lseek(from, data as i64, Whence::SeekHole) {
            Ok(h) => (h as u64).min(end),
            Err(Errno::ENXIO | Errno::EINVAL | Errno::EOPNOTSUPP) => end,
            Err(e) => return Err(e.into()),
        };
        let hole = hole.max(data + 1).min(end);
        from.read_exact_at(&mut buf[(data - start) as usize..(hole - start) as usize], data)?;
        pos = hole;
    }
    Ok(())
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
