//! What an agent must do for one object, decided from the object's checked
//! spec and what the agent has: pure functions, so that every case is a
//! unit test and the reconciler only carries the decisions out.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::condition::{Condition, ConditionStatus, ConditionType};
use super::invalid::InvalidObject;
use super::snapshot::{DesiredSnapshot, NbdSnapshotStatus, SnapshotPhase};
use super::volume::{DesiredVolume, NbdVolumeStatus, VolumePhase};
use crate::error::Error;
use crate::state::{Condition as Serving, VolumeStatus};
use crate::store::{Publication, SnapshotRecord, VolumeRecord};

/// One change to a volume, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeAction {
    /// Create it as the spec says.
    Create,
    /// Grow it to this size.
    Grow(u64),
    /// Publish it to exactly these nodes.
    SetAccess(BTreeMap<String, Publication>),
    /// Delete its data (only for an object being deleted).
    Delete,
}

/// The publications the spec asks for, with each node's addresses as
/// resolved now; a node whose addresses are unknown (`addresses` has no
/// entry) is admitted from nowhere until they are.
pub fn publications(
    desired: &DesiredVolume,
    addresses: &BTreeMap<String, Option<Vec<IpAddr>>>,
) -> BTreeMap<String, Publication> {
    desired
        .published
        .iter()
        .map(|(node, &(read_only, access_mode))| {
            let addresses = addresses.get(node).cloned().unwrap_or_else(|| Some(Vec::new()));
            (node.clone(), Publication { read_only, access_mode, addresses })
        })
        .collect()
}

/// What makes the agent's volume (`actual`, if it has one) match the spec.
pub fn volume_actions(
    desired: &DesiredVolume,
    actual: Option<&VolumeRecord>,
    addresses: &BTreeMap<String, Option<Vec<IpAddr>>>,
) -> Vec<VolumeAction> {
    let wanted = publications(desired, addresses);
    let mut actions = Vec::new();
    match actual {
        None => {
            actions.push(VolumeAction::Create);
            if !wanted.is_empty() {
                actions.push(VolumeAction::SetAccess(wanted));
            }
        }
        Some(record) => {
            if desired.size_bytes > record.capacity_bytes {
                actions.push(VolumeAction::Grow(desired.size_bytes));
            }
            if wanted != record.published {
                actions.push(VolumeAction::SetAccess(wanted));
            }
        }
    }
    actions
}

/// What deleting an object whose volume is `actual` takes: every node's
/// access first (its connections fenced), then the data.
pub fn cleanup_actions(actual: Option<&VolumeRecord>) -> Vec<VolumeAction> {
    match actual {
        None => Vec::new(),
        Some(record) if record.published.is_empty() => vec![VolumeAction::Delete],
        Some(_) => vec![VolumeAction::SetAccess(BTreeMap::new()), VolumeAction::Delete],
    }
}

/// Whether an object's status says a volume was stored for it (an agent
/// wrote its size) while this agent stores none: the object was
/// moved here from another storage node past the schema's rule, or this
/// node lost its data. An empty volume made in its place would hand its
/// users a blank disk under their old data's name; none is made.
pub fn stored_elsewhere(previous: Option<&NbdVolumeStatus>, actual: Option<&VolumeRecord>) -> bool {
    actual.is_none() && previous.is_some_and(|s| s.size_bytes.is_some())
}

/// Volumes the agent stores that no object names: to be quarantined,
/// never deleted.
pub fn unclaimed<'a>(stored: &'a [String], claimed: &std::collections::BTreeSet<String>) -> Vec<&'a String> {
    stored.iter().filter(|id| !claimed.contains(*id)).collect()
}

/// A reason word for an agent error: `ResourceExhausted`, say.
fn reason(error: &Error) -> String {
    format!("{:?}", error.kind())
}

/// The Valid and Ready conditions of a status being written; transition
/// times carry over from the previous status's conditions.
struct Conditions<'a> {
    list: Vec<Condition>,
    generation: Option<i64>,
    now: &'a str,
}

impl<'a> Conditions<'a> {
    fn new(previous: Option<&[Condition]>, generation: Option<i64>, now: &'a str) -> Self {
        Self { list: previous.map(<[Condition]>::to_vec).unwrap_or_default(), generation, now }
    }

    fn set(&mut self, type_: ConditionType, status: ConditionStatus, reason: &str, message: String) {
        let mut condition = Condition::new(type_, status, reason, message);
        condition.observed_generation = self.generation;
        Condition::set(&mut self.list, condition, self.now);
    }

    /// A spec that cannot be acted on: neither valid nor ready.
    fn invalid(&mut self, invalid: &InvalidObject) {
        self.set(ConditionType::Valid, ConditionStatus::False, "InvalidSpec", invalid.to_string());
        self.set(ConditionType::Ready, ConditionStatus::False, "InvalidSpec", "the spec cannot be acted on".into());
    }

    /// A checked spec, ready or not for `reason`.
    fn checked(&mut self, ready: bool, reason: &str, message: String) {
        self.set(ConditionType::Valid, ConditionStatus::True, "Checked", String::new());
        let status = if ready { ConditionStatus::True } else { ConditionStatus::False };
        self.set(ConditionType::Ready, status, reason, message);
    }

