//! Conditions an agent sets on the objects it reconciles, in the shape
//! Kubernetes conditions have (`type`, `status`, `reason`, `message`,
//! `lastTransitionTime`, `observedGeneration`), with the type and status
//! as enums.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a condition is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ConditionType {
    /// The object's spec can be acted on; False names the bad field.
    Valid,
    /// The disk and the servers match the spec (of `observedGeneration`):
    /// the volume exists, has its size, serves, and admits exactly the
    /// nodes it is published to; a snapshot is cut.
    Ready,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: ConditionType,
    pub status: ConditionStatus,
    /// One CamelCase word for machines: `Created`, `ImageMissing`.
    pub reason: String,
    /// For humans; never an export name.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: Option<String>,
    /// The `metadata.generation` of the spec this condition is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Condition {
    pub fn new(type_: ConditionType, status: ConditionStatus, reason: &str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status,
            reason: reason.to_owned(),
            message: message.into(),
            last_transition_time: None,
            observed_generation: None,
        }
    }

    /// Sets `condition` in `conditions`, replacing the one of its type; the
    /// transition time is kept when the status did not change and set to
    /// `now` when it did.
    pub fn set(conditions: &mut Vec<Condition>, mut condition: Condition, now: &str) {
        match conditions.iter_mut().find(|c| c.type_ == condition.type_) {
            Some(old) => {
                condition.last_transition_time = if old.status == condition.status {
                    old.last_transition_time.clone()
                } else {
                    Some(now.to_owned())
                };
                *old = condition;
            }
            None => {
                condition.last_transition_time = Some(now.to_owned());
                conditions.push(condition);
            }
        }
    }
}
