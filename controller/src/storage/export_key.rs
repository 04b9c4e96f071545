//! The cluster's export-name key, kept in a Secret: the controller derives
//! the export names it hands out in publish contexts from it, and every
//! agent mounts the same Secret as the file `ExportKey::from_file` reads.
//! The Secret's `key` holds the raw key bytes, so the mounted file is
//! exactly those bytes: no encoding, no newline.
//!
//! The first controller to start creates it with 32 bytes from the
//! system's random source; a replica that loses that race (409) reads the
//! winner's, so every replica and agent ends up with one key. The key is
//! never replaced: every export name handed out so far derives from it.

use std::collections::BTreeMap;

use agent::resources::ExportKey;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;
use ring::rand::SecureRandom;

use super::FIELD_MANAGER;
use crate::error::{Error, Result};

/// The Secret's data key holding the key bytes.
pub const SECRET_KEY: &str = "key";
/// Bytes of a new key: HMAC-SHA256's output size.
const NEW_KEY_LEN: usize = 32;
/// Reads and creates before giving up on a Secret that keeps appearing
/// and vanishing.
const ATTEMPTS: usize = 3;

/// The key in Secret `name` of `namespace`, created if missing.
pub async fn load_or_create(client: kube::Client, namespace: &str, name: &str) -> Result<ExportKey> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let what = format!("export-name key Secret {namespace}/{name}");
    for _ in 0..ATTEMPTS {
        if let Some(secret) = api.get_opt(name).await.map_err(|e| Error::kube(&format!("reading the {what}"), e))? {
            return key_of(&secret, &what);
        }
        let mut bytes = [0u8; NEW_KEY_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| Error::internal("the system's random source failed"))?;
        let params = PostParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..Default::default() };
        match api.create(&params, &new_secret(name, &bytes)).await {
            Ok(_) => {
                tracing::info!(secret = %format!("{namespace}/{name}"), "created the export-name key");
                return key_of_bytes(&bytes, &what);
            }
            // Another replica created it first: read theirs.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(Error::kube(&format!("creating the {what}"), e)),
        }
    }
    Err(Error::unavailable(format!("the {what} could not be read or created after {ATTEMPTS} attempts")))
}

/// A Secret holding `bytes` under [`SECRET_KEY`]; immutable, since
/// changing it would change every export name.
pub fn new_secret(name: &str, bytes: &[u8]) -> Secret {
    Secret {
        metadata: ObjectMeta { name: Some(name.to_owned()), ..Default::default() },
        data: Some(BTreeMap::from([(SECRET_KEY.to_owned(), ByteString(bytes.to_vec()))])),
        immutable: Some(true),
        type_: Some("Opaque".to_owned()),
        ..Default::default()
    }
}

fn key_of(secret: &Secret, what: &str) -> Result<ExportKey> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|data| data.get(SECRET_KEY))
        .ok_or_else(|| Error::precondition(format!("the {what} has no data key {SECRET_KEY:?}")))?;
    key_of_bytes(&bytes.0, what)
}

fn key_of_bytes(bytes: &[u8], what: &str) -> Result<ExportKey> {
    ExportKey::new(bytes).map_err(|e| Error::precondition(format!("the {what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mounted_file_is_the_raw_key_and_names_exports_as_the_controller_does() {
        let bytes: Vec<u8> = (0..32).map(|i| i * 7 + 1).collect();
        let secret = new_secret("nbd-csi-export-key", &bytes);
        // On the wire the API server gets base64 of the raw bytes; a
        // Secret volume writes the decoded bytes as the file.
        let json = serde_json::to_value(&secret).unwrap();
        let encoded = json["data"][SECRET_KEY].as_str().unwrap().to_owned();
        let decoded: ByteString = serde_json::from_value(serde_json::Value::String(encoded)).unwrap();
        assert_eq!(decoded.0, bytes);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(SECRET_KEY);
        std::fs::write(&file, &decoded.0).unwrap();
        let agent_key = ExportKey::from_file(&file).unwrap();
        let controller_key = key_of(&secret, "test").unwrap();
        let id = "vol-0123456789abcdef0123456789abcdef";
        assert_eq!(agent_key.export_name(id), controller_key.export_name(id));
        assert_eq!(json["immutable"], true);
    }

    #[test]
    fn a_secret_without_a_usable_key_is_a_clear_error() {
        let empty = Secret { data: Some(BTreeMap::new()), ..Default::default() };
        let e = key_of(&empty, "Secret x").unwrap_err();
        assert!(e.to_string().contains("no data key \"key\""), "{e}");
        let short = new_secret("x", &[1; 8]);
        let e = key_of(&short, "Secret x").unwrap_err();
        assert!(e.to_string().contains("8 bytes"), "{e}");
    }
}
