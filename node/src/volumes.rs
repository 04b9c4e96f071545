//! Stage, publish, expand and inspect volumes: the node's work behind the
//! CSI calls, independent of gRPC. Every step is idempotent. Mounts,
//! unmounts, fsyncs and the kernel requests run on the blocking pool
//! ([`blocking`]), never on a runtime worker.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use csi_proto::contract::PublishContext;

use crate::attach::devices::{device_path, mounts_using};
use crate::attach::{AttachSpec, Attacher, backend};
use crate::blocking::blocking;
use crate::error::{Context, Error, ErrorKind, Result};
use crate::events::Events;
use crate::fsutil::{self, Content};
use crate::health::{self, Health};
use crate::state::{Access, Phase, StateDir, VolumeState};
use crate::sys::mount::{self, MountEntry};

#[derive(Debug, Clone)]
pub struct Settings {
    /// This plugin's node id: part of every device's backend identifier
    /// ([`backend`]).
    pub node_id: String,
    pub connections: usize,
    pub timeout: Duration,
    pub dead_conn_timeout: Duration,
}

#[derive(Debug)]
pub struct Volumes<A> {
    attacher: Arc<A>,
    states: StateDir,
    settings: Settings,
    /// Where a failed attach is reported (off unless given).
    events: Events,
    /// The healer's view of each connection (empty without a healer).
    health: Arc<Health>,
    /// One volume operation at a time on this node.
    lock: tokio::sync::Mutex<()>,
    /// How many volumes may be staged at once (what NodeGetInfo reports).
    max_volumes: usize,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

async fn users_of(index: u32) -> Result<Vec<PathBuf>> {
    blocking(move || Ok(mounts_using(&mount::mounts()?, index))).await
}

/// The mount at `path`, if any.
pub(crate) async fn mount_at(path: &Path) -> Result<Option<MountEntry>> {
    let path = path.to_owned();
    blocking(move || mount::mount_at(&path)).await
}

pub(crate) async fn unmount(path: &Path) -> Result<()> {
    let path = path.to_owned();
    blocking(move || mount::unmount(&path)).await
}

/// Saves a state file (it is fsynced, with its directory).
pub(crate) async fn save(states: &StateDir, state: &VolumeState) -> Result<()> {
    let (states, state) = (states.clone(), state.clone());
    blocking(move || states.save(&state)).await
}

/// Publications of device `index` other than `staging` and `target`: with
/// SINGLE_NODE_SINGLE_WRITER any of them makes a new publication Busy.
fn other_publications(mounts: &[MountEntry], index: u32, staging: &Path, target: &Path) -> Vec<PathBuf> {
    mounts_using(mounts, index).into_iter().filter(|t| t != staging && t != target).collect()
}

impl<A: Attacher> Volumes<A> {
    /// Volumes that report nothing and know no healer; see
    /// [`Self::with_events`] and [`Self::with_health`].
    pub fn new(attacher: Arc<A>, states: StateDir, settings: Settings) -> Self {
        let lock = tokio::sync::Mutex::new(());
        Self {
            attacher,
            states,
            settings,
            events: Events::default(),
            health: Arc::default(),
            lock,
            max_volumes: usize::MAX,
        }
    }

    /// At most `max` volumes staged at once; staging one more is
    /// RESOURCE_EXHAUSTED (the scheduler, told the same limit through
    /// NodeGetInfo, should not ask).
    pub fn with_max_volumes(self, max: usize) -> Self {
        Self { max_volumes: max, ..self }
    }

    /// Failed attaches become Events here.
    pub fn with_events(self, events: Events) -> Self {
        Self { events, ..self }
    }

    /// The healer's per-volume health, which NodeGetVolumeStats reports and
    /// unstaging clears.
    pub fn with_health(self, health: Arc<Health>) -> Self {
        Self { health, ..self }
    }

    pub fn attacher(&self) -> &A {
        &self.attacher
    }

