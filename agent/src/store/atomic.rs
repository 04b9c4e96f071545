//! Durable file updates: write a temp file, fsync it, rename it over the
//! target, fsync the directory. A crash at any instant leaves either the old
//! file or the new one, plus at most a `*.tmp` file that loading removes; a
//! write that fails (a full disk, say) removes its temp file itself.
//!
//! Everything the store creates is private to the agent's process whatever the
//! umask: files 0600 (records hold the export name, a secret; images hold
//! tenants' data), directories 0700.

use std::fs::{self, File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Suffix of files that were never renamed into place.
pub const TMP_SUFFIX: &str = ".tmp";
/// Mode of every file the store creates.
pub const FILE_MODE: u32 = 0o600;
/// Mode of the store's directories.
pub const DIR_MODE: u32 = 0o700;

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Opens `path` for writing, created 0600 (truncated if it exists, or
/// failing then with `new`). The mode is set again after opening: the umask
/// may have taken bits away, and an existing file keeps its old mode.
pub fn create_private(path: &Path, new: bool) -> io::Result<File> {
    let mut options = File::options();
    options.read(true).write(true).mode(FILE_MODE);
    if new {
        options.create_new(true);
    } else {
        options.create(true).truncate(true);
    }
    let file = options.open(path)?;
    file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// Creates `dir` (and missing parents) 0700, or gives an existing one that mode.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)?;
    restrict(dir, DIR_MODE).map(drop)
}

/// Sets `path`'s permission bits to `mode` unless they already are; true
/// when they were not.
pub fn restrict(path: &Path, mode: u32) -> io::Result<bool> {
    if fs::metadata(path)?.permissions().mode() & 0o7777 == mode {
        return Ok(false);
    }
    fs::set_permissions(path, Permissions::from_mode(mode))?;
    Ok(true)
}

/// Replaces `dir/name` with `bytes`, durably and atomically. On failure
/// the temp file is removed: nothing is left behind, not even on a full disk.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let replace = || -> io::Result<()> {
        let mut file = create_private(&tmp, false)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, dir.join(name))
    };
    if let Err(e) = replace() {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
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
