//! The agent's side of the custom resources: it watches the NbdVolume and
//! NbdSnapshot objects of its storage node, makes its disk and servers
//! match each one's spec, and writes what it made of it into the status.
//!
//! - Every object it acts on carries its finalizer ([`FINALIZER`]: the
//!   controller creates objects with it, and the agent adds it to one
//!   made without it before acting); data is
//!   deleted only when such an object is being deleted, never because an
//!   object is missing. A stored volume or snapshot no object names is
//!   quarantined ([`Agent::quarantine_volume`]) and reported with an Event.
//! - A spec that does not check out (see [`NbdVolume::desired`]), or an
//!   object that does not even read as its type (it is watched raw, so that
//!   it cannot fail the watch of the others), gets a Valid=False condition
//!   and an Event naming the field; nothing is done. A spec the agent
//!   cannot carry out (a size its disk cannot hold, say) gets Ready=False
//!   with the reason and a `ReconcileFailed` Event, and is retried.
//! - An object whose status says its volume was stored, while
//!   this agent stores none, is never given an empty volume in its place
//!   ([`plan::stored_elsewhere`]): it was moved here from another storage
//!   node, or this node lost its data. It gets Ready=False and an Event.
//! - An export is served under the name derived from the cluster key
//!   ([`ExportKey`]), which no object carries.
//! - The decisions are [`plan`](super::plan)'s; this module carries them
//!   out and talks to the API server.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{self, Event as Finalize, finalizer};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use tokio_stream::StreamExt;

use super::export_name::ExportKey;
use super::nodes::NodeDirectory;
use super::plan::{self, VolumeAction};
use super::raw::{RawSnapshot, RawVolume};
use super::{InvalidObject, NbdSnapshot, NbdSnapshotStatus, NbdVolume, NbdVolumeStatus};
use crate::error::{Error, Kind};
use crate::{Agent, NewSnapshot, NewVolume};

/// The finalizer the agent puts on the objects it acts on.
pub const FINALIZER: &str = "nbd.csi.dev/agent";
/// The reportingController of its Events.
const REPORTING_CONTROLLER: &str = "nbd.csi.dev/agent";
/// Where Events about cluster-scoped objects live, as kubelet does.
const EVENT_NAMESPACE: &str = "default";
/// How long access changes may wait for stopped connections.
const FENCE: Duration = Duration::from_secs(30);
/// How soon an object whose reconcile failed is tried again.
const RETRY: Duration = Duration::from_secs(10);

/// Why one reconcile stopped; the object is tried again ten seconds later.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Agent(#[from] Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
}

type Outcome = Result<Action, ReconcileError>;

/// Drives one [`Agent`] from the objects of one storage node.
pub struct Reconciler {
    client: kube::Client,
    agent: Arc<Agent>,
    node: String,
    export_key: ExportKey,
    events: csi_events::Recorder,
    nodes: NodeDirectory,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler").field("node", &self.node).finish_non_exhaustive()
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

fn object_reference<K: Resource<DynamicType = ()>>(object: &K) -> ObjectReference {
    ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        name: object.meta().name.clone(),
        uid: object.meta().uid.clone(),
        ..Default::default()
    }
}

impl Reconciler {
    /// `node` is this storage node's name (its Node's and NbdStorageNode's);
    /// `nodes` answers which addresses the nodes a volume is published to
    /// connect from.
    pub fn new(
        client: kube::Client,
        agent: Arc<Agent>,
        node: String,
        export_key: ExportKey,
        nodes: NodeDirectory,
    ) -> Self {
        let events = csi_events::Recorder::new(client.clone(), REPORTING_CONTROLLER.to_owned(), &node);
        Self { client, agent, node, export_key, events, nodes }
    }

