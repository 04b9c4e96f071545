//! The NbdVolume and NbdSnapshot objects seen from CSI: ids derived from
//! request names, the spec a checked request becomes, the CSI messages an
//! object answers with, and how far its agent got with the object's
//! current generation. Pure functions; the cluster backend does the I/O.

use std::collections::BTreeMap;

use agent::resources::{
    AccessMode, AccessType, ConditionStatus, ConditionType, FINALIZER, NbdSnapshot, NbdSnapshotSpec, NbdVolume,
    NbdVolumeSpec, SnapshotPhase, VolumePhase, VolumeSource,
};
use agent::{ExportTls, Source};
use csi_proto::contract::{VolumeAccess, VolumeContext};
use csi_proto::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource as CsiVolumeSource};
use csi_proto::{Snapshot, Volume, VolumeCondition, VolumeContentSource};
use kube::ResourceExt;

use crate::csi::{Caps, is_reader_only};
use crate::error::{Error, Kind};

/// `prefix` + the first 32 hex digits of SHA-256(`name`): the same CSI
/// request name gives the same object name on every controller replica,
/// so a retry, or a second replica serving the same call, finds the
/// object the first one created instead of making another.
fn derived_id(prefix: &str, name: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    let hex: String = digest.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

/// The volume id (and NbdVolume name) of CSI request name `name`.
pub fn volume_id(name: &str) -> String {
    derived_id("vol-", name)
}

/// The snapshot id (and NbdSnapshot name) of CSI request name `name`.
pub fn snapshot_id(name: &str) -> String {
    derived_id("snap-", name)
}

/// What CreateVolume asked for, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRequest {
    pub name: String,
    /// `required_bytes` and `limit_bytes` (0: none), as asked.
    pub required: i64,
    pub limit: i64,
    pub caps: Caps,
    pub source: Option<Source>,
    pub parameters: BTreeMap<String, String>,
    /// The TLS mode asked for (the class's, else the controller's
    /// default); a clone or restore gets its source's when that is more.
    pub tls: ExportTls,
}

/// A new NbdVolume `id`. It carries its agent's finalizer from the start:
/// the agent adds it before acting on an object that lacks it, which was
/// one more etcd write and one more watch round trip on every CreateVolume.
pub fn new_volume(id: &str, spec: NbdVolumeSpec) -> NbdVolume {
    let mut object = NbdVolume::new(id, spec);
    object.metadata.finalizers = Some(vec![FINALIZER.to_owned()]);
    object
}

/// A new NbdSnapshot `id`, with its agent's finalizer, as [`new_volume`].
pub fn new_snapshot(id: &str, spec: NbdSnapshotSpec) -> NbdSnapshot {
    let mut object = NbdSnapshot::new(id, spec);
    object.metadata.finalizers = Some(vec![FINALIZER.to_owned()]);
    object
}

/// The spec of a new volume for `request`, `size` bytes on `storage_node`,
/// its export speaking TLS as `tls` says (the request's, or its source's).
pub fn volume_spec(request: &VolumeRequest, storage_node: &str, size: u64, tls: ExportTls) -> NbdVolumeSpec {
    NbdVolumeSpec {
        storage_node: storage_node.to_owned(),
        request_name: request.name.clone(),
        size_bytes: size,
        access_type: if request.caps.block { AccessType::Block } else { AccessType::Mount },
        fs_type: request.caps.fs_type.clone(),
        access_modes: request.caps.modes.iter().filter_map(|m| AccessMode::from_csi(*m)).collect(),
        read_only: request.caps.modes.iter().all(|m| is_reader_only(*m)),
        parameters: request.parameters.clone(),
        source: request.source.as_ref().map(|s| match s {
            Source::Snapshot(id) => VolumeSource::Snapshot(id.clone()),
            Source::Volume(id) => VolumeSource::Volume(id.clone()),
        }),
        published_to: Vec::new(),
        tls,
    }
}

fn source_of(spec: &NbdVolumeSpec) -> Option<Source> {
    spec.source.as_ref().map(|s| match s {
        VolumeSource::Snapshot(id) => Source::Snapshot(id.clone()),
        VolumeSource::Volume(id) => Source::Volume(id.clone()),
    })
}

