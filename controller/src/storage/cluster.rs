//! Cluster mode: volumes live on storage nodes, each run by an agent, and
//! the controller only reads and writes objects. It places a volume
//! ([`placement`]), creates its NbdVolume, changes the spec (size, the
//! nodes it is published to) with optimistic concurrency, and answers a
//! CSI call once the agent's status says the object's generation is in
//! effect. It never touches volume data.
//!
//! - Names are derived from CSI request names ([`objects::volume_id`]), so
//!   a retry, or a second controller replica serving the same call, meets
//!   the object the first one created (409) and compares specs: the same
//!   request is answered from it, a different one is ALREADY_EXISTS.
//! - Waits look at one watch of every NbdVolume for the whole process
//!   ([`Watched`]), and placement reads storage nodes, Leases and volumes
//!   from such watches, not from three LISTs per CreateVolume. Placements
//!   take turns only to choose a node; each then records its choice
//!   ([`InFlight`]) for the others to count, and its POST and wait run
//!   beside theirs.
//! - Waits are bounded by `--storage-timeout`. Running out is UNAVAILABLE,
//!   not DEADLINE_EXCEEDED: that code is the caller's own deadline, while
//!   this one says the storage node has not answered yet and a retry (which
//!   meets the same object) may succeed. The object is left in place for
//!   that retry.
//! - An agent that refuses a new volume outright (no room any more, say:
//!   the free space it reports is a little stale) stores nothing; its
//!   object is then deleted so that the retry places the volume afresh.
//! - An API server that cannot be reached is UNAVAILABLE before anything is
//!   written, and a write either happens whole or not at all. Each request
//!   is bounded by `--storage-timeout` too (`Cluster::answer`): a server
//!   that accepts connections but does not answer (stopped, overloaded, a
//!   network that drops packets) is as unreachable as one that refuses
//!   them, instead of holding the call until TCP gives up.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use agent::resources::{
    AccessMode, AccessType, ExportKey, LEASE_DURATION, NbdSnapshot, NbdSnapshotSpec, NbdStorageNode, NbdVolume,
    PublishedTo, SnapshotPhase, VolumePhase,
};
use agent::{ExportTls, Source};
use csi_proto::contract::{NbdUri, PublishContext};
use csi_proto::{CapacityRange, Snapshot, Volume};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::await_condition;
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::FIELD_MANAGER;
use super::in_flight::InFlight;
use super::objects::{self, Progress, VolumeRequest, snapshot_progress, volume_progress};
use super::placement::{self, Selector, StorageNode};
use super::watched::{Seen, Watched};
use crate::csi::{capacity, check_source_access, is_reader_only, is_single_node};
use crate::error::{Error, Kind, Result};

/// How long a placement keeps its reservation ([`InFlight`]) waiting for
/// the watch to bring the volume it just created.
const PLACED_SEEN: Duration = Duration::from_secs(2);

/// Spec writes that lost a race (409) are tried again this many times.
const CONFLICT_RETRIES: usize = 5;

/// The cluster backend.
pub struct Cluster {
    client: kube::Client,
    /// Where the agents' Leases and the export-key Secret live.
    namespace: String,
    export_key: ExportKey,
    /// How long a call waits for an agent's status.
    timeout: Duration,
    /// Every NbdVolume, watched once for the whole process (started at the
    /// first wait): what CreateVolume, ControllerPublishVolume and the
    /// others wait on ([`Watched`]).
    volumes_seen: tokio::sync::OnceCell<Watched<NbdVolume>>,
    /// The storage nodes and their agents' Leases, watched the same way for
    /// placement.
    storage_nodes_seen: tokio::sync::OnceCell<Watched<NbdStorageNode>>,
    leases_seen: tokio::sync::OnceCell<Watched<Lease>>,
    /// Held from reading the storage nodes' room to recording the choice
    /// in `in_flight`: placements in this process see each other's
    /// volumes. Without it, a burst of CreateVolume calls (the provisioner
    /// sends them in parallel) all read the same room and all pick the
    /// same node.
    placing: tokio::sync::Mutex<()>,
    /// Volumes placed and not yet in the watch, counted by placement until
    /// they are, so that the lock above is not held across a POST.
    in_flight: InFlight,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("namespace", &self.namespace).field("timeout", &self.timeout).finish()
    }
}

/// What a look at something being waited for found.
enum Step<T> {
    Done(T),
    Waiting(String),
}

fn step<T>(value: T, progress: Progress) -> Result<Step<T>> {
    match progress {
        Progress::Done => Ok(Step::Done(value)),
        Progress::Waiting(why) => Ok(Step::Waiting(why)),
        Progress::Failed(e) => Err(e),
    }
}

fn is_deleting<K: Resource>(object: &K) -> bool {
    object.meta().deletion_timestamp.is_some()
}

/// When an agent's Lease was last renewed (Unix milliseconds) and for how
/// long (milliseconds, the agents' [`LEASE_DURATION`] when it does not
/// say); no Lease: never renewed.
fn lease_renewal(lease: Option<&Lease>) -> (Option<i64>, i64) {
    let spec = lease.and_then(|l| l.spec.clone()).unwrap_or_default();
    let duration =
        spec.lease_duration_seconds.map_or(LEASE_DURATION.as_millis() as i64, |s| i64::from(s).saturating_mul(1000));
    (spec.renew_time.map(|t| t.0.as_millisecond()), duration)
}

/// The objects whose agent is the one of their storage node.
trait OnStorageNode {
    fn storage_node(&self) -> &str;
}

impl OnStorageNode for NbdVolume {
    fn storage_node(&self) -> &str {
        &self.spec.storage_node
    }
}

impl OnStorageNode for NbdSnapshot {
    fn storage_node(&self) -> &str {
        &self.spec.storage_node
    }
}

/// PatchParams and PostParams under the controller's field manager.
fn patch_params() -> PatchParams {
    PatchParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..Default::default() }
}