    /// Watches this node's objects and reconciles them until the watches
    /// end, and looks for unclaimed volumes and snapshots every
    /// [`crate::REFRESH`].
    pub async fn run(self: Arc<Self>) {
        let selector = format!("spec.storageNode={}", self.node);
        let volumes =
            Controller::new(Api::<RawVolume>::all(self.client.clone()), watcher::Config::default().fields(&selector))
                .run(|o, me: Arc<Self>| async move { me.reconcile_volume(o).await }, retry, Arc::clone(&self));
        let snapshots =
            Controller::new(Api::<RawSnapshot>::all(self.client.clone()), watcher::Config::default().fields(&selector))
                .run(|o, me: Arc<Self>| async move { me.reconcile_snapshot(o).await }, retry, Arc::clone(&self));
        let sweep = {
            let me = Arc::clone(&self);
            async move {
                loop {
                    tokio::time::sleep(crate::REFRESH).await;
                    if let Err(e) = me.quarantine_unclaimed().await {
                        tracing::warn!(error = %e, "looking for unclaimed volumes and snapshots failed");
                    }
                }
            }
        };
        tokio::select! {
            () = drain("NbdVolume", volumes) => {}
            () = drain("NbdSnapshot", snapshots) => {}
            () = sweep => {}
        }
    }

    pub(crate) fn client(&self) -> &kube::Client {
        &self.client
    }

