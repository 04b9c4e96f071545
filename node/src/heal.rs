//! Self-healing: when the kernel reports a dead link (LINK_DEAD multicast)
//! or a check finds a device gone, reconnect — resolve the host again, redo
//! the handshake — and hand fresh sockets over with RECONFIGURE, within the
//! dead-connection timeout, so the application sees no I/O error. The
//! kernel holds the sockets, so the plugin itself may restart at any time.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::attach::devices::device_path;
use crate::attach::{Attacher, backend};
use crate::error::Result;
use crate::events::{self, Events};
use crate::health::Health;
use crate::state::{Access, Phase, StateDir, VolumeState};
use crate::volumes;

#[derive(Debug)]
pub struct Healer<A> {
    attacher: Arc<A>,
    states: StateDir,
    in_flight: Mutex<HashSet<String>>,
    /// Where a volume healing gave up on is reported (off unless given).
    events: Events,
    /// Per-volume connection health, read by NodeGetVolumeStats.
    health: Arc<Health>,
    /// This plugin's node id: which devices without a state are its own
    /// ([`backend::is_own`]); `None` owns only those of older versions.
    node_id: Option<String>,
}

/// Pause between reconnect attempts.
const RETRY: Duration = Duration::from_millis(500);

impl<A: Attacher + 'static> Healer<A> {
    /// A healer that reports nothing and keeps its health to itself; see
    /// [`Self::with_events`] and [`Self::with_health`].
    pub fn new(attacher: Arc<A>, states: StateDir) -> Self {
        let in_flight = Mutex::new(HashSet::new());
        Self { attacher, states, in_flight, events: Events::default(), health: Arc::default(), node_id: None }
    }

    /// The plugin of `node_id`: its devices are named after it, and another
    /// node's devices on the same kernel are left alone.
    pub fn with_node_id(self, node_id: impl Into<String>) -> Self {
        Self { node_id: Some(node_id.into()), ..self }
    }

    /// Links healing gives up on become Events here.
    pub fn with_events(self, events: Events) -> Self {
        Self { events, ..self }
    }

    /// Where each connection's health is kept: shared with the
    /// [`volumes::Volumes`] that report it.
    pub fn with_health(self, health: Arc<Health>) -> Self {
        Self { health, ..self }
    }

    /// Offers fresh sockets to the volume's device until the kernel takes
    /// them or the dead-connection timeout has passed.
    pub async fn heal(&self, state: &VolumeState) -> Result<()> {
        {
            let mut busy = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            if !busy.insert(state.volume_id.clone()) {
                return Ok(());
            }
        }
        self.health.reconnecting(&state.volume_id);
        let result = self.heal_inner(state).await;
        match &result {
            Ok(reconnected) => {
                if *reconnected {
                    self.health.reconnected(&state.volume_id);
                }
                self.health.healed(&state.volume_id);
            }
            Err(e) => {
                let export = state.spec().map(|s| s.uri.export).unwrap_or_default();
                if self.health.lost(&state.volume_id, events::describe(e, &export)) {
                    self.events.connection_lost(&state.volume_id, &export, e);
                }
            }
        }
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).remove(&state.volume_id);
        result.map(drop)
    }

    /// True when the device got fresh sockets or was attached again; false
    /// when the volume is no longer staged.
    async fn heal_inner(&self, state: &VolumeState) -> Result<bool> {
        let spec = state.spec()?;
        let deadline = Instant::now() + spec.dead_conn_timeout.max(Duration::from_secs(5));
        loop {
            // Unstaging may have begun meanwhile: never attach or hand
            // sockets to a volume that is no longer staged.
            if !self.states.load(&state.volume_id)?.is_some_and(|s| s.phase == Phase::Staged) {
                tracing::info!(volume = %state.volume_id, "no longer staged; not healing");
                return Ok(false);
            }
            let Some(index) = self.attacher.find(state.backend_id())? else {
                tracing::warn!(volume = %state.volume_id, "device vanished; attaching again");
                let attached = self.attacher.attach(&spec).await?;
                let mut updated = state.clone();
                updated.index = Some(attached.index);
                volumes::save(&self.states, &updated).await?;
                return remount_staging(&updated).await.map(|()| true);
            };
            match self.attacher.reconnect(index, &spec).await {
                Ok(n) => {
                    tracing::info!(volume = %state.volume_id, index, sockets = n, "reconnected");
                    return Ok(true);
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(volume = %state.volume_id, error = %e.chain(), "reconnect failed; retrying");
                    tokio::time::sleep(RETRY).await;
                }
                Err(e) => {
                    tracing::error!(volume = %state.volume_id, error = %e.chain(), "giving up reconnecting for now");
                    return Err(e);
                }
            }
        }
    }

    /// Start-up: staged volumes get fresh sockets offered (dead ones are
    /// replaced, live ones kept) or are attached again; volumes caught in
    /// the middle of attaching or unstaging are rolled back, so kubelet's
    /// retry starts clean; then devices of this driver that no state
    /// claims are disconnected, unless something still uses them.
    pub async fn reconcile(self: &Arc<Self>) -> Result<()> {
        for state in self.states.all()? {
            match state.phase {
                Phase::Staged => {
                    let me = Arc::clone(self);
                    tokio::spawn(async move {
                        if let Err(e) = me.heal(&state).await {
                            tracing::error!(volume = %state.volume_id, error = %e.chain(), "reconcile failed");
                        }
                    });
                }
                Phase::Attaching | Phase::Unstaging => {
                    if let Some(m) = volumes::mount_at(&state.staging_path).await? {
                        tracing::info!(volume = %state.volume_id, target = %m.target.display(), "rolling back mount");
                        volumes::unmount(&state.staging_path).await?;
                    }
                    if let Some(index) = self.attacher.find(state.backend_id())? {
                        tracing::info!(volume = %state.volume_id, index, "rolling back interrupted attach/detach");
                        self.attacher.detach(index).await?;
                    }
                    self.states.remove(&state.volume_id)?;
                }
            }
        }
        self.disconnect_unclaimed().await
    }

    /// Disconnects devices of this plugin (a backend identifier of this
    /// driver and node, or of an older version) that no state file claims
    /// (lost state, or a plugin killed between CONNECT and saving). A device
    /// in use is left alone: tearing it down would break its user; it is
    /// reported instead. Another node's devices on this kernel are not ours.
    async fn disconnect_unclaimed(&self) -> Result<()> {
        let claimed: HashSet<String> = self.states.all()?.iter().map(|s| s.backend_id().to_owned()).collect();
        for (index, backend) in self.attacher.list()? {
            if !backend::is_own(&backend, self.node_id.as_deref()) || claimed.contains(&backend) {
                continue;
            }
            match self.attacher.in_use(index).await {
                Ok(false) => {
                    tracing::warn!(index, volume = %backend, "no staged volume claims this device; disconnecting it");
                    if let Err(e) = self.attacher.detach(index).await {
                        tracing::error!(index, volume = %backend, error = %e.chain(), "disconnecting failed");
                    }
                }
                Ok(true) => {
                    tracing::warn!(index, volume = %backend, "no staged volume claims this device, but it is in use; left alone");
                }
                Err(e) => tracing::error!(index, volume = %backend, error = %e.chain(), "checking the device failed"),
            }
        }
        Ok(())
    }

    /// Forever: heals on LINK_DEAD, and every `interval` retries volumes
    /// whose device vanished or whose reconnecting failed.
    pub async fn run(self: Arc<Self>, mut dead: mpsc::UnboundedReceiver<u32>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        loop {
            let targets: Vec<VolumeState> = tokio::select! {
                Some(index) = dead.recv() => {
                    let backend = self.attacher.list().ok().and_then(|l| l.into_iter().find(|(i, _)| *i == index));
                    let Some((_, backend)) = backend else { continue };
                    let ours: Vec<VolumeState> =
                        self.states.all().unwrap_or_default().into_iter().filter(|s| s.backend_id() == backend).collect();
                    if !ours.is_empty() {
                        tracing::warn!(index, volume = %backend, "kernel reports a dead link");
                    }
                    ours
                }
                _ = tick.tick() => {
                    // Devices that vanished, and links healing gave up on:
                    // the server may be back, and the kernel still takes
                    // sockets after the dead-connection timeout.
                    let lost = self.health.lost_volumes();
                    let staged = self.states.all().unwrap_or_default().into_iter().filter(|s| s.phase == Phase::Staged);
                    staged
                        .filter(|s| lost.contains(&s.volume_id) || !matches!(self.attacher.find(s.backend_id()), Ok(Some(_))))
                        .collect()
                }
            };
            for state in targets.into_iter().filter(|s| s.phase == Phase::Staged) {
                let me = Arc::clone(&self);
                tokio::spawn(async move {
                    if let Err(e) = me.heal(&state).await {
                        tracing::error!(volume = %state.volume_id, error = %e.chain(), "healing failed");
                    }
                });
            }
        }
    }
}

