//! Self-healing: when the kernel reports a dead link (LINK_DEAD multicast)
//! or a check finds a device gone, reconnect — resolve the host again, redo
//! the handshake — and hand fresh sockets over with RECONFIGURE, within the
//! dead-connection timeout, so the application sees no I/O error. The
//! kernel holds the sockets, so the plugin itself may restart at any time.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::attach::Attacher;
use crate::error::Result;
use crate::events::Events;
use crate::state::{Phase, StateDir, VolumeState};
use crate::sys::mount;

#[derive(Debug)]
pub struct Healer<A> {
    attacher: Arc<A>,
    states: StateDir,
    in_flight: Mutex<HashSet<String>>,
    /// Where a volume healing gave up on is reported (off unless set).
    pub events: Events,
}

/// Pause between reconnect attempts.
const RETRY: Duration = Duration::from_millis(500);

impl<A: Attacher + 'static> Healer<A> {
    pub fn new(attacher: Arc<A>, states: StateDir) -> Self {
        Self { attacher, states, in_flight: Mutex::new(HashSet::new()), events: Events::default() }
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
        let result = self.heal_inner(state).await;
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).remove(&state.volume_id);
        result
    }

    async fn heal_inner(&self, state: &VolumeState) -> Result<()> {
        let spec = state.spec()?;
        let deadline = Instant::now() + spec.dead_conn_timeout.max(Duration::from_secs(5));
        loop {
            // Unstaging may have begun meanwhile: never attach or hand
            // sockets to a volume that is no longer staged.
            if !self.states.load(&state.volume_id)?.is_some_and(|s| s.phase == Phase::Staged) {
                tracing::info!(volume = %state.volume_id, "no longer staged; not healing");
                return Ok(());
            }
            let Some(index) = self.attacher.find(&state.volume_id)? else {
                tracing::warn!(volume = %state.volume_id, "device vanished; attaching again");
                let attached = self.attacher.attach(&spec).await?;
                let mut updated = state.clone();
                updated.index = Some(attached.index);
                return self.states.save(&updated);
            };
            match self.attacher.reconnect(index, &spec).await {
                Ok(n) => {
                    tracing::info!(volume = %state.volume_id, index, sockets = n, "reconnected");
                    return Ok(());
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(volume = %state.volume_id, error = %e.chain(), "reconnect failed; retrying");
                    tokio::time::sleep(RETRY).await;
                }
                Err(e) => {
                    tracing::error!(volume = %state.volume_id, error = %e.chain(), "giving up reconnecting");
                    self.events.connection_lost(&state.volume_id, &spec.uri.export, &e);
                    return Err(e);
                }
            }
        }
    }

    /// Start-up: staged volumes get fresh sockets offered (dead ones are
    /// replaced, live ones kept) or are attached again; volumes caught in
    /// the middle of attaching or unstaging are rolled back, so kubelet's
    /// retry starts clean and no device with our identifier is left unowned.
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
                    if let Some(m) = mount::mount_at(&state.staging_path)? {
                        tracing::info!(volume = %state.volume_id, target = %m.target.display(), "rolling back mount");
                        mount::unmount(&state.staging_path)?;
                    }
                    if let Some(index) = self.attacher.find(&state.volume_id)? {
                        tracing::info!(volume = %state.volume_id, index, "rolling back interrupted attach/detach");
                        self.attacher.detach(index)?;
                    }
                    self.states.remove(&state.volume_id)?;
                }
            }
        }
        Ok(())
    }

    /// Forever: heals on LINK_DEAD, and checks every `interval` that each
    /// staged volume still has its device.
    pub async fn run(self: Arc<Self>, mut dead: mpsc::UnboundedReceiver<u32>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        loop {
            let targets: Vec<VolumeState> = tokio::select! {
                Some(index) = dead.recv() => {
                    let backend = self.attacher.list().ok().and_then(|l| l.into_iter().find(|(i, _)| *i == index));
                    let Some((_, backend)) = backend else { continue };
                    tracing::warn!(index, volume = %backend, "kernel reports a dead link");
                    self.states.load(&backend).ok().flatten().into_iter().collect()
                }
                _ = tick.tick() => {
                    let staged = self.states.all().unwrap_or_default().into_iter().filter(|s| s.phase == Phase::Staged);
                    staged.filter(|s| !matches!(self.attacher.find(&s.volume_id), Ok(Some(_)))).collect()
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
