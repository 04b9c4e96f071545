//! The CustomResourceDefinitions, generated from the types: what
//! `nbd-csi-controller crds` prints and the chart carries, byte for byte
//! (a test compares them).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::{NbdSnapshot, NbdStorageNode, NbdVolume};

/// The chart's copy, from the repository root.
pub const CRD_FILE: &str = "charts/nbd-csi/crds/nbd.csi.dev.yaml";

const HEADER: &str = "# The nbd.csi.dev custom resources, generated from agent/src/resources.\n\
                      # Do not edit: regenerate with `cargo run -p nbd-csi-controller -- crds > charts/nbd-csi/crds/nbd.csi.dev.yaml`.\n";

/// The three definitions, storage nodes first.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![NbdStorageNode::crd(), NbdVolume::crd(), NbdSnapshot::crd()]
}

/// [`crds`] as one YAML stream, a document each.
pub fn crds_yaml() -> Result<String, serde_saphyr::SerializeError> {
    let mut out = String::from(HEADER);
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}
