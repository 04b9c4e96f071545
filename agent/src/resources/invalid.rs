//! Reading an object that may be wrong: [`InvalidObject`] names the object
//! and the field, for a condition and an Event, and never panics.

use kube::Resource;
use serde::de::DeserializeOwned;

/// The pattern of a Node name in a schema: a DNS subdomain (RFC 1123), as
/// Kubernetes requires of Node names. Not just a label: cloud providers
/// name nodes after their host names, dots included.
pub(crate) const NODE_NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// The longest Node name.
pub(crate) const MAX_NODE_NAME: usize = 253;

/// Why an object cannot be acted on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?}: {problem}")]
pub struct InvalidObject {
    /// The resource kind: `NbdVolume`, say.
    pub kind: String,
    /// The object's name (empty when it has none).
    pub name: String,
    /// What is wrong, naming the field.
    pub problem: String,
}

impl InvalidObject {
    pub(crate) fn of<K: Resource<DynamicType = ()>>(object: &K, problem: impl Into<String>) -> Self {
        Self::named::<K>(object.meta().name.clone().unwrap_or_default(), problem)
    }

    pub(crate) fn named<K: Resource<DynamicType = ()>>(name: String, problem: impl Into<String>) -> Self {
        Self { kind: K::kind(&()).into_owned(), name, problem: problem.into() }
    }
}

/// An object of kind `K` from its JSON form (as the API server or a hand
/// edit gives it): a field of the wrong type or a missing one is an
/// [`InvalidObject`] naming it, never a panic.
pub fn parse<K: Resource<DynamicType = ()> + DeserializeOwned>(value: serde_json::Value) -> Result<K, InvalidObject> {
    let name = value.pointer("/metadata/name").and_then(|n| n.as_str()).unwrap_or_default().to_owned();
    serde_json::from_value(value).map_err(|e| InvalidObject::named::<K>(name, e.to_string()))
}

/// Whether `name` can name a Node: a DNS subdomain (RFC 1123) of at most 253
/// characters, as Kubernetes requires of Node names.
pub fn is_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NODE_NAME
        && name.split('.').all(|label| {
            let bytes = label.as_bytes();
            !bytes.is_empty()
                && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
                && bytes[0] != b'-'
                && bytes[bytes.len() - 1] != b'-'
        })
}

/// `field` names a Node, or the reason it does not.
pub(crate) fn check_node_name(field: &str, name: &str) -> Result<(), String> {
    if is_node_name(name) {
        Ok(())
    } else {
        Err(format!("{field} {name:?} is not a Node name (a DNS subdomain of at most {MAX_NODE_NAME} characters)"))
    }
}