/// Whether an existing volume answers `request` (the same name asked
/// again): its size within the range, the same access type, source and
/// parameters, every asked mode among its modes, the same filesystem if
/// one is named, at least the TLS asked for (a clone's may be its
/// source's, more). Where it was placed does not matter.
pub fn satisfies(spec: &NbdVolumeSpec, request: &VolumeRequest) -> bool {
    let size = spec.size_bytes.min(i64::MAX as u64) as i64;
    let modes: Vec<i32> = spec.access_modes.iter().map(|m| m.csi_value()).collect();
    size >= request.required
        && (request.limit == 0 || size <= request.limit)
        && (spec.access_type == AccessType::Block) == request.caps.block
        && request.caps.modes.iter().all(|m| modes.contains(m))
        && (request.caps.fs_type.is_empty() || request.caps.fs_type == spec.fs_type)
        && source_of(spec) == request.source
        && spec.parameters == request.parameters
        && spec.tls >= request.tls
}

/// The CSI Volume an object stands for; its size is the one served once
/// the agent reported it.
pub fn volume_message(object: &NbdVolume) -> Volume {
    let spec = &object.spec;
    let access = match spec.access_type {
        AccessType::Block => VolumeAccess::Block,
        AccessType::Mount => VolumeAccess::Mount { fs_type: spec.fs_type.clone() },
    };
    let size = object.status.as_ref().and_then(|s| s.size_bytes).unwrap_or(spec.size_bytes);
    Volume {
        capacity_bytes: size.min(i64::MAX as u64) as i64,
        volume_id: object.name_any(),
        volume_context: VolumeContext { name: spec.request_name.clone(), access }.to_map(),
        content_source: source_of(spec).map(|source| VolumeContentSource {
            r#type: Some(match source {
                Source::Snapshot(snapshot_id) => SourceType::Snapshot(SnapshotSource { snapshot_id }),
                Source::Volume(volume_id) => SourceType::Volume(CsiVolumeSource { volume_id }),
            }),
        }),
        accessible_topology: Vec::new(),
    }
}

/// The node ids a volume is published to.
pub fn published_nodes(object: &NbdVolume) -> Vec<String> {
    object.spec.published_to.iter().map(|p| p.node.clone()).collect()
}

/// Its VolumeCondition: normal only when its agent says it is available.
pub fn volume_condition(object: &NbdVolume) -> VolumeCondition {
    let Some(status) = &object.status else {
        return VolumeCondition { abnormal: true, message: "its storage node's agent has not reported on it".into() };
    };
    if status.phase == VolumePhase::Available {
        return VolumeCondition { abnormal: false, message: "NBD server is serving".into() };
    }
    let why = status.conditions.iter().find(|c| c.type_ == ConditionType::Ready).map(|c| c.message.clone());
    let message = match why {
        Some(why) if !why.is_empty() => format!("{:?}: {why}", status.phase),
        _ => format!("{:?}", status.phase),
    };
    VolumeCondition { abnormal: true, message }
}

/// The CSI Snapshot an object stands for.
pub fn snapshot_message(object: &NbdSnapshot) -> Snapshot {
    let status = object.status.clone().unwrap_or_default();
    let creation_time = status
        .created_at
        .as_deref()
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(|t| prost_types::Timestamp { seconds: t.as_second(), nanos: t.subsec_nanosecond() });
    Snapshot {
        size_bytes: status.size_bytes.unwrap_or(0).min(i64::MAX as u64) as i64,
        snapshot_id: object.name_any(),
        source_volume_id: object.spec.source_volume.clone(),
        creation_time,
        ready_to_use: status.phase == SnapshotPhase::Ready,
        group_snapshot_id: String::new(),
    }
}

/// How far an agent got with an object's current generation.
#[derive(Debug)]
pub enum Progress {
    /// That generation is in effect.
    Done,
    /// Not yet, for this reason; waiting may help.
    Waiting(String),
    /// The agent could not act on it, and says why.
    Failed(Error),
}

/// What a Ready=False reason means for a caller waiting on it: a kind to
/// fail with, or `None` when waiting may still help (not acted on yet, a
/// server restarting, a node lookup that failed).
fn failure_kind(reason: &str) -> Option<Kind> {
    Some(match reason {
        "ResourceExhausted" => Kind::ResourceExhausted,
        "NotFound" => Kind::NotFound,
        "FailedPrecondition" | "ImageMissing" => Kind::FailedPrecondition,
        "InvalidArgument" | "InvalidSpec" => Kind::InvalidArgument,
        "Internal" => Kind::Internal,
        _ => return None,
    })
}