    /// The volume's device on this node: by the identifier its state
    /// records; without a state (lost, or unreadable), by the one this
    /// plugin would give it, or else the volume id older versions used.
    fn device(&self, volume_id: &str, state: Option<&VolumeState>) -> Result<Option<u32>> {
        if let Some(state) = state {
            return self.attacher.find(state.backend_id());
        }
        match self.attacher.find(&backend::backend_id(volume_id, &self.settings.node_id))? {
            Some(index) => Ok(Some(index)),
            None => self.attacher.find(volume_id),
        }
    }

    pub async fn stage(
        &self,
        volume_id: &str,
        context: &PublishContext,
        staging: &Path,
        access: &Access,
    ) -> Result<u32> {
        if volume_id.is_empty() || staging.as_os_str().is_empty() {
            return Err(invalid("volume id and staging path are required"));
        }
        let _guard = self.lock.lock().await;
        let mut state = VolumeState {
            volume_id: volume_id.to_owned(),
            phase: Phase::Attaching,
            uri: context.nbd_uri.to_uri_string(),
            connections: self.settings.connections,
            timeout_secs: self.settings.timeout.as_secs(),
            dead_conn_timeout_secs: self.settings.dead_conn_timeout.as_secs(),
            staging_path: staging.to_owned(),
            access: access.clone(),
            read_only: context.read_only,
            index: None,
            backend_id: Some(backend::backend_id(volume_id, &self.settings.node_id)),
        };
        let old = self.states.load(volume_id)?;
        if let Some(old) = &old
            && old.phase == Phase::Staged
            && old.staging_path != staging
        {
            return Err(Error::new(ErrorKind::Busy, format!("volume {volume_id} is staged at another path")));
        }
        // A device attached before (a retry, or an older version's, named
        // by the volume id alone) keeps the identifier it has.
        if let Some(old) = &old {
            state.backend_id = Some(old.backend_id().to_owned());
        }
        let backend_id = state.backend_id().to_owned();
        let index = match self.attacher.find(&backend_id)? {
            Some(index) => index,
            None => {
                let others = self.states.all()?.iter().filter(|s| s.volume_id != volume_id).count();
                if others >= self.max_volumes {
                    return Err(Error::new(
                        ErrorKind::Exhausted,
                        format!("this node has its maximum of {} volumes staged (--max-volumes)", self.max_volumes),
                    ));
                }
                save(&self.states, &state).await?;
                let spec = AttachSpec {
                    uri: context.nbd_uri.clone(),
                    backend_id,
                    connections: self.settings.connections,
                    timeout: self.settings.timeout,
                    dead_conn_timeout: self.settings.dead_conn_timeout,
                };
                let attached = self.attacher.attach(&spec).await;
                attached.inspect_err(|e| self.events.attach_failed(volume_id, &spec.uri.export, e))?.index
            }
        };
        state.index = Some(index);
        if let Access::Mount { fs_type, flags } = access {
            mount_staging(index, staging, fs_type, flags, context.read_only, true).await?;
        }
        state.phase = Phase::Staged;
        save(&self.states, &state).await?;
        Ok(index)
    }

