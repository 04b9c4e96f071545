//! mount(2)/umount(2) and /proc/self/mountinfo.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

use crate::error::{Context, Error, ErrorKind, Result};

/// Splits mount options into mount(2) flags and filesystem data.
pub fn split_options(options: &[String]) -> (MsFlags, Vec<String>) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for opt in options.iter().flat_map(|o| o.split(',')).filter(|o| !o.is_empty()) {
        match opt {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" | "defaults" => {}
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "dirsync" => flags |= MsFlags::MS_DIRSYNC,
            other => data.push(other.to_owned()),
        }
    }
    (flags, data)
}

/// Mounts a filesystem with CSI mount flags (e.g. "noatime", "discard").
pub fn mount_fs(source: &Path, target: &Path, fstype: &str, read_only: bool, options: &[String]) -> Result<()> {
    let (mut flags, data) = split_options(options);
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    let data = data.join(",");
    let data = (!data.is_empty()).then_some(data.as_str());
    nix::mount::mount(Some(source), target, Some(fstype), flags, data)
        .ctx(ErrorKind::Kernel, || format!("mounting {} ({fstype}) on {}", source.display(), target.display()))
}

/// Bind-mounts `source` on `target`, read-only when asked (a bind mount
/// ignores MS_RDONLY, so that takes a remount).
pub fn bind(source: &Path, target: &Path, read_only: bool) -> Result<()> {
    let what = || format!("bind-mounting {} on {}", source.display(), target.display());
    nix::mount::mount(Some(source), target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .ctx(ErrorKind::Kernel, what)?;
    if read_only {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = nix::mount::mount(None::<&str>, target, None::<&str>, flags, None::<&str>) {
            let _ = nix::mount::umount(target);
            return Err(Error::with_source(ErrorKind::Kernel, format!("{} read-only", what()), e));
        }
    }
    Ok(())
}

/// Unmounts; EBUSY becomes a Busy error (never a lazy unmount).
pub fn unmount(target: &Path) -> Result<()> {
    nix::mount::umount2(target, MntFlags::empty()).map_err(|e| {
        let kind = if e == nix::errno::Errno::EBUSY { ErrorKind::Busy } else { ErrorKind::Kernel };
        Error::with_source(kind, format!("unmounting {}", target.display()), e)
    })
}

/// One line of /proc/self/mountinfo: what is mounted where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The source's root inside its filesystem ("/" for a whole device).
    pub root: String,
    pub target: PathBuf,
    pub fstype: String,
    pub source: String,
    pub read_only: bool,
}

fn unescape(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 6 || r.len() < 2 {
                return None;
            }
            Some(MountEntry {
                root: unescape(l[3]),
                target: PathBuf::from(unescape(l[4])),
                read_only: l[5].split(',').any(|o| o == "ro"),
                fstype: r[0].to_owned(),
                source: unescape(r[1]),
            })
        })
        .collect()
}

pub fn mounts() -> Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ctx(ErrorKind::Io, || "reading mountinfo")?;
    Ok(parse_mountinfo(&text))
}

/// The topmost mount on `target`, if any.
pub fn mount_at(target: &Path) -> Result<Option<MountEntry>> {
    Ok(mounts()?.into_iter().rev().find(|m| m.target == target))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 43:0 / /var/lib/kubelet/staging/vol\\0401 rw,relatime shared:5 - ext4 /dev/nbd0 rw
41 22 43:0 / /pods/a/mount ro,relatime shared:5 - ext4 /dev/nbd0 rw
42 22 0:5 /nbd1 /pods/b/dev rw,nosuid - devtmpfs udev rw,size=1k
";

    #[test]
    fn parses_targets_sources_and_escapes() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].target, Path::new("/var/lib/kubelet/staging/vol 1"));
        assert_eq!((m[1].source.as_str(), m[1].fstype.as_str(), m[1].read_only), ("/dev/nbd0", "ext4", false));
        assert!(m[2].read_only);
        assert_eq!((m[3].root.as_str(), m[3].source.as_str()), ("/nbd1", "udev"));
    }

    #[test]
    fn splits_flags_from_data() {
        let (flags, data) = split_options(&["noatime,discard".into(), "ro".into(), "nodev".into()]);
        assert_eq!(flags, MsFlags::MS_NOATIME | MsFlags::MS_RDONLY | MsFlags::MS_NODEV);
        assert_eq!(data, ["discard"]);
    }

    #[test]
    fn skips_garbage_lines() {
        assert!(parse_mountinfo("nonsense\n1 2 3\n").is_empty());
    }
}