/// Progress from a status's observed generation and its Ready condition,
/// for an object of `generation`.
fn progress(
    what: &str,
    generation: Option<i64>,
    observed: Option<i64>,
    conditions: &[agent::resources::Condition],
    done: bool,
) -> Progress {
    let generation = generation.unwrap_or(0);
    if observed.unwrap_or(0) < generation {
        return Progress::Waiting(format!("the agent has not acted on generation {generation} of {what} yet"));
    }
    let ready = conditions.iter().find(|c| c.type_ == ConditionType::Ready);
    match ready {
        Some(c) if c.status == ConditionStatus::True && done => Progress::Done,
        Some(c) if c.status == ConditionStatus::False => match failure_kind(&c.reason) {
            Some(kind) => Progress::Failed(Error::new(kind, format!("{what}: {} ({})", c.message, c.reason))),
            None => Progress::Waiting(format!("{what} is not ready: {} ({})", c.message, c.reason)),
        },
        _ => Progress::Waiting(format!("{what} is not ready yet")),
    }
}

pub fn volume_progress(object: &NbdVolume) -> Progress {
    let what = format!("volume {}", object.name_any());
    let Some(status) = &object.status else { return Progress::Waiting(format!("{what} has no status yet")) };
    if status.phase == VolumePhase::Deleting {
        return Progress::Failed(Error::not_found(format!("{what} is being deleted")));
    }
    let done = status.phase == VolumePhase::Available;
    progress(&what, object.metadata.generation, status.observed_generation, &status.conditions, done)
}

pub fn snapshot_progress(object: &NbdSnapshot) -> Progress {
    let what = format!("snapshot {}", object.name_any());
    let Some(status) = &object.status else { return Progress::Waiting(format!("{what} has no status yet")) };
    if status.phase == SnapshotPhase::Deleting {
        return Progress::Failed(Error::not_found(format!("{what} is being deleted")));
    }
    let done = status.phase == SnapshotPhase::Ready;
    progress(&what, object.metadata.generation, status.observed_generation, &status.conditions, done)
}

/// Progress of a change in who may attach a volume: in effect once its
/// agent acted on the current generation, whether or not the volume
/// serves (an unpublish must not wait for a server that is down, or an
/// image that is missing), or once the volume is being deleted (which
/// stops every connection).
pub fn access_progress(object: &NbdVolume) -> Progress {
    let what = format!("volume {}", object.name_any());
    let Some(status) = &object.status else { return Progress::Waiting(format!("{what} has no status yet")) };
    if status.phase == VolumePhase::Deleting {
        return Progress::Done;
    }
    let current = status.observed_generation.unwrap_or(0) >= object.metadata.generation.unwrap_or(0);
    let ready = status.conditions.iter().find(|c| c.type_ == ConditionType::Ready);
    if current
        && ready.is_some_and(|c| matches!(c.reason.as_str(), "Serving" | "Unpublished" | "ServerDown" | "ImageMissing"))
    {
        return Progress::Done;
    }
    progress(&what, object.metadata.generation, status.observed_generation, &status.conditions, false)
}

#[cfg(test)]
mod tests {
    use agent::resources::{Condition, NbdSnapshotStatus, NbdVolumeStatus, PublishedTo};
    use csi_proto::volume_capability::access_mode::Mode;

    use super::*;

    fn request(name: &str) -> VolumeRequest {
        VolumeRequest {
            name: name.into(),
            required: 1 << 20,
            limit: 0,
            caps: Caps { block: false, modes: vec![Mode::SingleNodeWriter as i32], fs_type: "xfs".into() },
            source: None,
            parameters: BTreeMap::new(),
            tls: ExportTls::Off,
        }
    }

    fn ready(status: ConditionStatus, reason: &str, message: &str, generation: i64) -> Condition {
        let mut c = Condition::new(ConditionType::Ready, status, reason, message);
        c.observed_generation = Some(generation);
        c
    }

    fn volume_with(generation: i64, status: Option<NbdVolumeStatus>) -> NbdVolume {
        let mut object =
            NbdVolume::new(&volume_id("pvc-1"), volume_spec(&request("pvc-1"), "storage-1", 1 << 20, ExportTls::Off));
        object.metadata.generation = Some(generation);
        object.status = status;
        object
    }

