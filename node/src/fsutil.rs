//! Filesystems on attached devices: recognising a blank device, formatting,
//! growing, and usage statistics. The tools (mkfs, resize2fs, xfs_growfs)
//! run as async child processes and reading a device happens on the
//! blocking pool: a slow device or tool never holds a runtime worker.

use std::io::Read;
use std::path::Path;

use tokio::process::Command;

use crate::blocking::blocking;
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

/// What the first 64 KiB of `device` hold.
pub async fn probe(device: &Path) -> Result<Content> {
    let device = device.to_owned();
    blocking(move || {
        let mut head = vec![0u8; 64 * 1024];
        let mut f = std::fs::File::open(&device).ctx(ErrorKind::Io, || format!("opening {}", device.display()))?;
        let n = f.read(&mut head).ctx(ErrorKind::Io, || format!("reading {}", device.display()))?;
        head.truncate(n);
        Ok(identify(&head))
    })
    .await
}

/// Runs `tool` with `args`, its output captured; a failure names the tool,
/// its arguments, its exit status and what it wrote on stderr.
async fn run(tool: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
    let what = || format!("{tool} {}", args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "));
    let out = Command::new(tool)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .ctx(ErrorKind::Io, || format!("running {}", what()))?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Io,
        format!("{} failed ({}): {}", what(), out.status, String::from_utf8_lossy(&out.stderr).trim()),
    ))
}

pub async fn format(device: &Path, fstype: &str) -> Result<()> {
    let dev = device.as_os_str();
    match fstype {
        "ext4" | "ext3" | "ext2" => run(&format!("mkfs.{fstype}"), &["-q".as_ref(), "-F".as_ref(), dev]).await,
        "xfs" => run("mkfs.xfs", &["-q".as_ref(), dev]).await,
        other => Err(Error::new(ErrorKind::InvalidArgument, format!("unsupported fsType {other:?}"))),
    }
}

/// Grows a mounted filesystem to its device's size.
pub async fn grow(device: &Path, mount_path: &Path, fstype: &str) -> Result<()> {
    match fstype {
        "xfs" => run("xfs_growfs", &[mount_path.as_os_str()]).await,
        _ => run("resize2fs", &[device.as_os_str()]).await,
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

    #[tokio::test]
    async fn formats_and_reports_usage_on_a_file() {
        // e2fsprogs is part of every Debian base system.
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("img");
        std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
        assert_eq!(probe(&img).await.unwrap(), Content::Blank);
        format(&img, "ext4").await.unwrap();
        assert_eq!(probe(&img).await.unwrap(), Content::Filesystem("ext4"));
        let (bytes, inodes) = usage(tmp.path()).unwrap();
        assert!(bytes[0] > 0 && inodes[0] > 0);
        assert!(format(&img, "btrfs").await.is_err());
    }

    /// A tool that fails is named with its arguments, exit status and stderr.
    #[tokio::test]
    async fn a_failing_tool_is_named_with_its_status_and_stderr() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("no-such-device");
        let err = format(&missing, "ext4").await.unwrap_err().chain();
        assert!(err.starts_with(&format!("mkfs.ext4 -q -F {} failed (exit status: 1)", missing.display())), "{err}");
        assert!(err.contains("does not exist"), "mkfs's stderr: {err}");
        let err = run("no-such-tool-nbd-csi", &[]).await.unwrap_err().chain();
        assert!(err.contains("running no-such-tool-nbd-csi"), "{err}");
    }
}
