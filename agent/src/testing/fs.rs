//! Filesystems for tests that must fill one: a small tmpfs, a writer that
//! fills it, and a look for temporary files left behind.

use std::path::{Path, PathBuf};

/// A tmpfs of `bytes` mounted on a fresh temp dir (the tests run as root),
/// for tests that need a filesystem they can fill; unmounted on drop. A
/// mount that fails fails the test: it is never skipped.
#[derive(Debug)]
pub struct Tmpfs {
    dir: Option<tempfile::TempDir>,
}

impl Tmpfs {
    pub fn mount(bytes: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes},mode=0755"), "nbd-csi-test"])
            .arg(dir.path())
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mounting a {bytes}-byte tmpfs on {} failed (this test needs root): {}",
            dir.path().display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let dir = self.dir.take().unwrap();
        let unmounted = std::process::Command::new("umount").arg(dir.path()).status().is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a test that failed half-way): detach it anyway.
            let _ = std::process::Command::new("umount").arg("-l").arg(dir.path()).status();
        }
    }
}

/// Writes `path` until the filesystem is full (ENOSPC), 64 KiB and then
/// 4 KiB at a time, at most `limit` bytes; returns the bytes written.
pub fn fill(path: &Path, limit: u64) -> u64 {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let mut written = 0u64;
    for chunk in [64usize << 10, 4 << 10] {
        let buf = vec![0x5au8; chunk];
        while written < limit {
            match file.write(&buf) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    assert!(written < limit, "{} did not fill up within {limit} bytes", path.display());
    written
}

/// Every `*.tmp` file left under `dir`, at any depth.
pub fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(temp_files(&path));
        } else if path.extension().is_some_and(|e| e == "tmp") {
            found.push(path);
        }
    }
    found
}