    fn status(phase: VolumePhase, observed: i64, condition: Condition) -> Option<NbdVolumeStatus> {
        Some(NbdVolumeStatus {
            phase,
            observed_generation: Some(observed),
            port: Some(10900),
            size_bytes: Some(2 << 20),
            conditions: vec![condition],
        })
    }

    #[test]
    fn new_objects_carry_the_agents_finalizer() {
        let volume =
            new_volume(&volume_id("pvc-1"), volume_spec(&request("pvc-1"), "storage-1", 1 << 20, ExportTls::Off));
        assert_eq!(volume.metadata.finalizers, Some(vec![FINALIZER.to_owned()]));
        let spec = NbdSnapshotSpec {
            storage_node: "storage-1".into(),
            request_name: "snap-1".into(),
            source_volume: volume_id("pvc-1"),
            parameters: BTreeMap::new(),
        };
        assert_eq!(new_snapshot(&snapshot_id("snap-1"), spec).metadata.finalizers, Some(vec![FINALIZER.to_owned()]));
    }

    #[test]
    fn ids_are_derived_from_request_names_and_are_ids_of_their_kind() {
        let id = volume_id("pvc-5f0c");
        assert_eq!(id, volume_id("pvc-5f0c"), "the same name, the same id on every replica");
        assert_ne!(id, volume_id("pvc-5f0d"));
        assert!(agent::is_volume_id(&id), "{id}");
        // SHA-256("abc") starts ba7816bf8f01cfea414140de5dae2223.
        assert_eq!(volume_id("abc"), "vol-ba7816bf8f01cfea414140de5dae2223");
        assert_eq!(snapshot_id("abc"), "snap-ba7816bf8f01cfea414140de5dae2223");
        assert!(agent::is_snapshot_id(&snapshot_id("x")));
    }

    #[test]
    fn a_request_becomes_a_spec_that_satisfies_it_and_only_compatible_requests() {
        let asked = request("pvc-1");
        let spec = volume_spec(&asked, "storage-2", 4 << 20, ExportTls::Off);
        assert_eq!(spec.storage_node, "storage-2");
        assert_eq!(spec.access_type, AccessType::Mount);
        assert_eq!(spec.access_modes, vec![AccessMode::SingleNodeWriter]);
        assert!(!spec.read_only);
        assert!(spec.published_to.is_empty());
        assert!(satisfies(&spec, &asked));
        assert!(!satisfies(&spec, &VolumeRequest { required: 8 << 20, ..asked.clone() }), "too small");
        assert!(!satisfies(&spec, &VolumeRequest { limit: 2 << 20, ..asked.clone() }), "too big");
        let block = Caps { block: true, ..asked.caps.clone() };
        assert!(!satisfies(&spec, &VolumeRequest { caps: block, ..asked.clone() }), "other access type");
        let selector = BTreeMap::from([("storageNodeSelector".to_owned(), "zone=a".to_owned())]);
        assert!(!satisfies(&spec, &VolumeRequest { parameters: selector, ..asked.clone() }), "other parameters");
        let clone = VolumeRequest { source: Some(Source::Volume(volume_id("x"))), ..asked.clone() };
        assert!(!satisfies(&spec, &clone), "other source");
        let tls = VolumeRequest { tls: ExportTls::Required, ..asked.clone() };
        assert!(!satisfies(&spec, &tls), "less TLS than asked");
        let required = volume_spec(&tls, "storage-2", 4 << 20, ExportTls::Required);
        assert_eq!(required.tls, ExportTls::Required);
        assert!(satisfies(&required, &tls) && satisfies(&required, &asked), "at least the TLS asked for");
        let spec = volume_spec(&clone, "storage-2", 4 << 20, ExportTls::Off);
        assert_eq!(spec.source, Some(VolumeSource::Volume(volume_id("x"))));
        assert!(satisfies(&spec, &clone));
    }

