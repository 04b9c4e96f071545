//! Copying a backing file for clones and snapshots: a reflink (FICLONE)
//! where the filesystem shares extents, otherwise a copy that walks the
//! data extents with SEEK_DATA/SEEK_HOLE and leaves holes as holes.

use std::fs::File;
use std::io;

use nbd::server::cow::copy_sparse;

/// What one read of a copy holds in memory.
const BUFFER: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Reflink,
    SparseCopy,
}

/// Copies all of `from` into the empty file `to`.
pub fn copy_file(from: &File, to: &File) -> io::Result<Method> {
    if reflink(from, to)? {
        return Ok(Method::Reflink);
    }
    sparse_copy(from, to)?;
    Ok(Method::SparseCopy)
}

/// Makes `to` share all of `from`'s extents (FICLONE), at once and
/// atomically: true when done, false where the filesystem cannot.
pub fn reflink(from: &File, to: &File) -> io::Result<bool> {
    match rustix::fs::ioctl_ficlone(to, from) {
        Ok(()) => Ok(true),
        // Not supported here (ext4, tmpfs, across filesystems).
        Err(e)
            if [
                rustix::io::Errno::OPNOTSUPP,
                rustix::io::Errno::XDEV,
                rustix::io::Errno::INVAL,
                rustix::io::Errno::NOTTY,
                rustix::io::Errno::NOSYS,
                rustix::io::Errno::PERM,
            ]
            .contains(&e) =>
        {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// The copy fallback: only data extents are read, and all-zero pieces
/// inside them are skipped, so the copy is never less sparse than the source.
pub fn sparse_copy(from: &File, to: &File) -> io::Result<()> {
    let len = from.metadata()?.len();
    to.set_len(len)?;
    copy_sparse(from, to, 0, len, &mut vec![0u8; BUFFER])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    #[test]
    fn sparse_copy_keeps_content_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        let src = File::options().read(true).write(true).create(true).truncate(true).open(&src_path).unwrap();
        src.set_len(64 << 20).unwrap();
        src.write_all_at(b"hello", 4096).unwrap();
        src.write_all_at(&[7u8; 8192], 40 << 20).unwrap();
        let dst =
            File::options().read(true).write(true).create(true).truncate(true).open(dir.path().join("dst")).unwrap();
        sparse_copy(&src, &dst).unwrap();
        assert_eq!(dst.metadata().unwrap().len(), 64 << 20);
        let mut got = [0u8; 5];
        dst.read_exact_at(&mut got, 4096).unwrap();
        assert_eq!(&got, b"hello");
        let mut got = vec![0u8; 8192];
        dst.read_exact_at(&mut got, 40 << 20).unwrap();
        assert!(got.iter().all(|&b| b == 7));
        // 64 MiB logical, a few KiB of data: the copy must stay sparse.
        assert!(dst.metadata().unwrap().blocks() * 512 < 4 << 20, "copy is not sparse");
    }

    #[test]
    fn copy_file_uses_reflink_or_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let src =
            File::options().read(true).write(true).create(true).truncate(true).open(dir.path().join("a")).unwrap();
        src.write_all_at(b"data", 0).unwrap();
        src.set_len(1 << 20).unwrap();
        let dst =
            File::options().read(true).write(true).create(true).truncate(true).open(dir.path().join("b")).unwrap();
        copy_file(&src, &dst).unwrap();
        let mut got = [0u8; 4];
        dst.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(&got, b"data");
        assert_eq!(dst.metadata().unwrap().len(), 1 << 20);
    }
}
