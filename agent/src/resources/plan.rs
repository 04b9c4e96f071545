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

/// Volumes the agent stores that no object names: to be quarantined,
/// never deleted.
pub fn unclaimed<'a>(stored: &'a [String], claimed: &std::collections::BTreeSet<String>) -> Vec<&'a String> {
    stored.iter().filter(|id| !claimed.contains(*id)).collect()
}

/// A reason word for an agent error: `ResourceExhausted`, say.
fn reason(error: &Error) -> String {
    format!("{:?}", error.kind())
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
    let mut conditions = previous.map(|p| p.conditions.clone()).unwrap_or_default();
    let mut set = |type_, status, reason: &str, message: String| {
        let mut condition = Condition::new(type_, status, reason, message);
        condition.observed_generation = generation;
        Condition::set(&mut conditions, condition, now);
    };
    let phase = match (desired, actual, failure) {
        (Err(invalid), _, _) => {
            set(ConditionType::Valid, ConditionStatus::False, "InvalidSpec", invalid.to_string());
            set(ConditionType::Ready, ConditionStatus::False, "InvalidSpec", "the spec cannot be acted on".into());
            VolumePhase::Invalid
        }
        (Ok(_), actual, Some(error)) => {
            set(ConditionType::Valid, ConditionStatus::True, "Checked", String::new());
            set(ConditionType::Ready, ConditionStatus::False, &reason(error), error.to_string());
            if actual.is_some() { VolumePhase::Unavailable } else { VolumePhase::Pending }
        }
        (Ok(_), None, None) => {
            set(ConditionType::Valid, ConditionStatus::True, "Checked", String::new());
            set(ConditionType::Ready, ConditionStatus::False, "NotCreated", String::new());
            VolumePhase::Pending
        }
        (Ok(_), Some(volume), None) => {
            set(ConditionType::Valid, ConditionStatus::True, "Checked", String::new());
            match &volume.condition {
                Serving::Serving => {
                    set(ConditionType::Ready, ConditionStatus::True, "Serving", String::new());
                    VolumePhase::Available
                }
                Serving::NotServing => {
                    let message = "its NBD server is down; it is retried".to_owned();
                    set(ConditionType::Ready, ConditionStatus::False, "ServerDown", message);
                    VolumePhase::Unavailable
                }
                Serving::Broken(why) => {
                    set(ConditionType::Ready, ConditionStatus::False, "ImageMissing", why.clone());
                    VolumePhase::Unavailable
                }
            }
        }
    };
    NbdVolumeStatus {
        phase,
        observed_generation: generation,
        port: actual.map(|v| v.record.port),
        size_bytes: actual.map(|v| v.record.capacity_bytes),
        conditions,
    }
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
    let mut conditions = previous.map(|p| p.conditions.clone()).unwrap_or_default();
    let mut set = |type_, status, reason: &str, message: String| {
        let mut condition = Condition::new(type_, status, reason, message);
        condition.observed_generation = generation;
        Condition::set(&mut conditions, condition, now);
    };
    let phase = match (desired, actual, failure) {
        (Err(invalid), _, _) => {
            set(ConditionType::Valid, ConditionStatus::False, "InvalidSpec", invalid.to_string());
            set(ConditionType::Ready, ConditionStatus::False, "InvalidSpec", "the spec cannot be acted on".into());
            SnapshotPhase::Invalid
        }
        (Ok(_), Some(_), _) => {
            set(ConditionType::Valid, ConditionStatus::True, "Checked", String::new());
            set(ConditionType::Ready, ConditionStatus::True, "Cut", String::new());
            SnapshotPhase::Ready
        }
        (Ok(_), None, Some(error)) => {
            set(ConditionType::Valid, ConditionStatus::True, "Checked", String::new());
            set(ConditionType::Ready, ConditionStatus::False, &reason(error), error.to_string());
            SnapshotPhase::Failed
        }
        (Ok(_), None, None) => {
            set(ConditionType::Valid, ConditionStatus::True, "Checked", String::new());
            set(ConditionType::Ready, ConditionStatus::False, "NotCut", String::new());
            SnapshotPhase::Pending
        }
    };
    NbdSnapshotStatus {
        phase,
        observed_generation: generation,
        size_bytes: actual.map(|s| s.size_bytes),
        created_at: actual.and_then(|s| created_at(s.created_seconds, s.created_nanos)),
        source_block: actual.and_then(|s| s.source_block),
        conditions,
    }
}

/// RFC 3339 of a record's creation time.
fn created_at(seconds: i64, nanos: i32) -> Option<String> {
    k8s_openapi::jiff::Timestamp::new(seconds, nanos).ok().map(|t| t.to_string())
}