/// A filesystem volume attached again (after a reboot, or a device that
/// was disconnected while nothing used it) goes back on its staging path,
/// where kubelet expects it; never formatted. A staging path that kubelet
/// removed, or that holds another mount, is left as it is.
async fn remount_staging(state: &VolumeState) -> Result<()> {
    let (Some(index), Access::Mount { fs_type, flags }) = (state.index, &state.access) else { return Ok(()) };
    if state.staging_path.as_os_str().is_empty() || !state.staging_path.is_dir() {
        return Ok(());
    }
    let path = &state.staging_path;
    if let Some(m) = volumes::mount_at(path).await?
        && m.source != device_path(index).to_string_lossy()
    {
        tracing::warn!(volume = %state.volume_id, staging = %path.display(), source = %m.source, "staging path holds another mount; left alone");
        return Ok(());
    }
    volumes::mount_staging(index, path, fs_type, flags, state.read_only, false).await?;
    tracing::info!(volume = %state.volume_id, index, staging = %path.display(), "filesystem mounted again");
    Ok(())
}

/// Forwards LINK_DEAD notifications from a blocking listener thread.
pub fn spawn_link_dead_thread(listener: crate::sys::nbd::LinkDeadListener) -> mpsc::UnboundedReceiver<u32> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("nbd-link-dead".into())
        .spawn(move || {
            loop {
                match listener.next() {
                    Ok(indexes) => {
                        for i in indexes {
                            if tx.send(i).is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e.chain(), "LINK_DEAD listener failed");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        })
        .expect("spawning the LINK_DEAD listener thread");
    rx
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use csi_proto::contract::PublishContext;

    use super::*;
    use crate::attach::{AttachSpec, Attached};

    /// The kernel as a list of (index, backend, in use); records detaches.
    #[derive(Debug, Default)]
    struct FakeKernel {
        devices: Mutex<Vec<(u32, String, bool)>>,
        detached: Mutex<Vec<u32>>,
    }

    impl FakeKernel {
        fn with(devices: &[(u32, &str, bool)]) -> Self {
            let devices = devices.iter().map(|&(i, b, u)| (i, b.to_owned(), u)).collect();
            Self { devices: Mutex::new(devices), detached: Mutex::default() }
        }
        fn backends(&self) -> Vec<String> {
            self.devices.lock().unwrap().iter().map(|d| d.1.clone()).collect()
        }
    }

    impl Attacher for FakeKernel {
        async fn attach(&self, spec: &AttachSpec) -> Result<Attached> {
            let mut devices = self.devices.lock().unwrap();
            let index = (0..).find(|i| !devices.iter().any(|d| d.0 == *i)).unwrap();
            devices.push((index, spec.backend_id.clone(), false));
            Ok(Attached { index, size: 1 << 20, transmission_flags: 1, connections: 1 })
        }
        async fn reconnect(&self, _: u32, _: &AttachSpec) -> Result<usize> {
            Ok(1)
        }
        async fn resize(&self, _: u32, _: &AttachSpec) -> Result<u64> {
            Ok(1 << 20)
        }
        async fn detach(&self, index: u32) -> Result<()> {
            self.devices.lock().unwrap().retain(|d| d.0 != index);
            self.detached.lock().unwrap().push(index);
            Ok(())
        }
        fn find(&self, backend_id: &str) -> Result<Option<u32>> {
            Ok(self.devices.lock().unwrap().iter().find(|d| d.1 == backend_id).map(|d| d.0))
        }
        async fn connected(&self, index: u32) -> Result<bool> {
            Ok(self.devices.lock().unwrap().iter().any(|d| d.0 == index))
        }
        fn list(&self) -> Result<Vec<(u32, String)>> {
            Ok(self.devices.lock().unwrap().iter().map(|d| (d.0, d.1.clone())).collect())
        }
        async fn in_use(&self, index: u32) -> Result<bool> {
            Ok(self.devices.lock().unwrap().iter().any(|d| d.0 == index && d.2))
        }
    }

    /// A device the kernel calls connected is still abnormal when no state
    /// claims it: nothing heals it (a plugin that lost its state directory).
    #[tokio::test]
    async fn a_volume_without_state_is_abnormal_even_when_its_device_is_connected() {
        let tmp = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::with(&[(0, &id('a'), true)]));
        let settings = settings("node-a");
        let volumes = crate::volumes::Volumes::new(kernel, StateDir::open(tmp.path()).unwrap(), settings);
        let (device, (abnormal, message)) = volumes.condition(&id('a')).await.unwrap();
        assert_eq!(device, Some(0));
        assert!(abnormal && message.contains("no staging state"), "{message}");
    }

    fn id(c: char) -> String {
        format!("vol-{}", c.to_string().repeat(32))
    }

    fn state(volume_id: &str, phase: Phase, staging: PathBuf) -> VolumeState {
        VolumeState {
            volume_id: volume_id.to_owned(),
            phase,
            uri: "nbd://127.0.0.1:1/x".into(),
            connections: 1,
            timeout_secs: 5,
            dead_conn_timeout_secs: 5,
            staging_path: staging,
            access: Access::Block,
            read_only: false,
            index: None,
            backend_id: None,
        }
    }

    #[tokio::test]
    async fn start_up_disconnects_only_unclaimed_unused_devices_of_this_driver() {
        let tmp = tempfile::tempdir().unwrap();
        let states = StateDir::open(tmp.path().join("state")).unwrap();
        let (staged, lost, busy, interrupted) = (id('a'), id('b'), id('c'), id('d'));
        states.save(&state(&staged, Phase::Staged, tmp.path().join("s1"))).unwrap();
        states.save(&state(&interrupted, Phase::Attaching, tmp.path().join("s2"))).unwrap();
        let kernel = Arc::new(FakeKernel::with(&[
            (0, &staged, true),
            (1, &lost, false),
            (2, &busy, true),
            (3, "vol-mc", false),
            (4, &interrupted, false),
        ]));
        let healer = Arc::new(Healer::new(Arc::clone(&kernel), states.clone()));
        healer.reconcile().await.unwrap();
        // The lost one is gone; the interrupted attach is rolled back; the
        // one in use, the staged one and the foreign one stay.
        assert_eq!(*kernel.detached.lock().unwrap(), [4, 1]);
        assert_eq!(kernel.backends(), [staged.clone(), busy, "vol-mc".to_owned()]);
        let left: Vec<String> = states.all().unwrap().into_iter().map(|s| s.volume_id).collect();
        assert_eq!(left, [staged]);
    }

    fn settings(node_id: &str) -> crate::volumes::Settings {
        crate::volumes::Settings {
            node_id: node_id.into(),
            connections: 1,
            timeout: Duration::from_secs(30),
            dead_conn_timeout: Duration::from_secs(120),
        }
    }

    /// Two plugins on one kernel (node ids a and b, as in the VM's shared
    /// raw block scenario) stage the same volume: each attaches a device of
    /// its own and finds only that one; a restart of either leaves the
    /// other's device alone. Devices an older version named by the volume id
    /// alone are still its own: healed in place when a state (format 1)
    /// claims them, disconnected when none does.
    #[tokio::test]
    async fn plugins_sharing_a_kernel_keep_to_their_own_devices_and_older_ones() {
        use crate::volumes::Volumes;
        let tmp = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::default());
        let (dir_a, dir_b) =
            (StateDir::open(tmp.path().join("a")).unwrap(), StateDir::open(tmp.path().join("b")).unwrap());
        let a = Volumes::new(Arc::clone(&kernel), dir_a.clone(), settings("node-a"));
        let b = Volumes::new(Arc::clone(&kernel), dir_b.clone(), settings("node-b"));
        let shared = id('5');
        let context = PublishContext {
            nbd_uri: csi_proto::contract::NbdUri::parse("nbd://127.0.0.1:1/x").unwrap(),
            read_only: false,
        };
        let on_a = a.stage(&shared, &context, &tmp.path().join("stg-a"), &Access::Block).await.unwrap();
        let on_b = b.stage(&shared, &context, &tmp.path().join("stg-b"), &Access::Block).await.unwrap();
        assert_ne!(on_a, on_b, "node b attaches a device of its own");
        assert_eq!(kernel.backends(), [format!("{shared}@node-a"), format!("{shared}@node-b")]);
        assert_eq!(a.condition(&shared).await.unwrap().0, Some(on_a));
        assert_eq!(b.condition(&shared).await.unwrap().0, Some(on_b));
        // Staging again (kubelet's retry) finds the same device.
        assert_eq!(b.stage(&shared, &context, &tmp.path().join("stg-b"), &Access::Block).await.unwrap(), on_b);

        let add = |backend: String| {
            let mut devices = kernel.devices.lock().unwrap();
            let index = (0..).find(|i| !devices.iter().any(|d| d.0 == *i)).unwrap();
            devices.push((index, backend, false));
        };
        let (shared_a, shared_b) = (format!("{shared}@node-a"), format!("{shared}@node-b"));

        // Each plugin restarts: its own unclaimed device goes, the other
        // node's devices stay, claimed or not.
        let (lost_a, lost_b) = (format!("{}@node-a", id('1')), format!("{}@node-b", id('2')));
        add(lost_a.clone());
        add(lost_b.clone());
        let healer_a = Arc::new(Healer::new(Arc::clone(&kernel), dir_a.clone()).with_node_id("node-a"));
        healer_a.reconcile().await.unwrap();
        assert_eq!(kernel.backends(), [shared_a.clone(), shared_b.clone(), lost_b]);
        let healer_b = Arc::new(Healer::new(Arc::clone(&kernel), dir_b.clone()).with_node_id("node-b"));
        healer_b.reconcile().await.unwrap();
        assert_eq!(kernel.backends(), [shared_a.clone(), shared_b.clone()]);

        // Upgraded in place: a device an older version attached under the
        // volume id alone, claimed by its state (no identifier recorded), is
        // healed in place, not attached again; an unclaimed one goes.
        let (older, older_lost) = (id('3'), id('4'));
        let older_state = state(&older, Phase::Staged, PathBuf::new());
        assert_eq!(older_state.backend_id, None);
        dir_a.save(&older_state).unwrap();
        add(older.clone());
        add(older_lost);
        healer_a.reconcile().await.unwrap();
        healer_a.heal(&older_state).await.unwrap();
        assert_eq!(kernel.backends(), [shared_a, shared_b, older.clone()]);
        assert_eq!(dir_a.load(&older).unwrap().unwrap().backend_id(), older);
    }

    #[tokio::test]
    async fn a_vanished_device_is_attached_again_and_recorded() {
        let tmp = tempfile::tempdir().unwrap();
        let states = StateDir::open(tmp.path().join("state")).unwrap();
        let vol = id('e');
        let mut s = state(&vol, Phase::Staged, PathBuf::new());
        s.index = Some(7);
        states.save(&s).unwrap();
        let kernel = Arc::new(FakeKernel::with(&[(0, "other", true)]));
        let healer = Healer::new(Arc::clone(&kernel), states.clone());
        healer.heal(&s).await.unwrap();
        assert_eq!(kernel.find(&vol).unwrap(), Some(1));
        assert_eq!(states.load(&vol).unwrap().unwrap().index, Some(1));
        // An unstaged volume is never attached again.
        states.save(&VolumeState { phase: Phase::Unstaging, ..s.clone() }).unwrap();
        kernel.detach(1).await.unwrap();
        healer.heal(&s).await.unwrap();
        assert_eq!(kernel.find(&vol).unwrap(), None);
    }

    /// Only a heal that handed the device sockets (or attached it again)
    /// counts as a reconnect: not one that failed, nor one of a volume no
    /// longer staged.
    #[tokio::test]
    async fn reconnects_are_counted_when_healing_succeeds() {
        let tmp = tempfile::tempdir().unwrap();
        let states = StateDir::open(tmp.path().join("state")).unwrap();
        let (vol, broken, gone) = (id('h'), id('i'), id('j'));
        let staged = state(&vol, Phase::Staged, PathBuf::new());
        let bad_uri = VolumeState { uri: "nbd://".into(), ..state(&broken, Phase::Staged, PathBuf::new()) };
        states.save(&staged).unwrap();
        states.save(&bad_uri).unwrap();
        let kernel = Arc::new(FakeKernel::with(&[(0, &vol, true), (1, &broken, true)]));
        let health = Arc::new(Health::default());
        let healer = Healer::new(kernel, states.clone()).with_health(Arc::clone(&health));
        healer.heal(&staged).await.unwrap();
        healer.heal(&staged).await.unwrap();
        assert!(healer.heal(&bad_uri).await.is_err());
        healer.heal(&state(&gone, Phase::Staged, PathBuf::new())).await.unwrap();
        assert_eq!((health.reconnects(&vol), health.reconnects(&broken), health.reconnects(&gone)), (2, 0, 0));
    }

    /// Unstaging works from the device and the staging path: a state file
    /// that no longer loads does not keep the volume staged forever.
    #[tokio::test]
    async fn unstage_goes_through_when_the_state_file_is_corrupt() {
        let tmp = tempfile::tempdir().unwrap();
        let states = StateDir::open(tmp.path().join("state")).unwrap();
        let vol = id('f');
        states.save(&state(&vol, Phase::Staged, tmp.path().join("staging"))).unwrap();
        let file = std::fs::read_dir(tmp.path().join("state")).unwrap().next().unwrap().unwrap().path();
        std::fs::write(&file, b"{\"format\":1,").unwrap();
        assert!(states.load(&vol).is_err());
        let settings = settings("node-a");
        let volumes = crate::volumes::Volumes::new(Arc::new(FakeKernel::default()), states.clone(), settings);
        volumes.unstage(&vol, &tmp.path().join("staging")).await.unwrap();
        assert!(!file.exists());
    }

    /// The health a healer keeps is what NodeGetVolumeStats reports when
    /// both are given the same one, as `serve` does.
    #[tokio::test]
    async fn volumes_report_the_health_their_healer_keeps() {
        let tmp = tempfile::tempdir().unwrap();
        let states = StateDir::open(tmp.path().join("state")).unwrap();
        let vol = id('g');
        // An nbdUri that does not parse: healing fails at once.
        let broken = VolumeState { uri: "nbd://".into(), ..state(&vol, Phase::Staged, PathBuf::new()) };
        states.save(&broken).unwrap();
        let kernel = Arc::new(FakeKernel::with(&[(0, &vol, true)]));
        let health = Arc::new(Health::default());
        let healer = Healer::new(Arc::clone(&kernel), states.clone()).with_health(Arc::clone(&health));
        let settings = settings("node-a");
        let volumes = crate::volumes::Volumes::new(kernel, states, settings).with_health(health);
        assert!(!volumes.condition(&vol).await.unwrap().1.0, "healthy before healing fails");
        assert!(healer.heal(&broken).await.is_err());
        let (device, (abnormal, message)) = volumes.condition(&vol).await.unwrap();
        assert_eq!(device, Some(0));
        assert!(abnormal && message.contains("nbdUri"), "{message}");
    }
}
