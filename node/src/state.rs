//! Per-volume staging state on disk: one small JSON file per volume
//! ([`VolumeState`] with its [`Phase`] and [`Access`]), written atomically
//! (temporary file, fsync, rename, fsync of the directory). It is what
//! healing and the start-up reconciliation work from. The files hold each
//! volume's nbdUri, whose export name is the volume's secret, and they live
//! on the host: the directory is 0700 and every file 0600, whatever the
//! umask, and a directory left readable by an older version is made private
//! at open. A file is read only up to [`MAX_STATE_FILE`] bytes.
//!
//! Older versions wrote `key=value` lines; such a file still loads (a node
//! upgraded in place keeps its staged volumes) and is written as JSON at
//! its next save. Files of format 1 and `key=value` ones name no backend
//! identifier: their devices were attached under the volume id, and keep it.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::attach::AttachSpec;
use crate::error::{Context, Error, ErrorKind, Result};
use crate::uri::NbdUri;

/// Bumped when the file's meaning changes; an older plugin refuses newer files.
/// 2: the device's backend identifier is `backend_id`, no longer the volume
/// id (a format 1 file has none: its device is named by the volume id).
const FORMAT: u32 = 2;

/// A state file is a few hundred bytes; anything past this is not one.
pub const MAX_STATE_FILE: u64 = 64 * 1024;

/// Where a volume is in its life on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// CONNECT may have happened; not yet confirmed.
    Attaching,
    Staged,
    /// Unstage started; the device may still exist.
    Unstaging,
}

/// How a volume is used: a raw block device or a filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Access {
    Block,
    /// A filesystem (`fs_type`, e.g. ext4) mounted with the CSI mount flags.
    Mount {
        fs_type: String,
        #[serde(default)]
        flags: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeState {
    pub volume_id: String,
    pub phase: Phase,
    /// The nbdUri from the publish context (holds the export token).
    pub uri: String,
    pub connections: usize,
    pub timeout_secs: u64,
    pub dead_conn_timeout_secs: u64,
    pub staging_path: PathBuf,
    pub access: Access,
    pub read_only: bool,
    #[serde(default)]
    pub index: Option<u32>,
    /// The BACKEND_IDENTIFIER the device was attached with; `None` in the
    /// files of older versions, which named it by the volume id.
    #[serde(default)]
    pub backend_id: Option<String>,
}

/// The file as written: the state and the format it is in.
#[derive(Serialize)]
struct Written<'a> {
    format: u32,
    #[serde(flatten)]
    state: &'a VolumeState,
}

#[derive(Deserialize)]
struct Read {
    format: u32,
    #[serde(flatten)]
    state: VolumeState,
}

impl VolumeState {
    /// The device's backend identifier: the one recorded, or the volume id
    /// for a file an older version wrote (its device is named so).
    pub fn backend_id(&self) -> &str {
        self.backend_id.as_deref().unwrap_or(&self.volume_id)
    }

    pub fn spec(&self) -> Result<AttachSpec> {
        Ok(AttachSpec {
            uri: NbdUri::parse(&self.uri).ctx(ErrorKind::InvalidArgument, || "stored nbdUri")?,
            backend_id: self.backend_id().to_owned(),
            connections: self.connections,
            timeout: Duration::from_secs(self.timeout_secs),
            dead_conn_timeout: Duration::from_secs(self.dead_conn_timeout_secs),
        })
    }

