//! Filesystems on attached devices: recognising a blank device, formatting,
//! growing, and usage statistics.

use std::io::Read;
use std::path::Path;
use std::process::Command;

use crate::error::{Context, Error, ErrorKind, Result};

/// What the start of a device holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Blank,
    Filesystem(&'static str),
    Unknown,
}

/// Recognises ext2/3/4 and xfs by their superblock magic; all zeroes in the
/// first 64 KiB is blank. Anything else is never formatted.
pub fn identify(head: &[u8]) -> Content {
    if head.len() >= 4 && &head[..4] == b"XFSB" {
        return Content::Filesystem("xfs");
    }
    if head.len() >= 1082 && head[1080] == 0x53 && head[1081] == 0xEF {
        return Content::Filesystem("ext4");
    }
    if head.iter().all(|&b| b == 0) { Content::Blank } else { Content::Unknown }
}

pub fn probe(device: &Path) -> Result<Content> {
    let mut head = vec![0u8; 64 * 1024];
    let mut f = std::fs::File::open(device).ctx(ErrorKind::Io, || format!("opening {}", device.display()))?;
    let n = f.read(&mut head).ctx(ErrorKind::Io, || format!("reading {}", device.display()))?;
    head.truncate(n);
    Ok(identify(&head))
}

fn run(cmd: &mut Command) -> Result<()> {
    let what = format!("{cmd:?}");
    let out = cmd.output().ctx(ErrorKind::Io, || format!("running {what}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Io,
        format!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
    ))
}

pub fn format(device: &Path, fstype: &str) -> Result<()> {
    match fstype {
        "ext4" | "ext3" | "ext2" => run(Command::new(format!("mkfs.{fstype}")).args(["-q", "-F"]).arg(device)),
        "xfs" => run(Command::new("mkfs.xfs").arg("-q").arg(device)),
        other => Err(Error::new(ErrorKind::InvalidArgument, format!("unsupported fsType {other:?}"))),
    }
}

/// Grows a mounted filesystem to its device's size.
pub fn grow(device: &Path, mount_path: &Path, fstype: &str) -> Result<()> {
    match fstype {
        "xfs" => run(Command::new("xfs_growfs").arg(mount_path)),
        _ => run(Command::new("resize2fs").arg(device)),
    }
}

/// (total, available, used) bytes and inodes of the filesystem at `path`.
pub fn usage(path: &Path) -> Result<([u64; 3], [u64; 3])> {
    let st = nix::sys::statvfs::statvfs(path).ctx(ErrorKind::Io, || format!("statvfs {}", path.display()))?;
    let frsize = st.fragment_size() as u64;
    let bytes = [st.blocks() as u64 * frsize, st.blocks_available() as u64 * frsize, {
        (st.blocks() as u64 - st.blocks_free() as u64) * frsize
    }];
    let inodes = [st.files() as u64, st.files_available() as u64, st.files() as u64 - st.files_free() as u64];
    Ok((bytes, inodes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifies_blank_ext4_xfs_and_other() {
        assert_eq!(identify(&[0; 65536]), Content::Blank);
        let mut ext = vec![0u8; 65536];
        ext[1080] = 0x53;
        ext[1081] = 0xEF;
        assert_eq!(identify(&ext), Content::Filesystem("ext4"));
        let mut xfs = vec![0u8; 65536];
        xfs[..4].copy_from_slice(b"XFSB");
        assert_eq!(identify(&xfs), Content::Filesystem("xfs"));
        let mut mbr = vec![0u8; 65536];
        mbr[510] = 0x55;
        assert_eq!(identify(&mbr), Content::Unknown);
    }

    #[test]
    fn formats_and_reports_usage_on_a_file() {
        // e2fsprogs is part of every Debian base system.
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("img");
        std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
        assert_eq!(probe(&img).unwrap(), Content::Blank);
        format(&img, "ext4").unwrap();
        assert_eq!(probe(&img).unwrap(), Content::Filesystem("ext4"));
        let (bytes, inodes) = usage(tmp.path()).unwrap();
        assert!(bytes[0] > 0 && inodes[0] > 0);
        assert!(format(&img, "btrfs").is_err());
    }
}