    pub async fn unstage(&self, volume_id: &str, staging: &Path) -> Result<()> {
        if volume_id.is_empty() || staging.as_os_str().is_empty() {
            return Err(invalid("volume id and staging path are required"));
        }
        let _guard = self.lock.lock().await;
        // A state file that does not load must not keep the device attached:
        // unstaging works from the device and the staging path, and removes
        // the file at the end.
        let state = self.states.load(volume_id).unwrap_or_else(|e| {
            tracing::warn!(volume = %volume_id, error = %e.chain(), "unstaging without its state");
            None
        });
        let index = self.device(volume_id, state.as_ref())?;
        if let Some(index) = index {
            let users: Vec<PathBuf> = users_of(index).await?.into_iter().filter(|t| t != staging).collect();
            if !users.is_empty() {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("volume {volume_id} is still in use at {users:?}; unpublish it first"),
                ));
            }
        }
        if let Some(mut s) = state.clone() {
            s.phase = Phase::Unstaging;
            save(&self.states, &s).await?;
        }
        let mounted = mount_at(staging).await?.is_some();
        // Push every dirty page to the server first: if it is gone for good,
        // this fails after the dead-connection timeout and the caller hears
        // that writes were lost, instead of the teardown hiding it.
        let flushed = match index {
            Some(index) => flush_to_server(staging, mounted, device_path(index)).await,
            None => Ok(()),
        };
        if mounted {
            unmount(staging).await?;
        }
        if let Some(index) = index {
            self.attacher.detach(index).await?;
        }
        self.states.remove(volume_id)?;
        self.health.forget(volume_id);
        flushed.map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!(
                    "volume {volume_id}: flushing to its NBD server failed ({e}); the device was released, \
                     writes the server had not yet received are lost"
                ),
            )
        })
    }

    /// Publishes the staged volume at `target`. With `single_writer`
    /// (SINGLE_NODE_SINGLE_WRITER) a publication at any other target is a
    /// Busy error: that mode allows one publication at a time.
    pub async fn publish(
        &self,
        volume_id: &str,
        staging: &Path,
        target: &Path,
        block: bool,
        ro: bool,
        single_writer: bool,
    ) -> Result<()> {
        if volume_id.is_empty() || staging.as_os_str().is_empty() || target.as_os_str().is_empty() {
            return Err(invalid("volume id, staging path and target path are required"));
        }
        let _guard = self.lock.lock().await;
        let state = self
            .states
            .load(volume_id)?
            .filter(|s| s.phase == Phase::Staged)
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("volume {volume_id} is not staged")))?;
        if mount_at(target).await?.is_some() {
            return Ok(());
        }
        let index = self.attacher.find(state.backend_id())?.or(state.index);
        if single_writer && let Some(index) = index {
            let mounts = blocking(mount::mounts).await?;
            let others = other_publications(&mounts, index, staging, target);
            if !others.is_empty() {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("volume {volume_id} is single-node-single-writer and already published at {others:?}"),
                ));
            }
        }
        let source = if block {
            let index =
                index.ok_or_else(|| Error::new(ErrorKind::NotFound, format!("volume {volume_id} has no device")))?;
            device_path(index)
        } else {
            staging.to_owned()
        };
        let target = target.to_owned();
        blocking(move || {
            if block {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).ctx(ErrorKind::Io, || format!("creating {}", parent.display()))?;
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&target)
                    .ctx(ErrorKind::Io, || format!("creating {}", target.display()))?;
            } else {
                std::fs::create_dir_all(&target).ctx(ErrorKind::Io, || format!("creating {}", target.display()))?;
            }
            mount::bind(&source, &target, ro)
        })
        .await
    }

    pub async fn unpublish(&self, volume_id: &str, target: &Path) -> Result<()> {
        if volume_id.is_empty() || target.as_os_str().is_empty() {
            return Err(invalid("volume id and target path are required"));
        }
        let _guard = self.lock.lock().await;
        let target = target.to_owned();
        blocking(move || {
            while mount::mount_at(&target)?.is_some() {
                mount::unmount(&target)?;
            }
            match std::fs::metadata(&target) {
                Ok(m) if m.is_dir() => std::fs::remove_dir(&target),
                Ok(_) => std::fs::remove_file(&target),
                Err(_) => Ok(()),
            }
            .ctx(ErrorKind::Io, || format!("removing {}", target.display()))
        })
        .await
    }

    /// The volume's device index, if any, and its VolumeCondition
    /// (abnormal, message).
    pub async fn condition(&self, volume_id: &str) -> Result<(Option<u32>, (bool, String))> {
        let state = self.states.load(volume_id)?;
        let device = match self.device(volume_id, state.as_ref())? {
            Some(index) => Some((index, self.attacher.connected(index).await?)),
            None => None,
        };
        if state.is_none() {
            // The kernel may still call the device connected, but nothing
            // here heals it or flushes it at unstage.
            let message = "this node plugin has no staging state for the volume (not staged by it, or its state \
                           directory was lost): it is not healed; stage it again";
            return Ok((device.map(|d| d.0), (true, message.into())));
        }
        let link = self.health.get(volume_id);
        Ok((device.map(|d| d.0), health::condition(device, link.as_ref(), std::time::Instant::now())))
    }

    /// The kernel learns the export's new size (RECONFIGURE), then the
    /// filesystem, if any, is grown online. Returns the new size.
    pub async fn expand(&self, volume_id: &str, volume_path: &Path) -> Result<u64> {
        let _guard = self.lock.lock().await;
        let state = self
            .states
            .load(volume_id)?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("volume {volume_id} is not staged")))?;
        let index = self
            .attacher
            .find(state.backend_id())?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("volume {volume_id} has no device")))?;
        let size = self.attacher.resize(index, &state.spec()?).await?;
        if let Access::Mount { fs_type, .. } = &state.access {
            let path = if volume_path.as_os_str().is_empty() { state.staging_path.as_path() } else { volume_path };
            fsutil::grow(&device_path(index), path, fs_type).await?;
        }
        Ok(size)
    }
}

