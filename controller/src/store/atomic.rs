//! Durable file updates: write a temp file, fsync it, rename it over the
//! target, fsync the directory. A crash at any instant leaves either the old
//! file or the new one, plus at most a `*.tmp` file that loading removes.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// Suffix of files that were never renamed into place.
pub const TMP_SUFFIX: &str = ".tmp";

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `dir/name` with `bytes`, durably and atomically.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Renames a finished temp file into place, durably.
pub fn commit(dir: &Path, tmp_name: &str, name: &str) -> io::Result<()> {
    fs::rename(dir.join(tmp_name), dir.join(name))?;
    sync_dir(dir)
}

/// Removes `dir/name` durably; a missing file is not an error.
pub fn remove(dir: &Path, name: &str) -> io::Result<()> {
    match fs::remove_file(dir.join(name)) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_replaces_whole_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.json", b"first version, long").unwrap();
        write(dir.path(), "a.json", b"second").unwrap();
        assert_eq!(fs::read(dir.path().join("a.json")).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.json")]);
        remove(dir.path(), "a.json").unwrap();
        remove(dir.path(), "a.json").unwrap();
        assert!(!dir.path().join("a.json").exists());
    }
}