    /// The file's contents: JSON.
    pub fn encode(&self) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(&Written { format: FORMAT, state: self })
            .ctx(ErrorKind::InvalidArgument, || format!("encoding the state of volume {}", self.volume_id))
    }

    /// A file's contents: JSON, or the `key=value` lines older versions
    /// wrote (anything that does not start with `{`).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let corrupt = |why: String| Error::new(ErrorKind::Io, format!("not a volume state file: {why}"));
        if bytes.trim_ascii_start().starts_with(b"{") {
            let read: Read = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
            if read.format > FORMAT {
                return Err(corrupt(format!(
                    "format {} is newer than this plugin's {FORMAT}; upgrade the plugin",
                    read.format
                )));
            }
            return Ok(read.state);
        }
        let text = std::str::from_utf8(bytes).map_err(|_| corrupt("neither JSON nor UTF-8 text".into()))?;
        Self::decode_key_value(text).ok_or_else(|| corrupt("neither JSON nor complete key=value lines".into()))
    }

    /// The `key=value` format of older versions: `access` is `block` or the
    /// filesystem type, `mount_flags` comma-separated (absent in the oldest).
    pub fn decode_key_value(text: &str) -> Option<Self> {
        let get = |key: &str| {
            text.lines().find_map(|l| l.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v.to_owned()))
        };
        let phase = match get("phase")?.as_str() {
            "attaching" => Phase::Attaching,
            "staged" => Phase::Staged,
            "unstaging" => Phase::Unstaging,
            _ => return None,
        };
        let access = match get("access")? {
            block if block == "block" => Access::Block,
            fs_type => Access::Mount {
                fs_type,
                flags: get("mount_flags")
                    .map(|v| v.split(',').filter(|f| !f.is_empty()).map(str::to_owned).collect())
                    .unwrap_or_default(),
            },
        };
        Some(Self {
            volume_id: get("volume_id")?,
            phase,
            uri: get("uri")?,
            connections: get("connections")?.parse().ok()?,
            timeout_secs: get("timeout")?.parse().ok()?,
            dead_conn_timeout_secs: get("dead_conn_timeout")?.parse().ok()?,
            staging_path: PathBuf::from(get("staging_path")?),
            access,
            read_only: get("read_only")? == "true",
            index: get("index").and_then(|v| v.parse().ok()),
            backend_id: None,
        })
    }

    /// What older versions wrote, for the tests that read such files.
    #[cfg(test)]
    pub fn encode_key_value(&self) -> String {
        use std::fmt::Write as _;
        let (access, flags) = match &self.access {
            Access::Block => ("block", String::new()),
            Access::Mount { fs_type, flags } => (fs_type.as_str(), flags.join(",")),
        };
        let phase = match self.phase {
            Phase::Attaching => "attaching",
            Phase::Staged => "staged",
            Phase::Unstaging => "unstaging",
        };
        let mut s = String::new();
        let _ = writeln!(s, "volume_id={}", self.volume_id);
        let _ = writeln!(s, "phase={phase}");
        let _ = writeln!(s, "uri={}", self.uri);
        let _ = writeln!(s, "connections={}", self.connections);
        let _ = writeln!(s, "timeout={}", self.timeout_secs);
        let _ = writeln!(s, "dead_conn_timeout={}", self.dead_conn_timeout_secs);
        let _ = writeln!(s, "staging_path={}", self.staging_path.display());
        let _ = writeln!(s, "access={access}");
        let _ = writeln!(s, "read_only={}", self.read_only);
        let _ = writeln!(s, "mount_flags={flags}");
        if let Some(i) = self.index {
            let _ = writeln!(s, "index={i}");
        }
        s
    }
}

/// The directory of state files.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

/// File name for a volume id: hex, so any id is a safe, unique name.
fn file_name(volume_id: &str) -> String {
    volume_id.bytes().map(|b| format!("{b:02x}")).collect::<String>() + ".vol"
}

/// A state file's contents, refused before reading when larger than
/// [`MAX_STATE_FILE`]; `None` when there is no file.
fn read_capped(path: &Path) -> Result<Option<Vec<u8>>> {
    let what = || format!("reading {}", path.display());
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::with_source(ErrorKind::Io, what(), e)),
    };
    let mut bytes = Vec::new();
    // One byte past the cap tells an oversized file from one exactly at it.
    file.take(MAX_STATE_FILE + 1).read_to_end(&mut bytes).ctx(ErrorKind::Io, what)?;
    if bytes.len() as u64 > MAX_STATE_FILE {
        return Err(Error::new(
            ErrorKind::Io,
            format!("{} is larger than {MAX_STATE_FILE} bytes: not a volume state file", path.display()),
        ));
    }
    Ok(Some(bytes))
}

