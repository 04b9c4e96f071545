//! With cert-manager: one `cert-manager.io/v1` Certificate per holder,
//! named like the holder's Secret and writing into it, issued by the CA
//! Issuer the chart renders. cert-manager makes the key, signs, fills
//! `ca.crt`, `tls.crt` and `tls.key` and renews `renewBefore` the end, so
//! the holders' file sync is the same as with the built-in issuer. The
//! controller only keeps each Certificate's spec (server-side apply:
//! idempotent, no read first).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, ValidationDirective};
use serde_json::{Value, json};

use super::authority::Subject;
use super::managed_labels;
use crate::error::{Error, Result};
use crate::storage::FIELD_MANAGER;

/// The Certificate kind.
pub fn certificate_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate"), "certificates")
}

/// A Go duration cert-manager reads ("2160h" is "7776000s").
fn go_duration(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

/// The Certificate for `subject`, writing Secret `name`.
pub fn certificate(
    name: &str,
    holder: &str,
    subject: &Subject,
    owner: Option<OwnerReference>,
    issuer: &str,
    lifetime: Duration,
) -> Value {
    let (dns_names, ip_addresses, usage): (Vec<String>, Vec<String>, &str) = match subject {
        Subject::Node(node) => (vec![node.clone()], vec![], "client auth"),
        Subject::Server { addresses, node } => {
            (node.iter().cloned().collect(), addresses.iter().map(ToString::to_string).collect(), "server auth")
        }
    };
    let mut spec = json!({
        "secretName": name,
        "secretTemplate": { "labels": managed_labels(holder) },
        "issuerRef": { "group": "cert-manager.io", "kind": "Issuer", "name": issuer },
        "duration": go_duration(lifetime),
        // Renewed two thirds into the lifetime, as the built-in issuer does.
        "renewBefore": go_duration(lifetime / 3),
        "commonName": dns_names.first().cloned().or_else(|| ip_addresses.first().cloned()),
        "usages": ["digital signature", usage],
        "privateKey": { "algorithm": "ECDSA", "size": 256, "encoding": "PKCS8", "rotationPolicy": "Always" },
    });
    if !dns_names.is_empty() {
        spec["dnsNames"] = json!(dns_names);
    }
    if !ip_addresses.is_empty() {
        spec["ipAddresses"] = json!(ip_addresses);
    }
    let mut metadata = json!({ "name": name, "labels": managed_labels(holder) });
    if let Some(owner) = owner {
        metadata["ownerReferences"] = json!([owner]);
    }
    json!({ "apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": metadata, "spec": spec })
}

/// Applies the Certificate (created, or its spec made this one). Strict:
/// a field cert-manager's CRD does not know is an error, not dropped.
pub async fn apply(api: &Api<DynamicObject>, name: &str, certificate: &Value) -> Result<()> {
    let params = PatchParams::apply(FIELD_MANAGER).force().validation(ValidationDirective::Strict);
    api.patch(name, &params, &Patch::Apply(certificate))
        .await
        .map_err(|e| Error::kube(&format!("applying cert-manager Certificate {name}"), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_gets_a_client_certificate_naming_it_and_an_agent_a_server_one() {
        let node =
            certificate("p-node-w1", "node", &Subject::Node("w1".into()), None, "p-ca", Duration::from_secs(7200));
        assert_eq!(node["spec"]["secretName"], "p-node-w1");
        assert_eq!(node["spec"]["dnsNames"], json!(["w1"]));
        assert!(node["spec"].get("ipAddresses").is_none());
        assert_eq!(node["spec"]["usages"], json!(["digital signature", "client auth"]));
        assert_eq!(node["spec"]["issuerRef"]["name"], "p-ca");
        assert_eq!(
            (node["spec"]["duration"].as_str(), node["spec"]["renewBefore"].as_str()),
            (Some("7200s"), Some("2400s"))
        );
        let agent = Subject::Server { addresses: vec!["10.1.2.3".parse().unwrap()], node: Some("s1".into()) };
        let agent = certificate("p-storage-s1", "storage", &agent, None, "p-ca", Duration::from_secs(7200));
        assert_eq!(agent["spec"]["ipAddresses"], json!(["10.1.2.3"]));
        assert_eq!(agent["spec"]["dnsNames"], json!(["s1"]));
        assert_eq!(agent["spec"]["usages"], json!(["digital signature", "server auth"]));
    }
}