    pub(crate) fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }

    pub(crate) fn node(&self) -> &str {
        &self.node
    }

    // ----------------------------------------------------------- volumes

    /// One reconcile of an NbdVolume, through the finalizer: an object
    /// being deleted is cleaned up, any other is applied.
    pub async fn reconcile_volume(&self, object: Arc<RawVolume>) -> Outcome {
        let api: Api<RawVolume> = Api::all(self.client.clone());
        let outcome = finalizer(&api, FINALIZER, object, |event| async move {
            match event {
                Finalize::Apply(raw) => match raw.typed() {
                    Ok(object) => self.apply_volume(&object).await,
                    Err(invalid) => self.unreadable_volume(&raw, invalid).await,
                },
                Finalize::Cleanup(raw) => self.cleanup_volume(&raw).await,
            }
        })
        .await;
        finalized(outcome)
    }

    /// An object that does not read as an NbdVolume: its status and an
    /// Event say why, once per change; nothing else is done.
    async fn unreadable_volume(&self, raw: &RawVolume, invalid: InvalidObject) -> Outcome {
        if raw.storage_node().is_some_and(|node| node != self.node) {
            return Ok(Action::await_change());
        }
        let previous: Option<NbdVolumeStatus> = raw.status.clone().and_then(|s| serde_json::from_value(s).ok());
        let actual = self.agent.volume(&raw.id());
        let status = plan::volume_status(
            Err(&invalid),
            raw.metadata.generation,
            actual.as_ref(),
            None,
            previous.as_ref(),
            &now(),
        );
        if previous.as_ref() != Some(&status) {
            self.patch_volume_status(&raw.id(), plan::status_patch(previous.as_ref(), &status)).await?;
            self.warn(raw, "InvalidSpec", "Reconcile", invalid.to_string()).await;
        }
        Ok(Action::await_change())
    }

    async fn apply_volume(&self, object: &NbdVolume) -> Outcome {
        // Another agent's (the watch selects this node's; this is the
        // check that does not depend on it).
        if object.spec.storage_node != self.node {
            return Ok(Action::await_change());
        }
        let desired = object.desired();
        let failure = match &desired {
            Err(_) => None,
            Ok(d) => self.converge_volume(d, object.status.as_ref()).await.err(),
        };
        let actual = self.agent.volume(&object.name_any());
        let status = plan::volume_status(
            desired.as_ref(),
            object.metadata.generation,
            actual.as_ref(),
            failure.as_ref(),
            object.status.as_ref(),
            &now(),
        );
        if object.status.as_ref() != Some(&status) {
            self.patch_volume_status(&object.name_any(), plan::status_patch(object.status.as_ref(), &status)).await?;
            // Once per change of status, not on every pass over the object.
            self.report(object, desired.as_ref().err(), failure.as_ref()).await;
        }
        match failure {
            Some(e) => Err(e.into()),
            None if desired.is_err() => Ok(Action::await_change()),
            // Again later: node addresses change, servers go down.
            None => Ok(Action::requeue(crate::REFRESH)),
        }
    }

    async fn patch_volume_status(&self, name: &str, patch: serde_json::Value) -> Result<(), kube::Error> {
        let api: Api<RawVolume> = Api::all(self.client.clone());
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(drop)
    }

    /// Carries out what [`plan::volume_actions`] says for `desired`;
    /// `previous` is the object's status as read.
    async fn converge_volume(
        &self,
        desired: &super::DesiredVolume,
        previous: Option<&NbdVolumeStatus>,
    ) -> Result<(), Error> {
        let actual = self.agent.volume(&desired.id).map(|v| v.record);
        if plan::stored_elsewhere(previous, actual.as_ref()) {
            return Err(Error::precondition(format!(
                "its status says it was stored ({} bytes), but storage node {} stores no volume {}: the object was \
                 moved here from another storage node, or this node lost its data; no empty volume is made in its \
                 place (give spec.storageNode back, or delete the object)",
                previous.and_then(|p| p.size_bytes).unwrap_or_default(),
                self.node,
                desired.id
            )));
        }
        let mut addresses = BTreeMap::new();
        for node in desired.published.keys() {
            let found = self
                .nodes
                .addresses(node)
                .await
                .map_err(|e| Error::new(Kind::Unavailable, format!("looking up node {node:?}: {e}")))?;
            // A Node that is gone admits nothing.
            addresses.insert(node.clone(), Some(found.unwrap_or_default().into_iter().collect()));
        }
        for action in plan::volume_actions(desired, actual.as_ref(), &addresses) {
            match action {
                VolumeAction::Create => {
                    self.agent
                        .create_volume(NewVolume {
                            id: Some(desired.id.clone()),
                            name: desired.request_name.clone(),
                            capacity_bytes: desired.size_bytes,
                            block: desired.block,
                            access_modes: desired.access_modes.clone(),
                            fs_type: desired.fs_type.clone(),
                            parameters: desired.parameters.clone(),
                            source: desired.source.clone(),
                            read_only: desired.read_only,
                            export_name: Some(self.export_key.export_name(&desired.id)),
                            tls: desired.tls,
                        })
                        .await?;
                }
                VolumeAction::Grow(size) => {
                    self.agent.expand_volume(&desired.id, size).await?;
                }
                VolumeAction::SetAccess(published) => {
                    self.agent.set_access(&desired.id, published, FENCE).await?;
                }
                // Only ever planned for an object being deleted.
                VolumeAction::Delete => {}
            }
        }
        Ok(())
    }

    /// Deletes the data of an object being deleted, whether or not it
    /// reads as an NbdVolume: it is named after the volume id.
    async fn cleanup_volume(&self, raw: &RawVolume) -> Outcome {
        let id = raw.id();
        if raw.storage_node() != Some(self.node.as_str()) {
            return Ok(Action::await_change());
        }
        let actual = self.agent.volume(&id).map(|v| v.record);
        let phase = raw.status.as_ref().and_then(|s| s.get("phase")).and_then(|p| p.as_str());
        if actual.is_some() && phase != Some("Deleting") {
            // Fencing its nodes may take a while: say so meanwhile.
            let patch = serde_json::json!({ "status": { "phase": super::VolumePhase::Deleting } });
            self.patch_volume_status(&id, patch).await?;
        }
        for action in plan::cleanup_actions(actual.as_ref()) {
            match action {
                VolumeAction::SetAccess(none) => drop(self.agent.set_access(&id, none, FENCE).await?),
                VolumeAction::Delete => self.agent.delete_volume(&id).await?,
                VolumeAction::Create | VolumeAction::Grow(_) => {}
            }
        }
        Ok(Action::await_change())
    }

    // --------------------------------------------------------- snapshots

    /// One reconcile of an NbdSnapshot, through the finalizer.
    pub async fn reconcile_snapshot(&self, object: Arc<RawSnapshot>) -> Outcome {
        let api: Api<RawSnapshot> = Api::all(self.client.clone());
        let outcome = finalizer(&api, FINALIZER, object, |event| async move {
            match event {
                Finalize::Apply(raw) => match raw.typed() {
                    Ok(object) => self.apply_snapshot(&object).await,
                    Err(invalid) => self.unreadable_snapshot(&raw, invalid).await,
                },
                Finalize::Cleanup(raw) => self.cleanup_snapshot(&raw).await,
            }
        })
        .await;
        finalized(outcome)
    }

    /// An object that does not read as an NbdSnapshot (see
    /// [`Self::unreadable_volume`]).
    async fn unreadable_snapshot(&self, raw: &RawSnapshot, invalid: InvalidObject) -> Outcome {
        if raw.storage_node().is_some_and(|node| node != self.node) {
            return Ok(Action::await_change());
        }
        let previous: Option<NbdSnapshotStatus> = raw.status.clone().and_then(|s| serde_json::from_value(s).ok());
        let actual = self.agent.snapshot(&raw.id());
        let status = plan::snapshot_status(
            Err(&invalid),
            raw.metadata.generation,
            actual.as_ref(),
            None,
            previous.as_ref(),
            &now(),
        );
        if previous.as_ref() != Some(&status) {
            let api: Api<RawSnapshot> = Api::all(self.client.clone());
            let patch = plan::status_patch(previous.as_ref(), &status);
            api.patch_status(&raw.id(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
            self.warn(raw, "InvalidSpec", "Reconcile", invalid.to_string()).await;
        }
        Ok(Action::await_change())
    }

    async fn apply_snapshot(&self, object: &NbdSnapshot) -> Outcome {
        if object.spec.storage_node != self.node {
            return Ok(Action::await_change());
        }
        let desired = object.desired();
        let failure = match &desired {
            Err(_) => None,
            Ok(d) if self.agent.snapshot(&d.id).is_some() => None,
            Ok(d) => self
                .agent
                .create_snapshot(NewSnapshot {
                    id: Some(d.id.clone()),
                    name: d.request_name.clone(),
                    source_volume_id: d.source_volume.clone(),
                    parameters: d.parameters.clone(),
                })
                .await
                .err(),
        };
        let actual = self.agent.snapshot(&object.name_any());
        let status = plan::snapshot_status(
            desired.as_ref(),
            object.metadata.generation,
            actual.as_ref(),
            failure.as_ref(),
            object.status.as_ref(),
            &now(),
        );
        if object.status.as_ref() != Some(&status) {
            let api: Api<NbdSnapshot> = Api::all(self.client.clone());
            let patch = plan::status_patch(object.status.as_ref(), &status);
            api.patch_status(&object.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
            self.report(object, desired.as_ref().err(), failure.as_ref()).await;
        }
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(Action::await_change()),
        }
    }

    async fn cleanup_snapshot(&self, raw: &RawSnapshot) -> Outcome {
        if raw.storage_node() == Some(self.node.as_str()) {
            self.agent.delete_snapshot(&raw.id()).await?;
        }
        Ok(Action::await_change())
    }

    // --------------------------------------------------------- unclaimed

    /// Quarantines every stored volume no NbdVolume names and every stored
    /// snapshot no NbdSnapshot names, each reported with an Event on this
    /// node's NbdStorageNode; returns their ids. One counts as unclaimed
    /// only when the API server answers that its object does not exist, not
    /// merely because a list missed it; a list that fails quarantines
    /// nothing.
    pub async fn quarantine_unclaimed(&self) -> Result<Vec<String>, ReconcileError> {
        let mut quarantined = Vec::new();
        let volumes = self.agent.volume_ids();
        for id in self.unclaimed::<RawVolume>(&volumes).await? {
            let aside = self.agent.quarantine_volume(&id).await?;
            self.report_quarantined("volume", &id, &aside).await;
            quarantined.push(id);
        }
        let snapshots: Vec<String> = self.agent.snapshots().into_iter().map(|s| s.id).collect();
        for id in self.unclaimed::<RawSnapshot>(&snapshots).await? {
            let aside = self.agent.quarantine_snapshot(&id).await?;
            self.report_quarantined("snapshot", &id, &aside).await;
            quarantined.push(id);
        }
        Ok(quarantined)
    }

    /// Those of `stored` that no object of kind `K` names, confirmed one
    /// by one.
    async fn unclaimed<K>(&self, stored: &[String]) -> Result<Vec<String>, kube::Error>
    where
        K: Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        if stored.is_empty() {
            return Ok(Vec::new());
        }
        let api: Api<K> = Api::all(self.client.clone());
        let claimed: BTreeSet<String> =
            api.list(&ListParams::default()).await?.items.iter().map(|o| o.name_any()).collect();
        let mut unclaimed = Vec::new();
        for id in plan::unclaimed(stored, &claimed) {
            if api.get_opt(id).await?.is_none() {
                unclaimed.push(id.clone());
            }
        }
        Ok(unclaimed)
    }

    async fn report_quarantined(&self, what: &str, id: &str, aside: &std::path::Path) {
        let kind = if what == "volume" { "NbdVolume" } else { "NbdSnapshot" };
        let note = format!(
            "{what} {id} is stored on {} but no {kind} names it: its image and record were moved to {}, not deleted",
            self.node,
            aside.display()
        );
        let node = ObjectReference {
            api_version: Some(format!("{}/{}", super::GROUP, super::VERSION)),
            kind: Some("NbdStorageNode".into()),
            name: Some(self.node.clone()),
            ..Default::default()
        };
        let reason = if what == "volume" { "VolumeQuarantined" } else { "SnapshotQuarantined" };
        self.record(node, reason, "Quarantine", note).await;
    }

    // ------------------------------------------------------------ events

    /// The Event that goes with a new status: a spec that cannot be acted
    /// on (`InvalidSpec`), or one the agent could not carry out
    /// (`ReconcileFailed`: a size no disk here holds, say); the status's
    /// Ready condition says the same, the Event puts it in front of whoever
    /// runs `kubectl get events`.
    async fn report<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        invalid: Option<&InvalidObject>,
        failure: Option<&Error>,
    ) {
        if let Some(invalid) = invalid {
            self.warn(object, "InvalidSpec", "Reconcile", invalid.to_string()).await;
        } else if let Some(e) = failure {
            let kind = K::kind(&());
            let name = object.meta().name.clone().unwrap_or_default();
            self.warn(object, "ReconcileFailed", "Reconcile", format!("{kind} {name:?}: {e}; retried")).await;
        }
    }

    async fn warn<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        reason: &'static str,
        action: &'static str,
        note: String,
    ) {
        self.record(object_reference(object), reason, action, note).await;
    }

    /// Records a Warning Event; a failure is only logged.
    async fn record(&self, regarding: ObjectReference, reason: &'static str, action: &'static str, note: String) {
        let warning = csi_events::WarningEvent {
            namespace: EVENT_NAMESPACE.to_owned(),
            regarding,
            related: None,
            reason,
            action,
            note,
        };
        if let Err(e) = self.events.record(warning).await {
            tracing::warn!(reason, error = %e, "recording an event failed");
        }
    }
}

/// Runs a controller's stream to its end, logging failed reconciles.
async fn drain<T, E: std::fmt::Display>(kind: &'static str, results: impl tokio_stream::Stream<Item = Result<T, E>>) {
    let mut results = std::pin::pin!(results);
    while let Some(result) = results.next().await {
        if let Err(e) = result {
            tracing::warn!(kind, error = %e, "reconcile failed");
        }
    }
}

/// What a finalizer-wrapped reconcile returns, as one error type.
fn finalized(outcome: Result<Action, finalizer::Error<ReconcileError>>) -> Outcome {
    outcome.map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        other => ReconcileError::Finalizer(other.to_string()),
    })
}

/// After a failed reconcile: try again soon.
fn retry<K>(_object: Arc<K>, _error: &ReconcileError, _me: Arc<Reconciler>) -> Action {
    Action::requeue(RETRY)
}