impl StateDir {
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).ctx(ErrorKind::Io, || format!("creating {}", dir.display()))?;
        let private = |path: &std::path::Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .ctx(ErrorKind::Io, || format!("making {} private", path.display()))
        };
        private(&dir, 0o700)?;
        let entries = std::fs::read_dir(&dir).ctx(ErrorKind::Io, || format!("listing {}", dir.display()))?;
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                private(&entry.path(), 0o600)?;
            }
        }
        Ok(Self { dir })
    }

    fn path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(file_name(volume_id))
    }

    /// Writes the volume's file as JSON, atomically; a file in the older
    /// `key=value` format is replaced by JSON here.
    pub fn save(&self, state: &VolumeState) -> Result<()> {
        // No legitimate id, nbdUri, path, type or mount flag holds a line
        // break; one that does is garbage from the caller.
        let fields = [state.volume_id.as_str(), &state.uri, &state.staging_path.to_string_lossy()];
        let newline = |f: &str| f.contains('\n');
        let access_newline = match &state.access {
            Access::Block => false,
            Access::Mount { fs_type, flags } => newline(fs_type) || flags.iter().any(|f| newline(f)),
        };
        if fields.iter().any(|f| newline(f)) || access_newline {
            return Err(Error::new(ErrorKind::InvalidArgument, "volume state fields cannot contain newlines"));
        }
        let bytes = state.encode()?;
        let path = self.path(&state.volume_id);
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::options().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            // A temp file left by a crash keeps its old mode: set it again.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().ctx(ErrorKind::Io, || format!("saving state of volume {}", state.volume_id))
    }

    /// The volume's state; an unreadable, oversized or corrupt file is an
    /// error naming the file, never taken for "not staged".
    pub fn load(&self, volume_id: &str) -> Result<Option<VolumeState>> {
        let path = self.path(volume_id);
        let Some(bytes) = read_capped(&path)? else { return Ok(None) };
        VolumeState::decode(&bytes)
            .map(Some)
            .map_err(|e| Error::new(e.kind, format!("state of volume {volume_id} ({}): {}", path.display(), e.message)))
    }

    pub fn remove(&self, volume_id: &str) -> Result<()> {
        match std::fs::remove_file(self.path(volume_id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::with_source(ErrorKind::Io, format!("removing state of volume {volume_id}"), e))
            }
            _ => Ok(()),
        }
    }

    /// Every state that loads; a file that does not is logged and skipped,
    /// so one bad file does not stop the others from being healed.
    pub fn all(&self) -> Result<Vec<VolumeState>> {
        let rd = std::fs::read_dir(&self.dir).ctx(ErrorKind::Io, || format!("listing {}", self.dir.display()))?;
        let mut out = Vec::new();
        for entry in rd.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "vol") {
                continue;
            }
            match read_capped(&path).and_then(|b| b.map(|b| VolumeState::decode(&b)).transpose()) {
                Ok(Some(state)) => out.push(state),
                Ok(None) => {}
                Err(e) => tracing::error!(file = %path.display(), error = %e.chain(), "skipping a state file"),
            }
        }
        out.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str) -> VolumeState {
        VolumeState {
            volume_id: id.into(),
            phase: Phase::Staged,
            uri: "nbd://10.0.0.1:10900/tok%20en".into(),
            connections: 4,
            timeout_secs: 30,
            dead_conn_timeout_secs: 120,
            staging_path: "/var/lib/kubelet/staging/x".into(),
            access: Access::Mount { fs_type: "ext4".into(), flags: vec!["noatime".into(), "discard".into()] },
            read_only: false,
            index: Some(3),
            backend_id: None,
        }
    }

    #[test]
    fn round_trips_and_lists() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        assert_eq!(dir.load("a/b").unwrap(), None);
        let mut a = sample("a/b");
        dir.save(&a).unwrap();
        dir.save(&sample("c")).unwrap();
        assert_eq!(dir.load("a/b").unwrap(), Some(a.clone()));
        a.phase = Phase::Unstaging;
        a.index = None;
        dir.save(&a).unwrap();
        assert_eq!(dir.load("a/b").unwrap().unwrap().phase, Phase::Unstaging);
        assert_eq!(dir.all().unwrap().len(), 2);
        dir.remove("a/b").unwrap();
        dir.remove("a/b").unwrap();
        assert_eq!(dir.all().unwrap().len(), 1);
        assert_eq!(a.spec().unwrap().uri.export, "tok en");
    }

    fn mode(path: &std::path::Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// The usual umask (022) would leave 0755/0644; the files hold the
    /// export names. (The process umask is not changed here: tests run in
    /// parallel threads of one process, and 022 is what they run under.)
    #[test]
    fn state_is_private_and_a_readable_directory_is_made_private_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("state");
        let dir = StateDir::open(&path).unwrap();
        dir.save(&sample("v")).unwrap();
        assert_eq!(mode(&path), 0o700);
        assert_eq!(mode(&dir.path("v")), 0o600);

        // As an older version left it: world-readable directory and file.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(dir.path("v"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let tmp_left = dir.path("w").with_extension("tmp");
        std::fs::write(&tmp_left, "left by a crash").unwrap();
        std::fs::set_permissions(&tmp_left, std::fs::Permissions::from_mode(0o644)).unwrap();
        let dir = StateDir::open(&path).unwrap();
        assert_eq!((mode(&path), mode(&dir.path("v")), mode(&tmp_left)), (0o700, 0o600, 0o600));
        dir.save(&sample("w")).unwrap();
        assert_eq!(mode(&dir.path("w")), 0o600, "a leftover temp file's mode does not carry over");
        assert_eq!(dir.load("v").unwrap(), Some(sample("v")));
    }

    #[test]
    fn rejects_newlines_and_garbage() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        let mut bad = sample("x");
        bad.uri.push_str("\nphase=staged");
        assert!(dir.save(&bad).is_err());
        assert_eq!(VolumeState::decode_key_value("volume_id=x\n"), None);
        let mut flagged = sample("y");
        flagged.access = Access::Mount { fs_type: "ext4".into(), flags: vec!["a\nphase=attaching".into()] };
        assert!(dir.save(&flagged).is_err());
    }

    #[test]
    fn reads_files_written_before_mount_flags_existed() {
        let mut old = sample("x");
        let text: String = old
            .encode_key_value()
            .lines()
            .filter(|l| !l.starts_with("mount_flags="))
            .map(|l| format!("{l}\n"))
            .collect();
        old.access = Access::Mount { fs_type: "ext4".into(), flags: Vec::new() };
        assert_eq!(VolumeState::decode_key_value(&text), Some(old));
    }

    #[test]
    fn new_files_are_json_with_typed_fields() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        dir.save(&sample("v")).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path("v")).unwrap()).unwrap();
        assert_eq!(json["format"], FORMAT);
        assert_eq!(json["phase"], "staged");
        assert_eq!(
            json["access"],
            serde_json::json!({"type": "mount", "fs_type": "ext4", "flags": ["noatime", "discard"]})
        );
        assert_eq!(json["index"], 3);
        let block = VolumeState { access: Access::Block, index: None, ..sample("b") };
        dir.save(&block).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path("b")).unwrap()).unwrap();
        assert_eq!(json["access"], serde_json::json!({"type": "block"}));
        assert_eq!(dir.load("b").unwrap(), Some(block));
    }

    /// A node upgraded in place keeps its staged volumes: the files an
    /// older version wrote load to the same state, and become JSON at the
    /// next save.
    #[test]
    fn key_value_files_of_older_versions_load_and_are_saved_as_json() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        let old_mount = "volume_id=v\nphase=staged\nuri=nbd://10.0.0.1:10900/tok%20en\nconnections=4\ntimeout=30\n\
                         dead_conn_timeout=120\nstaging_path=/var/lib/kubelet/staging/x\naccess=ext4\nread_only=false\n\
                         mount_flags=noatime,discard\nindex=3\n";
        let old_block = "volume_id=b\nphase=attaching\nuri=nbd://10.0.0.1:10901/t\nconnections=1\ntimeout=5\n\
                         dead_conn_timeout=6\nstaging_path=/s\naccess=block\nread_only=true\nmount_flags=\n";
        std::fs::write(dir.path("v"), old_mount).unwrap();
        std::fs::write(dir.path("b"), old_block).unwrap();
        assert_eq!(dir.load("v").unwrap(), Some(sample("v")));
        let block = VolumeState {
            volume_id: "b".into(),
            phase: Phase::Attaching,
            uri: "nbd://10.0.0.1:10901/t".into(),
            connections: 1,
            timeout_secs: 5,
            dead_conn_timeout_secs: 6,
            staging_path: "/s".into(),
            access: Access::Block,
            read_only: true,
            index: None,
            backend_id: None,
        };
        assert_eq!(dir.load("b").unwrap(), Some(block.clone()));
        assert_eq!(dir.all().unwrap(), [block, sample("v")]);

        let loaded = dir.load("v").unwrap().unwrap();
        dir.save(&loaded).unwrap();
        let text = std::fs::read_to_string(dir.path("v")).unwrap();
        assert!(text.trim_start().starts_with('{'), "{text}");
        assert_eq!(dir.load("v").unwrap(), Some(sample("v")));
    }

    /// A plugin upgraded in place finds the devices an older version
    /// attached: its files (format 1 JSON, `key=value`) name no backend
    /// identifier, so the device's is the volume id; newer files keep the
    /// one the device was attached with.
    #[test]
    fn files_of_older_versions_name_the_device_by_the_volume_id() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        let mut json: serde_json::Value = serde_json::from_slice(&sample("v").encode().unwrap()).unwrap();
        json["format"] = 1.into();
        json.as_object_mut().unwrap().remove("backend_id");
        std::fs::write(dir.path("v"), serde_json::to_vec(&json).unwrap()).unwrap();
        let loaded = dir.load("v").unwrap().unwrap();
        assert_eq!((loaded.backend_id(), loaded.spec().unwrap().backend_id.as_str()), ("v", "v"));
        let key_value = VolumeState::decode_key_value(&sample("k").encode_key_value()).unwrap();
        assert_eq!(key_value.backend_id(), "k");

        let named = VolumeState { backend_id: Some("v@node-a".into()), ..loaded };
        dir.save(&named).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path("v")).unwrap()).unwrap();
        assert_eq!((json["format"].as_u64(), json["backend_id"].as_str()), (Some(2), Some("v@node-a")));
        let loaded = dir.load("v").unwrap().unwrap();
        assert_eq!((loaded.backend_id(), loaded.spec().unwrap().backend_id.as_str()), ("v@node-a", "v@node-a"));
    }

    #[test]
    fn corrupt_oversized_and_newer_files_are_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        dir.save(&sample("good")).unwrap();
        let cases: [(&str, Vec<u8>, &str); 5] = [
            ("json", br#"{"format":1,"volume_id":"json","phase":"staged""#.to_vec(), "EOF while parsing"),
            ("kv", b"volume_id=kv\nphase=staged\n".to_vec(), "neither JSON nor complete key=value lines"),
            ("bin", vec![0xff, 0xfe, 0x00], "neither JSON nor UTF-8"),
            ("big", vec![b' '; MAX_STATE_FILE as usize + 1], "larger than 65536 bytes"),
            (
                "new",
                {
                    let mut json: serde_json::Value = serde_json::from_slice(&sample("new").encode().unwrap()).unwrap();
                    json["format"] = (FORMAT + 1).into();
                    serde_json::to_vec(&json).unwrap()
                },
                "newer than this plugin's",
            ),
        ];
        for (id, bytes, expected) in &cases {
            std::fs::write(dir.path(id), bytes).unwrap();
            let err = dir.load(id).unwrap_err();
            let message = err.chain();
            assert!(message.contains(expected), "{id}: {message}");
            assert!(message.contains(&dir.path(id).display().to_string()), "{id}: names the file: {message}");
        }
        // A file exactly at the cap is read (and refused for what it holds).
        std::fs::write(dir.path("cap"), vec![b' '; MAX_STATE_FILE as usize]).unwrap();
        assert!(!dir.load("cap").unwrap_err().chain().contains("larger than"));
        // The bad files do not hide the good one.
        assert_eq!(dir.all().unwrap(), [sample("good")]);
    }
}