fn post_params() -> PostParams {
    PostParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..Default::default() }
}

impl Cluster {
    pub fn new(client: kube::Client, namespace: String, export_key: ExportKey, timeout: Duration) -> Self {
        Self {
            client,
            namespace,
            export_key,
            timeout,
            volumes_seen: tokio::sync::OnceCell::new(),
            storage_nodes_seen: tokio::sync::OnceCell::new(),
            leases_seen: tokio::sync::OnceCell::new(),
            placing: tokio::sync::Mutex::new(()),
            in_flight: InFlight::default(),
        }
    }

    fn volumes(&self) -> Api<NbdVolume> {
        Api::all(self.client.clone())
    }

    fn snapshots(&self) -> Api<NbdSnapshot> {
        Api::all(self.client.clone())
    }

    /// The API server's answer to one request (not a watch), or
    /// UNAVAILABLE when none came within `--storage-timeout`. The client
    /// itself has no read timeout (its watches stay open for minutes), so
    /// without this bound a server that stopped answering would hold the
    /// call, and the placement lock with it, until TCP gives up.
    async fn answer<T>(&self, what: &str, request: impl Future<Output = kube::Result<T>>) -> Result<kube::Result<T>> {
        tokio::time::timeout(self.timeout, request).await.map_err(|_elapsed| {
            Error::unavailable(format!(
                "{what}: the API server did not answer within {:?}; the call can be retried",
                self.timeout
            ))
        })
    }

    /// One request, its failure as the CSI error it stands for
    /// ([`Error::kube`]); bounded as [`Self::answer`] is.
    async fn request<T>(&self, what: &str, request: impl Future<Output = kube::Result<T>>) -> Result<T> {
        self.answer(what, request).await?.map_err(|e| Error::kube(what, e))
    }

    async fn get<K>(&self, api: &Api<K>, name: &str) -> Result<Option<K>>
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    {
        self.request(&format!("reading {name}"), api.get_opt(name)).await
    }