/// Mounts the filesystem on device `index` at `staging` (a no-op when it is
/// already there). A blank device is formatted only when `may_format`:
/// healing never formats, NodeStageVolume does.
pub(crate) async fn mount_staging(
    index: u32,
    staging: &Path,
    fs_type: &str,
    flags: &[String],
    ro: bool,
    may_format: bool,
) -> Result<()> {
    let dev = device_path(index);
    if let Some(m) = mount_at(staging).await? {
        if Path::new(&m.source) == dev {
            return Ok(());
        }
        return Err(Error::new(ErrorKind::Busy, format!("{} is already a mount of {}", staging.display(), m.source)));
    }
    let dir = staging.to_owned();
    blocking(move || std::fs::create_dir_all(&dir).ctx(ErrorKind::Io, || format!("creating {}", dir.display())))
        .await?;
    let fs_type = match fsutil::probe(&dev).await? {
        Content::Blank if ro => return Err(invalid("a blank volume cannot be staged read-only")),
        Content::Blank if !may_format => return Err(invalid("the volume is blank; not formatting it while healing")),
        Content::Blank => {
            fsutil::format(&dev, fs_type).await?;
            fs_type
        }
        Content::Filesystem(found) if found == fs_type || (found == "ext4" && fs_type.starts_with("ext")) => fs_type,
        Content::Filesystem(found) => {
            return Err(invalid(format!("the volume holds {found}, not the requested {fs_type}")));
        }
        Content::Unknown => {
            return Err(invalid("the volume holds data that is not a known filesystem; refusing to format it"));
        }
    };
    let (staging, fs_type, flags) = (staging.to_owned(), fs_type.to_owned(), flags.to_vec());
    blocking(move || mount::mount_fs(&dev, &staging, &fs_type, ro, &flags)).await
}

/// syncfs on the staged filesystem, then fsync on the device (the kernel
/// sends NBD_CMD_FLUSH): the writes are on the server when this returns Ok.
async fn flush_to_server(staging: &Path, mounted: bool, device: PathBuf) -> std::io::Result<()> {
    let staging = staging.to_path_buf();
    tokio::task::spawn_blocking(move || {
        if mounted {
            nix::unistd::syncfs(std::fs::File::open(&staging)?)?;
        }
        std::fs::File::open(&device)?.sync_all()
    })
    .await
    .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_writer_sees_publications_other_than_its_own() {
        let mounts = mount::parse_mountinfo(
            "40 22 43:0 / /stg/v rw - ext4 /dev/nbd0 rw\n\
             41 22 43:0 / /pods/a rw - ext4 /dev/nbd0 rw\n\
             42 22 43:32 / /pods/b rw - ext4 /dev/nbd2 rw\n\
             43 22 0:5 /nbd2 /pods/c rw - devtmpfs udev rw\n",
        );
        let (stg, a, b, c) = (Path::new("/stg/v"), Path::new("/pods/a"), Path::new("/pods/b"), Path::new("/pods/c"));
        // Staged and published at /pods/a: publishing there again is fine,
        // anywhere else is a second writer.
        assert!(other_publications(&mounts, 0, stg, a).is_empty());
        assert_eq!(other_publications(&mounts, 0, stg, b), [a]);
        // A block volume: the bind of the device node counts as well.
        assert_eq!(other_publications(&mounts, 2, Path::new("/stg/w"), b), [c]);
        assert_eq!(other_publications(&mounts, 2, Path::new("/stg/w"), c), [b]);
        // Staged only: the first publication is free.
        assert!(other_publications(&mounts[..1], 0, stg, a).is_empty());
    }
}
