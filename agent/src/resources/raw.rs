//! Objects as the API server hands them out, before they are read as
//! their types: what the agent watches, so that one object it cannot read
//! (a field a newer version of the CRD allows, during an upgrade) is
//! reported on that object instead of failing the list of all of them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::invalid::{InvalidObject, parse};
use super::{NbdSnapshot, NbdVolume};

/// An NbdVolume, read only as far as its metadata.
#[derive(kube::Resource, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[resource(inherit = NbdVolume)]
pub struct RawVolume {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Value>,
}

/// An NbdSnapshot, read only as far as its metadata.
#[derive(kube::Resource, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[resource(inherit = NbdSnapshot)]
pub struct RawSnapshot {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Value>,
}

/// The typed object of a raw one; an [`InvalidObject`] naming the field
/// it cannot read.
pub(crate) fn typed<K>(metadata: &ObjectMeta, spec: &Value, status: Option<&Value>) -> Result<K, InvalidObject>
where
    K: Resource<DynamicType = ()> + DeserializeOwned,
{
    let value = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": metadata,
        "spec": spec,
    });
    let Some(status) = status else { return parse(value) };
    let mut with_status = value.clone();
    with_status["status"] = status.clone();
    // A status that does not read is the agent's to rewrite, not a reason
    // to refuse the spec.
    parse(with_status).or_else(|invalid| parse(value).map_err(|_| invalid))
}

impl RawVolume {
    pub fn typed(&self) -> Result<NbdVolume, InvalidObject> {
        typed(&self.metadata, &self.spec, self.status.as_ref())
    }

    /// `spec.storageNode`, when it is a string.
    pub fn storage_node(&self) -> Option<&str> {
        self.spec.get("storageNode").and_then(Value::as_str)
    }

    pub fn id(&self) -> String {
        self.name_any()
    }
}

impl RawSnapshot {
    pub fn typed(&self) -> Result<NbdSnapshot, InvalidObject> {
        typed(&self.metadata, &self.spec, self.status.as_ref())
    }

    pub fn storage_node(&self) -> Option<&str> {
        self.spec.get("storageNode").and_then(Value::as_str)
    }

    pub fn id(&self) -> String {
        self.name_any()
    }
}