    #[test]
    fn an_object_answers_as_a_csi_volume() {
        let mut object =
            volume_with(1, status(VolumePhase::Available, 1, ready(ConditionStatus::True, "Serving", "", 1)));
        object.spec.published_to = vec![PublishedTo { node: "worker-1".into(), read_only: false, access_mode: None }];
        let volume = volume_message(&object);
        assert_eq!(volume.volume_id, volume_id("pvc-1"));
        assert_eq!(volume.capacity_bytes, 2 << 20, "the size served, once reported");
        assert_eq!(volume.volume_context.get("name").map(String::as_str), Some("pvc-1"));
        assert_eq!(volume.volume_context.get("accessType").map(String::as_str), Some("mount"));
        assert_eq!(volume.volume_context.get("fsType").map(String::as_str), Some("xfs"));
        assert_eq!(published_nodes(&object), ["worker-1"]);
        assert!(!volume_condition(&object).abnormal);
        object.status = status(VolumePhase::Unavailable, 1, ready(ConditionStatus::False, "ServerDown", "down", 1));
        let condition = volume_condition(&object);
        assert!(condition.abnormal && condition.message.contains("down"), "{condition:?}");
        object.status = None;
        assert_eq!(volume_message(&object).capacity_bytes, 1 << 20, "the spec's size before any report");
    }

    #[test]
    fn progress_counts_only_a_status_of_the_current_generation() {
        let done = volume_with(2, status(VolumePhase::Available, 2, ready(ConditionStatus::True, "Serving", "", 2)));
        assert!(matches!(volume_progress(&done), Progress::Done));
        let stale = volume_with(3, status(VolumePhase::Available, 2, ready(ConditionStatus::True, "Serving", "", 2)));
        assert!(matches!(volume_progress(&stale), Progress::Waiting(_)));
        assert!(matches!(volume_progress(&volume_with(1, None)), Progress::Waiting(_)));
        let pending =
            volume_with(1, status(VolumePhase::Pending, 1, ready(ConditionStatus::False, "NotCreated", "", 1)));
        assert!(matches!(volume_progress(&pending), Progress::Waiting(_)));
        let down =
            volume_with(1, status(VolumePhase::Unavailable, 1, ready(ConditionStatus::False, "ServerDown", "x", 1)));
        assert!(matches!(volume_progress(&down), Progress::Waiting(_)), "a server restarting may come back");
        assert!(matches!(access_progress(&down), Progress::Done), "its access is in effect all the same");
        assert!(matches!(access_progress(&stale), Progress::Waiting(_)));
        assert!(matches!(access_progress(&pending), Progress::Waiting(_)));
    }

    #[test]
    fn a_refusal_of_the_current_generation_fails_with_its_kind() {
        for (reason, kind) in [
            ("ResourceExhausted", Kind::ResourceExhausted),
            ("InvalidSpec", Kind::InvalidArgument),
            ("NotFound", Kind::NotFound),
            ("ImageMissing", Kind::FailedPrecondition),
            ("Internal", Kind::Internal),
        ] {
            let object = volume_with(
                1,
                status(VolumePhase::Pending, 1, ready(ConditionStatus::False, reason, "the agent's words", 1)),
            );
            match volume_progress(&object) {
                Progress::Failed(e) => {
                    assert_eq!(e.kind(), kind, "{reason}");
                    assert!(e.to_string().contains("the agent's words"), "{e}");
                }
                other => panic!("{reason}: {other:?}"),
            }
        }
        let deleting = volume_with(1, status(VolumePhase::Deleting, 1, ready(ConditionStatus::True, "Serving", "", 1)));
        assert!(matches!(volume_progress(&deleting), Progress::Failed(e) if e.kind() == Kind::NotFound));
    }

    #[test]
    fn a_snapshot_answers_once_cut() {
        let spec = NbdSnapshotSpec {
            storage_node: "storage-1".into(),
            request_name: "snap-1".into(),
            source_volume: volume_id("pvc-1"),
            parameters: BTreeMap::new(),
        };
        let mut object = NbdSnapshot::new(&snapshot_id("snap-1"), spec);
        object.metadata.generation = Some(1);
        assert!(matches!(snapshot_progress(&object), Progress::Waiting(_)));
        object.status = Some(NbdSnapshotStatus {
            phase: SnapshotPhase::Ready,
            observed_generation: Some(1),
            size_bytes: Some(3 << 20),
            created_at: Some("2026-01-02T03:04:05.5Z".into()),
            source_block: Some(false),
            source_tls: ExportTls::Off,
            conditions: vec![ready(ConditionStatus::True, "Cut", "", 1)],
        });
        assert!(matches!(snapshot_progress(&object), Progress::Done));
        let message = snapshot_message(&object);
        assert_eq!((message.size_bytes, message.ready_to_use), (3 << 20, true));
        assert_eq!(message.source_volume_id, volume_id("pvc-1"));
        let t = message.creation_time.unwrap();
        assert_eq!((t.seconds, t.nanos), (1_767_323_045, 500_000_000));
    }
}