    fn into_list(self) -> Vec<Condition> {
        self.list
    }
}

/// The status an NbdVolume gets: from its checked spec (or why it could
/// not be checked), the agent's volume after the actions, and the error
/// that stopped them, if one did. `previous` keeps transition times.
pub fn volume_status(
    desired: Result<&DesiredVolume, &InvalidObject>,
    generation: Option<i64>,
    actual: Option<&VolumeStatus>,
    failure: Option<&Error>,
    previous: Option<&NbdVolumeStatus>,
    now: &str,
) -> NbdVolumeStatus {
    let mut conditions = Conditions::new(previous.map(|p| p.conditions.as_slice()), generation, now);
    // A size written before stays while nothing is stored here: it is what
    // marks the object as stored before ([`stored_elsewhere`]), so that a
    // later pass does not make an empty volume in its place. (Not the port:
    // a volume published nowhere has none.)
    let size_bytes = match actual {
        Some(volume) => Some(volume.record.capacity_bytes),
        None => previous.and_then(|p| p.size_bytes),
    };
    let phase = match (desired, actual, failure) {
        (Err(invalid), _, _) => {
            conditions.invalid(invalid);
            VolumePhase::Invalid
        }
        (Ok(_), _, Some(error)) => {
            conditions.checked(false, &reason(error), error.to_string());
            if size_bytes.is_some() { VolumePhase::Unavailable } else { VolumePhase::Pending }
        }
        (Ok(_), None, None) => {
            conditions.checked(false, "NotCreated", String::new());
            VolumePhase::Pending
        }
        (Ok(_), Some(volume), None) => match &volume.condition {
            Serving::Serving => {
                conditions.checked(true, "Serving", String::new());
                VolumePhase::Available
            }
            Serving::Unpublished => {
                conditions.checked(true, "Unpublished", "published to no node: no NBD server".to_owned());
                VolumePhase::Available
            }
            Serving::NotServing => {
                conditions.checked(false, "ServerDown", "its NBD server is down; it is retried".to_owned());
                VolumePhase::Unavailable
            }
            Serving::Broken(why) => {
                conditions.checked(false, "ImageMissing", why.clone());
                VolumePhase::Unavailable
            }
        },
    };
    NbdVolumeStatus {
        phase,
        observed_generation: generation,
        port: actual.and_then(|v| v.record.port),
        size_bytes,
        conditions: conditions.into_list(),
    }
}

/// The merge patch that makes `status` an object's whole status. A merge
/// patch keeps every field it leaves out, so a field the previous status
/// had and `status` drops (the port of a volume published nowhere, a size
/// no longer known) is sent as null, which deletes it.
pub fn status_patch<T: serde::Serialize>(previous: Option<&T>, status: &T) -> serde_json::Value {
    let mut fields = match serde_json::to_value(status) {
        Ok(serde_json::Value::Object(fields)) => fields,
        _ => serde_json::Map::new(),
    };
    if let Some(Ok(serde_json::Value::Object(before))) = previous.map(serde_json::to_value) {
        for key in before.keys() {
            fields.entry(key.clone()).or_insert(serde_json::Value::Null);
        }
    }
    serde_json::json!({ "status": fields })
}

/// The status an NbdSnapshot gets (see [`volume_status`]).
pub fn snapshot_status(
    desired: Result<&DesiredSnapshot, &InvalidObject>,
    generation: Option<i64>,
    actual: Option<&SnapshotRecord>,
    failure: Option<&Error>,
    previous: Option<&NbdSnapshotStatus>,
    now: &str,
) -> NbdSnapshotStatus {
    let mut conditions = Conditions::new(previous.map(|p| p.conditions.as_slice()), generation, now);
    let phase = match (desired, actual, failure) {
        (Err(invalid), _, _) => {
            conditions.invalid(invalid);
            SnapshotPhase::Invalid
        }
        (Ok(_), Some(_), _) => {
            conditions.checked(true, "Cut", String::new());
            SnapshotPhase::Ready
        }
        (Ok(_), None, Some(error)) => {
            conditions.checked(false, &reason(error), error.to_string());
            SnapshotPhase::Failed
        }
        (Ok(_), None, None) => {
            conditions.checked(false, "NotCut", String::new());
            SnapshotPhase::Pending
        }
    };
    NbdSnapshotStatus {
        phase,
        observed_generation: generation,
        size_bytes: actual.map(|s| s.size_bytes),
        created_at: actual.and_then(|s| created_at(s.created_seconds, s.created_nanos)),
        source_block: actual.and_then(|s| s.source_block),
        source_tls: actual.map(|s| s.source_tls).unwrap_or_default(),
        conditions: conditions.into_list(),
    }
}

/// RFC 3339 of a record's creation time.
fn created_at(seconds: i64, nanos: i32) -> Option<String> {
    k8s_openapi::jiff::Timestamp::new(seconds, nanos).ok().map(|t| t.to_string())
}
