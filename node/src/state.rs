//! Per-volume staging state on disk, one small `key=value` file per volume,
//! written atomically (temporary file, fsync, rename). It is what healing
//! and the start-up reconciliation work from. The files hold each volume's
//! nbdUri, whose export name is the volume's secret, and they live on the
//! host: the directory is 0700 and every file 0600, whatever the umask, and
//! a directory left readable by an older version is made private at open.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::time::Duration;

use crate::attach::AttachSpec;
use crate::error::{Context, Error, ErrorKind, Result};
use crate::uri::NbdUri;

/// Where a volume is in its life on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// CONNECT may have happened; not yet confirmed.
    Attaching,
    Staged,
    /// Unstage started; the device may still exist.
    Unstaging,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Self::Attaching => "attaching",
            Self::Staged => "staged",
            Self::Unstaging => "unstaging",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "attaching" => Self::Attaching,
            "staged" => Self::Staged,
            "unstaging" => Self::Unstaging,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeState {
    pub volume_id: String,
    pub phase: Phase,
    /// The nbdUri from the publish context (holds the export token).
    pub uri: String,
    pub connections: usize,
    pub timeout_secs: u64,
    pub dead_conn_timeout_secs: u64,
    pub staging_path: PathBuf,
    /// "block" or the filesystem type.
    pub access: String,
    pub read_only: bool,
    /// CSI mount flags of a filesystem volume, for mounting it again.
    pub mount_flags: Vec<String>,
    pub index: Option<u32>,
}

impl VolumeState {
    pub fn spec(&self) -> Result<AttachSpec> {
        Ok(AttachSpec {
            uri: NbdUri::parse(&self.uri).ctx(ErrorKind::InvalidArgument, || "stored nbdUri")?,
            backend_id: self.volume_id.clone(),
            connections: self.connections,
            timeout: Duration::from_secs(self.timeout_secs),
            dead_conn_timeout: Duration::from_secs(self.dead_conn_timeout_secs),
        })
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "volume_id={}", self.volume_id);
        let _ = writeln!(s, "phase={}", self.phase.as_str());
        let _ = writeln!(s, "uri={}", self.uri);
        let _ = writeln!(s, "connections={}", self.connections);
        let _ = writeln!(s, "timeout={}", self.timeout_secs);
        let _ = writeln!(s, "dead_conn_timeout={}", self.dead_conn_timeout_secs);
        let _ = writeln!(s, "staging_path={}", self.staging_path.display());
        let _ = writeln!(s, "access={}", self.access);
        let _ = writeln!(s, "read_only={}", self.read_only);
        let _ = writeln!(s, "mount_flags={}", self.mount_flags.join(","));
        if let Some(i) = self.index {
            let _ = writeln!(s, "index={i}");
        }
        s
    }

    pub fn decode(text: &str) -> Option<Self> {
        let get = |key: &str| {
            text.lines().find_map(|l| l.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v.to_owned()))
        };
        Some(Self {
            volume_id: get("volume_id")?,
            phase: Phase::parse(&get("phase")?)?,
            uri: get("uri")?,
            connections: get("connections")?.parse().ok()?,
            timeout_secs: get("timeout")?.parse().ok()?,
            dead_conn_timeout_secs: get("dead_conn_timeout")?.parse().ok()?,
            staging_path: PathBuf::from(get("staging_path")?),
            access: get("access")?,
            read_only: get("read_only")? == "true",
            // Absent in files written before it existed: no flags.
            mount_flags: get("mount_flags")
                .map(|v| v.split(',').filter(|f| !f.is_empty()).map(str::to_owned).collect())
                .unwrap_or_default(),
            index: get("index").and_then(|v| v.parse().ok()),
        })
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

    pub fn save(&self, state: &VolumeState) -> Result<()> {
        let text = state.encode();
        let fields = [state.volume_id.as_str(), &state.uri, &state.access, &state.staging_path.to_string_lossy()];
        let newline = |f: &str| f.contains('\n');
        if fields.iter().any(|f| newline(f)) || state.mount_flags.iter().any(|f| newline(f)) {
            return Err(Error::new(ErrorKind::InvalidArgument, "volume state fields cannot contain newlines"));
        }
        let path = self.path(&state.volume_id);
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::options().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            // A temp file left by a crash keeps its old mode: set it again.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().ctx(ErrorKind::Io, || format!("saving state of volume {}", state.volume_id))
    }

    pub fn load(&self, volume_id: &str) -> Result<Option<VolumeState>> {
        match std::fs::read_to_string(self.path(volume_id)) {
            Ok(text) => Ok(VolumeState::decode(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::with_source(ErrorKind::Io, format!("reading state of volume {volume_id}"), e)),
        }
    }

    pub fn remove(&self, volume_id: &str) -> Result<()> {
        match std::fs::remove_file(self.path(volume_id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::with_source(ErrorKind::Io, format!("removing state of volume {volume_id}"), e))
            }
            _ => Ok(()),
        }
    }

    pub fn all(&self) -> Result<Vec<VolumeState>> {
        let rd = std::fs::read_dir(&self.dir).ctx(ErrorKind::Io, || format!("listing {}", self.dir.display()))?;
        let mut out = Vec::new();
        for entry in rd.flatten() {
            if entry.path().extension().is_some_and(|e| e == "vol")
                && let Some(s) = std::fs::read_to_string(entry.path()).ok().and_then(|t| VolumeState::decode(&t))
            {
                out.push(s);
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
            access: "ext4".into(),
            read_only: false,
            mount_flags: vec!["noatime".into(), "discard".into()],
            index: Some(3),
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
        assert_eq!(VolumeState::decode("volume_id=x\n"), None);
        let mut flagged = sample("y");
        flagged.mount_flags = vec!["a\nphase=attaching".into()];
        assert!(dir.save(&flagged).is_err());
    }

    #[test]
    fn reads_files_written_before_mount_flags_existed() {
        let mut old = sample("x");
        let text: String =
            old.encode().lines().filter(|l| !l.starts_with("mount_flags=")).map(|l| format!("{l}\n")).collect();
        old.mount_flags.clear();
        assert_eq!(VolumeState::decode(&text), Some(old));
    }
}
