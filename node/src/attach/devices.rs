//! What sysfs says about NBD devices. Ownership is decided by
//! `/sys/block/nbdX/backend` (the BACKEND_IDENTIFIER given at CONNECT),
//! never by the `pid` file, which holds a kernel thread id.

use std::path::{Path, PathBuf};

use crate::sys::mount::MountEntry;

/// Where block devices are listed; a temporary tree in tests.
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Self { root: PathBuf::from("/sys/block") }
    }
}

pub fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

/// The index in "nbd12" or "/dev/nbd12".
pub fn parse_index(name: &str) -> Option<u32> {
    let name = name.rsplit('/').next()?;
    let digits = name.strip_prefix("nbd")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Mount targets that use device `index`: a filesystem on it, or a bind of
/// the device node (devtmpfs shows the device's name as the root).
pub fn mounts_using(mounts: &[MountEntry], index: u32) -> Vec<PathBuf> {
    let dev = device_path(index);
    let name = format!("/nbd{index}");
    mounts
        .iter()
        .filter(|m| Path::new(&m.source) == dev || (m.fstype == "devtmpfs" && m.root == name))
        .map(|m| m.target.clone())
        .collect()
}

/// Whether a backend identifier has the shape of a volume id made by the
/// nbd-csi controller (`vol-` and 32 lowercase hex digits): such a device
/// belongs to this driver even when no staging state names it.
pub fn is_driver_volume_id(backend: &str) -> bool {
    backend
        .strip_prefix("vol-")
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

impl Sysfs {
    #[cfg(test)]
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn dir(&self, index: u32) -> PathBuf {
        self.root.join(format!("nbd{index}"))
    }

    fn read(&self, index: u32, file: &str) -> Option<String> {
        std::fs::read_to_string(self.dir(index).join(file)).ok().map(|s| s.trim_end_matches('\n').to_owned())
    }

    /// Indexes of every NBD device, sorted.
    pub fn devices(&self) -> Vec<u32> {
        let mut out: Vec<u32> = std::fs::read_dir(&self.root)
            .map(|rd| rd.filter_map(|e| parse_index(&e.ok()?.file_name().to_string_lossy())).collect())
            .unwrap_or_default();
        out.sort_unstable();
        out
    }

    /// The backend identifier of a configured, netlink-made device.
    pub fn backend(&self, index: u32) -> Option<String> {
        self.read(index, "backend").filter(|s| !s.is_empty())
    }

    /// Every (index, backend) pair.
    pub fn backends(&self) -> Vec<(u32, String)> {
        self.devices().into_iter().filter_map(|i| Some((i, self.backend(i)?))).collect()
    }

    /// Size in bytes (sysfs counts 512-byte sectors).
    pub fn size_bytes(&self, index: u32) -> Option<u64> {
        self.read(index, "size")?.parse::<u64>().ok().map(|s| s * 512)
    }

    /// Number of blk-mq hardware queues: one per socket.
    pub fn hw_queues(&self, index: u32) -> usize {
        std::fs::read_dir(self.dir(index).join("mq")).map(|rd| rd.count()).unwrap_or(0)
    }

    /// The kernel's I/O counters of the device (a blocking sysfs read).
    pub fn io_stat(&self, index: u32) -> std::io::Result<crate::io_stat::IoStat> {
        crate::io_stat::read(&self.dir(index).join("stat"))
    }

    /// A device nobody configured: size 0, no backend, no owning task.
    pub fn is_free(&self, index: u32) -> bool {
        self.size_bytes(index) == Some(0) && self.backend(index).is_none() && !self.dir(index).join("pid").exists()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn fake(root: &Path, index: u32, backend: Option<&str>, sectors: u64, queues: usize) {
        let dir = root.join(format!("nbd{index}"));
        std::fs::create_dir_all(dir.join("mq")).unwrap();
        std::fs::write(dir.join("size"), format!("{sectors}\n")).unwrap();
        if let Some(b) = backend {
            std::fs::write(dir.join("backend"), format!("{b}\n")).unwrap();
            // A pid file exists too, with a kernel thread id: it must not matter.
            std::fs::write(dir.join("pid"), "4242\n").unwrap();
        }
        for q in 0..queues {
            std::fs::create_dir_all(dir.join("mq").join(q.to_string())).unwrap();
        }
    }

    #[test]
    fn finds_devices_by_backend_only() {
        let tmp = tempfile::tempdir().unwrap();
        fake(tmp.path(), 0, None, 0, 0);
        fake(tmp.path(), 3, Some("vol-a"), 131072, 4);
        fake(tmp.path(), 12, Some("vol-ab"), 8, 1);
        std::fs::create_dir_all(tmp.path().join("loop0")).unwrap();
        let s = Sysfs::at(tmp.path());
        assert_eq!(s.devices(), [0, 3, 12]);
        assert_eq!(s.backends(), [(3, "vol-a".to_owned()), (12, "vol-ab".to_owned())]);
        assert_eq!(s.size_bytes(3), Some(64 << 20));
        assert_eq!(s.hw_queues(3), 4);
        std::fs::write(tmp.path().join("nbd3/stat"), "4 0 64 1 2 0 16 3 1 5 6\n").unwrap();
        assert_eq!(s.io_stat(3).unwrap().read_bytes(), 64 * 512);
        assert!(s.io_stat(0).is_err(), "no stat file");
        assert!(s.is_free(0));
        assert!(!s.is_free(3));
    }

    #[test]
    fn finds_mounts_of_the_device_and_binds_of_its_node() {
        let mounts = crate::sys::mount::parse_mountinfo(
            "40 22 43:0 / /staging/a rw - ext4 /dev/nbd0 rw\n\
             41 22 43:0 / /pods/a rw - ext4 /dev/nbd0 rw\n\
             42 22 43:16 / /staging/b rw - ext4 /dev/nbd10 rw\n\
             43 22 0:5 /nbd1 /pods/b rw - devtmpfs udev rw\n\
             44 22 0:5 /nbd10 /pods/c rw - devtmpfs udev rw\n",
        );
        assert_eq!(mounts_using(&mounts, 0), [Path::new("/staging/a"), Path::new("/pods/a")]);
        assert_eq!(mounts_using(&mounts, 1), [Path::new("/pods/b")]);
        assert_eq!(mounts_using(&mounts, 10), [Path::new("/staging/b"), Path::new("/pods/c")]);
        assert!(mounts_using(&mounts, 2).is_empty());
    }

    #[test]
    fn recognises_the_controllers_volume_ids_only() {
        assert!(is_driver_volume_id("vol-0123456789abcdef0123456789abcdef"));
        for other in [
            "vol-mc",
            "vol-0123456789ABCDEF0123456789abcdef",
            "vol-0123456789abcdef0123456789abcdef0",
            "snap-0123456789abcdef0123456789abcdef",
            "pvc-0123456789abcdef0123456789abcdef",
            "",
        ] {
            assert!(!is_driver_volume_id(other), "{other}");
        }
    }

    #[test]
    fn parses_indexes() {
        assert_eq!(parse_index("nbd0"), Some(0));
        assert_eq!(parse_index("/dev/nbd15"), Some(15));
        assert_eq!(parse_index("nbd1p1"), None);
        assert_eq!(parse_index("nbd"), None);
        assert_eq!(parse_index("loop1"), None);
        assert_eq!(device_path(7), Path::new("/dev/nbd7"));
    }
}