    /// Watches object `name` until `judge` says it is done or failed, at
    /// most `--storage-timeout`; then UNAVAILABLE with the reason it gave
    /// last, and why its storage node's agent may not be answering when
    /// that can be told ([`Self::agent_absence`]). A watch, not polling:
    /// the call answers as soon as the agent writes the status. For the
    /// rarer waits (snapshots, deletions); volumes, on every CreateVolume
    /// and publish, wait on the process's one watch ([`Self::wait_volume_seen`]).
    async fn wait_for<K, T>(
        &self,
        api: &Api<K>,
        name: &str,
        what: &str,
        judge: impl Fn(Option<&K>) -> Result<Step<T>>,
    ) -> Result<T>
    where
        K: Resource + OnStorageNode + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        let settled = |object: Option<&K>| !matches!(judge(object), Ok(Step::Waiting(_)));
        match tokio::time::timeout(self.timeout, await_condition(api.clone(), name, settled)).await {
            Ok(Ok(object)) => {
                if let Step::Done(value) = judge(object.as_ref())? {
                    return Ok(value);
                }
            }
            Ok(Err(e)) => return Err(Error::unavailable(format!("{what}: watching {name} failed: {e}"))),
            Err(_elapsed) => {}
        }
        self.out_of_time(api, name, what, judge).await
    }

    /// A wait ran out of time: one last look at object `name`, for the
    /// answer or for the reason (and why its storage node's agent may not
    /// be answering, when that can be told).
    async fn out_of_time<K, T>(
        &self,
        api: &Api<K>,
        name: &str,
        what: &str,
        judge: impl Fn(Option<&K>) -> Result<Step<T>>,
    ) -> Result<T>
    where
        K: Resource + OnStorageNode + Clone + DeserializeOwned + std::fmt::Debug,
    {
        let last = self.get(api, name).await?;
        match judge(last.as_ref())? {
            Step::Done(value) => Ok(value),
            Step::Waiting(why) => {
                let absence = match &last {
                    Some(object) => self.agent_absence(object.storage_node()).await,
                    None => None,
                };
                let absence = absence.map(|a| format!("; {a}")).unwrap_or_default();
                Err(Error::unavailable(format!(
                    "{what}: not done within {:?} ({why}{absence}); the call can be retried",
                    self.timeout
                )))
            }
        }
    }

    /// Why no agent may be acting on storage node `node`'s objects: it has
    /// no NbdStorageNode (no agent ever ran there: an object naming it was
    /// made by hand, say), or its agent's Lease expired (the agent is down
    /// or cut off). `None` when its agent looks alive, or when that cannot
    /// be read: this only makes a failure's message clearer.
    async fn agent_absence(&self, node: &str) -> Option<String> {
        let nodes = Api::<NbdStorageNode>::all(self.client.clone());
        let leases = Api::<Lease>::namespaced(self.client.clone(), &self.namespace);
        let (storage, lease) = tokio::join!(self.get(&nodes, node), self.get(&leases, node));
        if storage.ok()?.is_none() {
            return Some(format!("storage node {node} has no NbdStorageNode: no agent runs there"));
        }
        let (renewed, duration) = lease_renewal(lease.ok()?.as_ref());
        let now = k8s_openapi::jiff::Timestamp::now().as_millisecond();
        if placement::is_live(renewed, duration, now) {
            return None;
        }
        let last = match renewed.and_then(|ms| k8s_openapi::jiff::Timestamp::from_millisecond(ms).ok()) {
            Some(at) => format!("last renewed at {at}"),
            None => "never renewed".to_owned(),
        };
        Some(format!(
            "the Lease of storage node {node}'s agent expired ({last}, for {} s): the agent is not running or cannot \
             reach the API server",
            duration / 1000
        ))
    }

    /// Like [`Self::wait_for`], on the process's one watch of every volume
    /// ([`Watched`]) instead of a watch of its own: at or past
    /// `generation` (the one the caller wrote or read), volume `id` as
    /// `judge` wants it. A volume the store does not have (yet) is waited
    /// for; when the time is up, one read says whether it is gone.
    async fn wait_volume_seen<T>(
        &self,
        id: &str,
        generation: Option<i64>,
        what: &str,
        judge: impl Fn(Option<&NbdVolume>) -> Result<Step<T>>,
    ) -> Result<T> {
        let watched = self.watched_volumes().await;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let seen = watched
            .until(id, generation, deadline, |seen| match seen {
                Seen::Object(object) => !matches!(judge(Some(object)), Ok(Step::Waiting(_))),
                Seen::Absent => false,
            })
            .await;
        if let Seen::Object(object) = &seen
            && let Step::Done(value) = judge(Some(object))?
        {
            return Ok(value);
        }
        self.out_of_time(&self.volumes(), id, what, judge).await
    }

    async fn watched_volumes(&self) -> &Watched<NbdVolume> {
        self.volumes_seen.get_or_init(|| async { Watched::spawn(self.volumes()) }).await
    }

    /// Every object `watched` has, or UNAVAILABLE when its first list did
    /// not come within `--storage-timeout` (the API server is away).
    async fn all_of<K>(&self, watched: &Watched<K>, what: &str) -> Result<Vec<std::sync::Arc<K>>>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        watched.all(deadline).await.ok_or_else(|| {
            Error::unavailable(format!(
                "{what}: the API server did not answer within {:?}; the call can be retried",
                self.timeout
            ))
        })
    }

    /// Waits until volume `id`'s generation `generation` is in effect.
    async fn wait_volume(&self, id: &str, generation: Option<i64>) -> Result<NbdVolume> {
        self.wait_volume_seen(id, generation, &format!("waiting for volume {id}"), |object| match object {
            None => Err(Error::not_found(format!("volume {id} is gone"))),
            Some(object) => step(object.clone(), volume_progress(object)),
        })
        .await
    }

    /// Waits until volume `id`'s access, as its generation `generation`
    /// says, is in effect, whether or not it serves.
    async fn wait_access(&self, id: &str, generation: Option<i64>) -> Result<Option<NbdVolume>> {
        let what = format!("waiting for the access to volume {id}");
        self.wait_volume_seen(id, generation, &what, |object| match object {
            None => Ok(Step::Done(None)),
            Some(object) => step(Some(object.clone()), objects::access_progress(object)),
        })
        .await
    }

    async fn wait_snapshot(&self, id: &str) -> Result<NbdSnapshot> {
        self.wait_for(&self.snapshots(), id, &format!("waiting for snapshot {id}"), |object| match object {
            None => Err(Error::not_found(format!("snapshot {id} is gone"))),
            Some(object) => step(object.clone(), snapshot_progress(object)),
        })
        .await
    }

    /// Deletes object `name` (if there) and waits until it is gone: its
    /// agent removes the data first, under its finalizer.
    async fn delete_and_wait<K>(&self, api: &Api<K>, what: &str, name: &str) -> Result<()>
    where
        K: Resource + OnStorageNode + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        let deleting = format!("deleting {what} {name}");
        match self.answer(&deleting, api.delete(name, &DeleteParams::default())).await? {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(()),
            Err(e) => return Err(Error::kube(&deleting, e)),
        }
        let waiting = format!("waiting for {what} {name} to be deleted by its agent");
        self.wait_for(api, name, &waiting, |object| {
            Ok(match object {
                None => Step::Done(()),
                Some(_) => Step::Waiting("its agent has not removed it yet".into()),
            })
        })
        .await
    }

    /// Writes `spec` (a JSON merge patch of the spec) only if the object is
    /// still at `object`'s resourceVersion: ABORTED when someone changed it
    /// since it was read.
    async fn patch_spec<K>(&self, api: &Api<K>, object: &K, spec: serde_json::Value) -> Result<K>
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    {
        let name = object.meta().name.clone().unwrap_or_default();
        let version = object.meta().resource_version.clone().ok_or_else(|| {
            Error::internal(format!("{name} was read without a resourceVersion; it cannot be changed safely"))
        })?;
        let patch = serde_json::json!({ "metadata": { "resourceVersion": version }, "spec": spec });
        self.request(&format!("changing the spec of {name}"), api.patch(&name, &patch_params(), &Patch::Merge(&patch)))
            .await
    }

    /// Every storage node as placement sees it: liveness from its Lease,
    /// room from its status and the volumes placed on it, and, when
    /// `selector` needs them, its Node's labels.
    async fn storage_nodes(&self, selector: &Selector) -> Result<Vec<StorageNode>> {
        let list = ListParams::default();
        let (client, namespace) = (self.client.clone(), self.namespace.clone());
        let nodes = self.storage_nodes_seen.get_or_init(|| async { Watched::spawn(Api::all(client)) }).await;
        let nodes = self.all_of(nodes, "listing storage nodes").await?;
        let client = self.client.clone();
        let leases =
            self.leases_seen.get_or_init(|| async { Watched::spawn(Api::namespaced(client, &namespace)) }).await;
        let leases = self.all_of(leases, "listing the agents' Leases").await?;
        let volumes = self.all_of(self.watched_volumes().await, "listing volumes").await?;
        let mut placed: HashMap<String, u64> = HashMap::new();
        for v in &volumes {
            let sum = placed.entry(v.spec.storage_node.clone()).or_default();
            *sum = sum.saturating_add(v.spec.size_bytes);
        }
        let known: HashSet<&str> = volumes.iter().filter_map(|v| v.metadata.name.as_deref()).collect();
        self.in_flight.add_unseen(&mut placed, |id| known.contains(id));
        let mut labels: HashMap<String, BTreeMap<String, String>> = HashMap::new();
        if !selector.is_empty() {
            let found = self
                .request("listing Nodes for storageNodeSelector", Api::<Node>::all(self.client.clone()).list(&list))
                .await?;
            labels = found.items.into_iter().map(|n| (n.name_any(), n.labels().clone())).collect();
        }
        let renewed: HashMap<String, (Option<i64>, i64)> =
            leases.iter().map(|lease| (lease.name_any(), lease_renewal(Some(lease)))).collect();
        let now = k8s_openapi::jiff::Timestamp::now().as_millisecond();
        Ok(nodes
            .iter()
            .map(|node| {
                let name = node.name_any();
                let (renew, duration) = renewed.get(&name).copied().unwrap_or_else(|| lease_renewal(None));
                StorageNode {
                    // A node whose address does not read cannot serve.
                    live: placement::is_live(renew, duration, now) && node.endpoint().is_ok(),
                    free_bytes: node.status.as_ref().and_then(|s| s.free_bytes),
                    placed_bytes: placed.get(&name).copied().unwrap_or(0),
                    labels: labels.get(&name).cloned().unwrap_or_default(),
                    serves_tls: node.status.as_ref().is_some_and(|s| s.serves_tls),
                    name,
                }
            })
            .collect())
    }

    // ------------------------------------------------------------ volumes

    /// CreateVolume: the volume of `request`, placed, created and served.
    pub async fn create_volume(&self, request: &VolumeRequest, selector: &Selector) -> Result<Volume> {
        let id = objects::volume_id(&request.name);
        let api = self.volumes();
        // A retry, or the same call on another replica: the watch has it,
        // then the API server says how it is now. Otherwise straight to
        // the create, whose conflict tells an object the watch lacked.
        if self.watched_volumes().await.get(&id).is_some()
            && let Some(existing) = self.get(&api, &id).await?
        {
            return self.existing_volume(existing, request).await;
        }
        let (source_node, minimum, source_tls) = self.source(request).await?;
        let size =
            capacity(Some(&CapacityRange { required_bytes: request.required, limit_bytes: request.limit }), minimum)?;
        // A clone or restore never speaks less TLS than its source.
        let tls = request.tls.max(source_tls);
        let needs_tls = !tls.is_off();
        let (node, reservation) = {
            let _placing = self.placing.lock().await;
            let nodes = self.storage_nodes(selector).await?;
            let node = match source_node {
                Some(node) => {
                    placement::check_source_node(&nodes, &node, size, needs_tls)?;
                    node
                }
                None => placement::place(&nodes, size, selector, needs_tls)?.name.clone(),
            };
            let reservation = self.in_flight.reserve(&id, &node, size);
            (node, reservation)
        };
        let object = objects::new_volume(&id, objects::volume_spec(request, &node, size, tls));
        let created = self.answer(&format!("creating volume {id}"), api.create(&post_params(), &object)).await;
        if let Ok(Ok(created)) = &created {
            // Placements count this volume from the reservation until the
            // watch has brought it: keep it until then (a few
            // milliseconds; bounded, as a lag only skews the spread).
            let deadline = tokio::time::Instant::now() + self.timeout.min(PLACED_SEEN);
            let seen = self.watched_volumes().await;
            seen.until(&id, created.metadata.generation, deadline, |seen| matches!(seen, Seen::Object(_))).await;
        }
        drop(reservation);
        let generation = match created? {
            Ok(created) => {
                tracing::info!(volume.id = %id, storage_node = %node, size, "volume object created");
                created.metadata.generation
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                // Another replica, or an earlier try, was first.
                let existing = self.get(&api, &id).await?.ok_or_else(|| {
                    Error::new(Kind::Aborted, format!("volume {id} was created and deleted meanwhile; retry"))
                })?;
                return self.existing_volume(existing, request).await;
            }
            Err(e) => return Err(Error::kube(&format!("creating volume {id}"), e)),
        };
        self.finish_create(&id, generation).await
    }

    async fn existing_volume(&self, existing: NbdVolume, request: &VolumeRequest) -> Result<Volume> {
        let id = existing.name_any();
        if is_deleting(&existing) {
            return Err(Error::new(Kind::Aborted, format!("volume {id} is being deleted; retry once it is gone")));
        }
        if !objects::satisfies(&existing.spec, request) {
            return Err(Error::exists(format!("volume {:?} exists as {id} with other properties", request.name)));
        }
        self.finish_create(&id, existing.metadata.generation).await
    }

    /// Waits for a new volume to be served. When its agent refused it
    /// outright (still Pending: nothing stored), the object is deleted so
    /// that the retry places it afresh.
    async fn finish_create(&self, id: &str, generation: Option<i64>) -> Result<Volume> {
        let error = match self.wait_volume(id, generation).await {
            Ok(object) => return Ok(objects::volume_message(&object)),
            Err(e) if matches!(e.kind(), Kind::Unavailable | Kind::NotFound) => return Err(e),
            Err(e) => e,
        };
        let api = self.volumes();
        let pending = self
            .get(&api, id)
            .await
            .ok()
            .flatten()
            .is_some_and(|o| o.status.is_some_and(|s| s.phase == VolumePhase::Pending));
        if pending
            && let Err(e) =
                self.request(&format!("deleting volume {id}"), api.delete(id, &DeleteParams::default())).await
        {
            tracing::warn!(volume.id = %id, error = %e, "deleting a volume object its agent refused failed");
        }
        Err(error)
    }

    /// The storage node of a clone's or restore's source, the size the new
    /// volume needs at least, and the TLS its source speaks.
    async fn source(&self, request: &VolumeRequest) -> Result<(Option<String>, u64, ExportTls)> {
        match &request.source {
            None => Ok((None, 0, ExportTls::Off)),
            Some(Source::Volume(id)) => {
                let found = if agent::is_volume_id(id) { self.get(&self.volumes(), id).await? } else { None };
                let source = found.ok_or_else(|| Error::not_found(format!("source volume {id} not found")))?;
                let block = source.spec.access_type == AccessType::Block;
                check_source_access(&format!("volume {id}"), block, request.caps.block)?;
                Ok((Some(source.spec.storage_node.clone()), source.spec.size_bytes, source.spec.tls))
            }
            Some(Source::Snapshot(id)) => {
                let found = if agent::is_snapshot_id(id) { self.get(&self.snapshots(), id).await? } else { None };
                let source = found.ok_or_else(|| Error::not_found(format!("source snapshot {id} not found")))?;
                let status = source.status.clone().unwrap_or_default();
                if status.phase != SnapshotPhase::Ready {
                    return Err(Error::unavailable(format!("source snapshot {id} is not cut yet")));
                }
                // Unknown (an old snapshot): assume block, the safe side.
                check_source_access(
                    &format!("snapshot {id}"),
                    status.source_block.unwrap_or(true),
                    request.caps.block,
                )?;
                Ok((Some(source.spec.storage_node.clone()), status.size_bytes.unwrap_or(0), status.source_tls))
            }
        }
    }

    /// DeleteVolume: the object deleted and gone (its agent deletes the
    /// data first). A volume still published is FAILED_PRECONDITION.
    pub async fn delete_volume(&self, id: &str) -> Result<()> {
        let api = self.volumes();
        let Some(object) = (if agent::is_volume_id(id) { self.get(&api, id).await? } else { None }) else {
            return Ok(());
        };
        if !is_deleting(&object) && !object.spec.published_to.is_empty() {
            let nodes = objects::published_nodes(&object);
            return Err(Error::precondition(format!("volume is still published to {nodes:?}")));
        }
        self.delete_and_wait(&api, "volume", id).await
    }

    /// The volume object `id`; NOT_FOUND when there is none.
    pub async fn volume(&self, id: &str) -> Result<NbdVolume> {
        let found = if agent::is_volume_id(id) { self.get(&self.volumes(), id).await? } else { None };
        found.ok_or_else(|| Error::not_found(format!("volume {id} not found")))
    }

    /// Every volume object, in id order.
    pub async fn list_volumes(&self) -> Result<Vec<NbdVolume>> {
        let mut items = self.request("listing volumes", self.volumes().list(&ListParams::default())).await?.items;
        items.sort_by_key(|o| o.name_any());
        Ok(items)
    }

    /// ControllerExpandVolume: the spec's size raised to what `range` asks
    /// (never lowered) and in effect; the size served.
    pub async fn expand_volume(&self, id: &str, range: &CapacityRange) -> Result<u64> {
        let api = self.volumes();
        let mut generation = None;
        for attempt in 0.. {
            let object = self.volume(id).await?;
            generation = object.metadata.generation;
            let size = capacity(Some(range), object.spec.size_bytes)?;
            if size <= object.spec.size_bytes {
                break;
            }
            match self.patch_spec(&api, &object, serde_json::json!({ "sizeBytes": size })).await {
                Ok(patched) => {
                    generation = patched.metadata.generation;
                    break;
                }
                Err(e) if e.kind() == Kind::Aborted && attempt < CONFLICT_RETRIES => continue,
                Err(e) => return Err(e),
            }
        }
        let object = self.wait_volume(id, generation).await?;
        Ok(object.status.and_then(|s| s.size_bytes).unwrap_or(object.spec.size_bytes))
    }

    /// ControllerPublishVolume: `node` added to the volume's publishedTo
    /// (single-node volumes on one node only), in effect, and the context
    /// the node plugin attaches with: the storage node's address, the
    /// volume's port there, its export name derived from the key.
    pub async fn publish(
        &self,
        id: &str,
        node: &str,
        block: bool,
        mode: i32,
        readonly: bool,
    ) -> Result<HashMap<String, String>> {
        let api = self.volumes();
        let mut generation = None;
        for attempt in 0.. {
            // First as the watch has it: a stale copy only makes the
            // patch conflict, and the next attempt reads the API server.
            let watched = if attempt == 0 { self.watched_volumes().await.get(id) } else { None };
            let object = match watched {
                Some(object) => NbdVolume::clone(&object),
                None => self.volume(id).await?,
            };
            generation = object.metadata.generation;
            if is_deleting(&object) {
                return Err(Error::not_found(format!("volume {id} is being deleted")));
            }
            let spec = &object.spec;
            if (spec.access_type == AccessType::Block) != block {
                let kind = if block { "mount" } else { "block" };
                return Err(Error::invalid(format!("volume was created for {kind} access")));
            }
            let wanted = PublishedTo {
                node: node.to_owned(),
                read_only: readonly || spec.read_only || is_reader_only(mode),
                access_mode: AccessMode::from_csi(mode),
            };
            if let Some(existing) = spec.published_to.iter().find(|p| p.node == node) {
                if *existing == wanted {
                    // A retry: wait for it as the first call did.
                    break;
                }
                return Err(Error::exists(format!("volume is published to {node} with other options")));
            }
            if let Some(other) = spec.published_to.first()
                && (is_single_node(mode) || other.access_mode.is_some_and(|m| is_single_node(m.csi_value())))
            {
                return Err(Error::precondition(format!(
                    "volume is single-node and already published to {}",
                    other.node
                )));
            }
            let mut published = spec.published_to.clone();
            published.push(wanted);
            match self.patch_spec(&api, &object, serde_json::json!({ "publishedTo": published })).await {
                Ok(patched) => {
                    generation = patched.metadata.generation;
                    break;
                }
                Err(e) if e.kind() == Kind::Aborted && attempt < CONFLICT_RETRIES => continue,
                Err(e) => return Err(e),
            }
        }
        let object = self.wait_volume(id, generation).await?;
        let publication = object.spec.published_to.iter().find(|p| p.node == node).ok_or_else(|| {
            Error::new(Kind::Aborted, format!("volume {id} was unpublished from {node} meanwhile; retry"))
        })?;
        let port = object
            .status
            .as_ref()
            .and_then(|s| s.port)
            .ok_or_else(|| Error::unavailable(format!("volume {id} has no port in its status yet")))?;
        let storage_node = &object.spec.storage_node;
        let storage = self
            .get(&Api::<NbdStorageNode>::all(self.client.clone()), storage_node)
            .await?
            .ok_or_else(|| Error::unavailable(format!("storage node {storage_node} has no NbdStorageNode")))?;
        let (address, _) = storage.endpoint().map_err(|e| Error::unavailable(e.to_string()))?;
        // `allowed` stays nbd://: the node attaches in plaintext, as it may.
        let nbd_uri = NbdUri::new(SocketAddr::new(address, port), self.export_key.export_name(id))
            .with_tls(object.spec.tls == ExportTls::Required);
        Ok(PublishContext { nbd_uri, read_only: publication.read_only }.to_map())
    }

    /// ControllerUnpublishVolume: `node` (every node when empty) removed
    /// from the volume's publishedTo, and the connections it had stopped.
    pub async fn unpublish(&self, id: &str, node: &str) -> Result<()> {
        let api = self.volumes();
        if !agent::is_volume_id(id) {
            return Ok(());
        }
        let mut generation = None;
        for attempt in 0.. {
            let Some(object) = self.get(&api, id).await? else { return Ok(()) };
            generation = object.metadata.generation;
            let published = &object.spec.published_to;
            let remaining: Vec<&PublishedTo> =
                published.iter().filter(|p| !node.is_empty() && p.node != node).collect();
            if remaining.len() == published.len() {
                // Already unpublished: a retry waits for the same fence.
                break;
            }
            match self.patch_spec(&api, &object, serde_json::json!({ "publishedTo": remaining })).await {
                Ok(patched) => {
                    generation = patched.metadata.generation;
                    break;
                }
                Err(e) if e.kind() == Kind::Aborted && attempt < CONFLICT_RETRIES => continue,
                Err(e) => return Err(e),
            }
        }
        self.wait_access(id, generation).await.map(drop)
    }

    /// GetCapacity: the free bytes of the live storage nodes `selector`
    /// matches, summed, and the most free on one of them.
    pub async fn capacity(&self, selector: &Selector, needs_tls: bool) -> Result<(u64, u64)> {
        Ok(placement::capacity(&self.storage_nodes(selector).await?, selector, needs_tls))
    }

    // ---------------------------------------------------------- snapshots

    /// CreateSnapshot: a snapshot of `source_volume`, on its storage node,
    /// named after `name`, cut.
    pub async fn create_snapshot(
        &self,
        name: &str,
        source_volume: &str,
        parameters: BTreeMap<String, String>,
    ) -> Result<Snapshot> {
        let id = objects::snapshot_id(name);
        let api = self.snapshots();
        if let Some(existing) = self.get(&api, &id).await? {
            return self.existing_snapshot(existing, name, source_volume).await;
        }
        let source = self.volume(source_volume).await?;
        let spec = NbdSnapshotSpec {
            storage_node: source.spec.storage_node.clone(),
            request_name: name.to_owned(),
            source_volume: source_volume.to_owned(),
            parameters,
        };
        let creating = format!("creating snapshot {id}");
        match self.answer(&creating, api.create(&post_params(), &objects::new_snapshot(&id, spec))).await? {
            Ok(_) => tracing::info!(snapshot.id = %id, "snapshot object created"),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let existing = self.get(&api, &id).await?.ok_or_else(|| {
                    Error::new(Kind::Aborted, format!("snapshot {id} was created and deleted meanwhile; retry"))
                })?;
                return self.existing_snapshot(existing, name, source_volume).await;
            }
            Err(e) => return Err(Error::kube(&creating, e)),
        }
        self.finish_snapshot(&id).await
    }

    async fn existing_snapshot(&self, existing: NbdSnapshot, name: &str, source_volume: &str) -> Result<Snapshot> {
        let id = existing.name_any();
        if is_deleting(&existing) {
            return Err(Error::new(Kind::Aborted, format!("snapshot {id} is being deleted; retry once it is gone")));
        }
        if existing.spec.source_volume != source_volume {
            return Err(Error::exists(format!("snapshot {name:?} exists for volume {}", existing.spec.source_volume)));
        }
        self.finish_snapshot(&id).await
    }

    /// Waits for a snapshot to be cut; one its agent could not cut (no
    /// data) is deleted so that the retry starts afresh.
    async fn finish_snapshot(&self, id: &str) -> Result<Snapshot> {
        let error = match self.wait_snapshot(id).await {
            Ok(object) => return Ok(objects::snapshot_message(&object)),
            Err(e) if matches!(e.kind(), Kind::Unavailable | Kind::NotFound) => return Err(e),
            Err(e) => e,
        };
        let api = self.snapshots();
        let uncut = self.get(&api, id).await.ok().flatten().is_some_and(|o| {
            o.status.is_some_and(|s| matches!(s.phase, SnapshotPhase::Failed | SnapshotPhase::Pending))
        });
        if uncut
            && let Err(e) =
                self.request(&format!("deleting snapshot {id}"), api.delete(id, &DeleteParams::default())).await
        {
            tracing::warn!(snapshot.id = %id, error = %e, "deleting a snapshot object its agent could not cut failed");
        }
        Err(error)
    }

    /// DeleteSnapshot: the object deleted and gone.
    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        if !agent::is_snapshot_id(id) {
            return Ok(());
        }
        self.delete_and_wait(&self.snapshots(), "snapshot", id).await
    }

    pub async fn snapshot(&self, id: &str) -> Result<NbdSnapshot> {
        let found = if agent::is_snapshot_id(id) { self.get(&self.snapshots(), id).await? } else { None };
        found.ok_or_else(|| Error::not_found(format!("snapshot {id} not found")))
    }

    /// Every snapshot object, in id order.
    pub async fn list_snapshots(&self) -> Result<Vec<NbdSnapshot>> {
        let mut items = self.request("listing snapshots", self.snapshots().list(&ListParams::default())).await?.items;
        items.sort_by_key(|o| o.name_any());
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use agent::resources::{
        Condition, ConditionStatus, ConditionType, NbdStorageNodeSpec, NbdStorageNodeStatus, NbdVolumeStatus, PortRange,
    };
    use csi_events::mock_api::{self, reply};
    use csi_proto::volume_capability::access_mode::Mode;
    use http::{Method, StatusCode};
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};

    use super::*;
    use crate::csi::Caps;

    fn request() -> VolumeRequest {
        VolumeRequest {
            name: "pvc-1".into(),
            required: 1 << 20,
            limit: 0,
            caps: Caps { block: true, modes: vec![Mode::SingleNodeWriter as i32], fs_type: String::new() },
            source: None,
            parameters: BTreeMap::new(),
            tls: ExportTls::Off,
        }
    }

    fn key() -> ExportKey {
        ExportKey::new(&[7; 32]).unwrap()
    }

    fn list(kind: &str, items: Vec<serde_json::Value>) -> serde_json::Value {
        // A list carries the resourceVersion a watch starts from.
        serde_json::json!({ "apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items })
    }

    /// A mock API server with one live storage node and no volume; once
    /// the NbdVolume is created, every read of it answers `status`.
    /// Returns the methods it was called with.
    async fn serve(mut handle: mock_api::ApiHandle, status: NbdVolumeStatus) -> Vec<Method> {
        let mut storage = NbdStorageNode::new(
            "storage-1",
            NbdStorageNodeSpec { address: "127.0.1.1".into(), ports: PortRange { first: 10900, last: 10999 } },
        );
        storage.status = Some(NbdStorageNodeStatus { free_bytes: Some(1 << 30), ..Default::default() });
        let lease = Lease {
            metadata: ObjectMeta { name: Some("storage-1".into()), ..Default::default() },
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
                lease_duration_seconds: Some(40),
                ..Default::default()
            }),
        };
        let mut created: Option<NbdVolume> = None;
        let mut methods = Vec::new();
        // Watches are held open, unanswered, until the client goes.
        let mut watches = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let (method, path) = (request.method().clone(), request.uri().path().to_owned());
            let query = request.uri().query().unwrap_or_default().to_owned();
            methods.push(method.clone());
            match (method, path.as_str()) {
                (Method::GET, _) if query.contains("watch=true") => watches.push(send),
                (Method::GET, "/apis/nbd.csi.dev/v1alpha1/nbdvolumes") if query.contains("fieldSelector") => {
                    let items = created.iter().map(|o| serde_json::to_value(o).unwrap()).collect();
                    let mut list = list("NbdVolumeList", items);
                    list["metadata"]["resourceVersion"] = "1".into();
                    reply(send, StatusCode::OK, &list);
                }
                (Method::GET, "/apis/nbd.csi.dev/v1alpha1/nbdstoragenodes") => reply(
                    send,
                    StatusCode::OK,
                    &list("NbdStorageNodeList", vec![serde_json::to_value(&storage).unwrap()]),
                ),
                (Method::GET, "/apis/coordination.k8s.io/v1/namespaces/default/leases") => {
                    reply(send, StatusCode::OK, &list("LeaseList", vec![serde_json::to_value(&lease).unwrap()]))
                }
                (Method::GET, "/apis/nbd.csi.dev/v1alpha1/nbdvolumes") => {
                    reply(send, StatusCode::OK, &list("NbdVolumeList", Vec::new()))
                }
                (Method::POST, "/apis/nbd.csi.dev/v1alpha1/nbdvolumes") => {
                    let mut object: NbdVolume = serde_json::from_value(mock_api::json_body(request).await).unwrap();
                    object.metadata.generation = Some(1);
                    object.metadata.resource_version = Some("1".into());
                    object.status = Some(status.clone());
                    reply(send, StatusCode::CREATED, &serde_json::to_value(&object).unwrap());
                    created = Some(object);
                }
                (Method::GET, _) => match &created {
                    Some(object) => reply(send, StatusCode::OK, &serde_json::to_value(object).unwrap()),
                    None => reply(send, StatusCode::NOT_FOUND, &mock_api::status(404, "NotFound", "not found")),
                },
                (Method::DELETE, _) => {
                    let object = created.take().expect("deleting what was created");
                    reply(send, StatusCode::OK, &serde_json::to_value(&object).unwrap());
                }
                (method, path) => panic!("unexpected {method} {path}"),
            }
        }
        methods
    }

    fn status(reason: &str) -> NbdVolumeStatus {
        let mut ready = Condition::new(ConditionType::Ready, ConditionStatus::False, reason, "the agent's words");
        ready.observed_generation = Some(1);
        NbdVolumeStatus {
            phase: VolumePhase::Pending,
            observed_generation: Some(1),
            conditions: vec![ready],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn an_agent_that_does_not_answer_in_time_is_unavailable_and_the_object_stays_for_the_retry() {
        let (client, handle) = mock_api::client();
        let server = tokio::spawn(serve(handle, status("NotCreated")));
        let cluster = Cluster::new(client, "default".into(), key(), Duration::from_millis(300));
        let e = cluster.create_volume(&request(), &Selector::default()).await.unwrap_err();
        assert_eq!(e.kind(), Kind::Unavailable, "{e}");
        assert!(e.to_string().contains("can be retried"), "{e}");
        drop(cluster);
        let methods = server.await.unwrap();
        assert!(methods.contains(&Method::POST), "{methods:?}");
        assert!(!methods.contains(&Method::DELETE), "the object is left for the retry: {methods:?}");
    }

    #[tokio::test]
    async fn a_volume_its_agent_refuses_keeps_the_agents_code_and_its_object_is_removed() {
        let (client, handle) = mock_api::client();
        let server = tokio::spawn(serve(handle, status("ResourceExhausted")));
        let cluster = Cluster::new(client, "default".into(), key(), Duration::from_secs(10));
        let e = cluster.create_volume(&request(), &Selector::default()).await.unwrap_err();
        assert_eq!(e.kind(), Kind::ResourceExhausted, "{e}");
        assert!(e.to_string().contains("the agent's words"), "{e}");
        drop(cluster);
        let methods = server.await.unwrap();
        assert_eq!(methods.last(), Some(&Method::DELETE), "so that the retry places it afresh: {methods:?}");
    }

    #[tokio::test]
    async fn an_api_server_that_does_not_answer_is_unavailable_within_the_timeout_and_nothing_is_written() {
        // Every request is taken and held unanswered, as by a stopped
        // kube-apiserver whose socket still accepts connections.
        let (client, mut handle) = mock_api::client();
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                held.push((request.method().clone(), send));
            }
            held.into_iter().map(|(method, _)| method).collect::<Vec<_>>()
        });
        let cluster = Cluster::new(client, "default".into(), key(), Duration::from_millis(300));
        let id = objects::volume_id("pvc-1");
        let bound = Duration::from_secs(5);
        let calls = async {
            let created = cluster.create_volume(&request(), &Selector::default()).await;
            let deleted = cluster.delete_volume(&id).await;
            let published = cluster.publish(&id, "worker-1", true, 1, false).await;
            let unpublished = cluster.unpublish(&id, "worker-1").await;
            let capacity = cluster.capacity(&Selector::default(), false).await;
            let listed = cluster.list_volumes().await;
            [created.err(), deleted.err(), published.err(), unpublished.err(), capacity.err(), listed.err()]
        };
        let errors = tokio::time::timeout(bound, calls).await.expect("every call answers within the bound, none hangs");
        for e in errors {
            let e = e.expect("a call that got no answer fails");
            assert_eq!(e.kind(), Kind::Unavailable, "{e}");
            assert!(e.to_string().contains("did not answer within 300ms"), "{e}");
        }
        drop(cluster);
        let methods = server.await.unwrap();
        assert!(methods.iter().all(|m| m == Method::GET), "nothing but reads was sent: {methods:?}");
    }

    /// A mock API server holding volume `id` on `storage-9` without a
    /// status (no agent acted on it), with `storage` as that storage node's
    /// NbdStorageNode and `lease` as its agent's Lease (404 when `None`).
    async fn serve_unanswered(mut handle: mock_api::ApiHandle, id: String, storage: bool, lease: Option<Lease>) {
        let object = NbdVolume::new(&id, objects::volume_spec(&request(), "storage-9", 1 << 20, ExportTls::Off));
        let mut object = serde_json::to_value(object).unwrap();
        object["metadata"]["resourceVersion"] = "1".into();
        object["metadata"]["generation"] = 1.into();
        let mut watches = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let (path, query) = (request.uri().path().to_owned(), request.uri().query().unwrap_or_default().to_owned());
            let not_found = mock_api::status(404, "NotFound", "not found");
            match path.as_str() {
                _ if query.contains("watch=true") => watches.push(send),
                "/apis/nbd.csi.dev/v1alpha1/nbdvolumes" => {
                    let mut list = list("NbdVolumeList", vec![object.clone()]);
                    list["metadata"]["resourceVersion"] = "1".into();
                    reply(send, StatusCode::OK, &list);
                }
                p if p.ends_with(&id) => reply(send, StatusCode::OK, &object),
                "/apis/nbd.csi.dev/v1alpha1/nbdstoragenodes/storage-9" if storage => {
                    let node = NbdStorageNode::new(
                        "storage-9",
                        NbdStorageNodeSpec { address: "127.0.1.9".into(), ports: PortRange { first: 1, last: 2 } },
                    );
                    reply(send, StatusCode::OK, &serde_json::to_value(node).unwrap())
                }
                "/apis/coordination.k8s.io/v1/namespaces/default/leases/storage-9" if lease.is_some() => {
                    reply(send, StatusCode::OK, &serde_json::to_value(lease.as_ref().unwrap()).unwrap())
                }
                _ => reply(send, StatusCode::NOT_FOUND, &not_found),
            }
        }
    }

    #[tokio::test]
    async fn a_wait_that_runs_out_says_when_the_storage_node_has_no_agent_or_its_lease_expired() {
        let id = objects::volume_id("pvc-1");
        let expired = Lease {
            metadata: ObjectMeta { name: Some("storage-9".into()), ..Default::default() },
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap())),
                lease_duration_seconds: Some(40),
                ..Default::default()
            }),
        };
        let cases = [
            (false, None, "storage node storage-9 has no NbdStorageNode: no agent runs there"),
            (true, Some(expired), "agent expired (last renewed at 2023-11-14T22:13:20Z, for 40 s)"),
        ];
        for (storage, lease, want) in cases {
            let (client, handle) = mock_api::client();
            let server = tokio::spawn(serve_unanswered(handle, id.clone(), storage, lease));
            let cluster = Cluster::new(client, "default".into(), key(), Duration::from_millis(300));
            let e = cluster.unpublish(&id, "worker-1").await.unwrap_err();
            assert_eq!(e.kind(), Kind::Unavailable, "{e}");
            assert!(e.to_string().contains("has no status yet"), "{e}");
            assert!(e.to_string().contains(want), "{e}");
            drop(cluster);
            server.await.unwrap();
        }
    }

    #[tokio::test]
    async fn an_unreachable_api_server_is_unavailable() {
        // Nothing listens on port 1.
        let client = kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
        let cluster = Cluster::new(client, "default".into(), key(), Duration::from_secs(1));
        let e = cluster.create_volume(&request(), &Selector::default()).await.unwrap_err();
        assert_eq!(e.kind(), Kind::Unavailable, "{e}");
        let e = cluster.capacity(&Selector::default(), false).await.unwrap_err();
        assert_eq!(e.kind(), Kind::Unavailable, "{e}");
        let e = cluster.publish(&objects::volume_id("pvc-1"), "worker-1", true, 1, false).await.unwrap_err();
        assert_eq!(e.kind(), Kind::Unavailable, "{e}");
    }
}
