//! The built-in issuer's Secrets: the CA's, created once, and each
//! holder's `kubernetes.io/tls` Secret (`ca.crt`, `tls.crt`, `tls.key`),
//! issued when missing, wrong or due for renewal.
//!
//! Every write is conditional, so controller replicas need no leader:
//! creating a Secret that another replica created first fails with 409 and
//! the winner's is read; a renewal replaces the Secret at the
//! resourceVersion it read, so of two replicas renewing at once one
//! succeeds and the other, refused, reads the fresh certificate and keeps it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;

use super::authority::{Authority, Subject};
use super::{ANNOTATION_NOT_AFTER, ANNOTATION_RENEW_AFTER, managed_labels};
use crate::error::{Error, Result};
use crate::storage::FIELD_MANAGER;
use csi_events::tls_secret::{CA_FILE, CERT_FILE, KEY_FILE};

/// Reads and writes before giving up on a Secret other writers keep changing.
const ATTEMPTS: usize = 3;
/// The CA Secret's holder label.
const CA_HOLDER: &str = "ca";

fn post() -> PostParams {
    PostParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..Default::default() }
}

fn data_str<'a>(secret: &'a Secret, key: &str) -> Option<&'a str> {
    secret.data.as_ref()?.get(key).and_then(|v| std::str::from_utf8(&v.0).ok())
}

fn timestamp(t: SystemTime) -> String {
    Timestamp::try_from(t).map(|t| t.to_string()).unwrap_or_default()
}

/// The CA in Secret `name`, made (valid for `lifetime`) if there is none.
pub async fn load_or_create_ca(api: &Api<Secret>, name: &str, lifetime: Duration) -> Result<Authority> {
    let what = format!("the CA Secret {name}");
    for _ in 0..ATTEMPTS {
        if let Some(secret) = api.get_opt(name).await.map_err(|e| Error::kube(&format!("reading {what}"), e))? {
            let (Some(cert), Some(key)) = (data_str(&secret, CERT_FILE), data_str(&secret, KEY_FILE)) else {
                return Err(Error::precondition(format!("{what} lacks {CERT_FILE} or {KEY_FILE}")));
            };
            return Authority::from_parts(cert.to_owned(), key)
                .map_err(|e| Error::precondition(format!("{what}: {e}")));
        }
        let now = SystemTime::now();
        let (authority, key_pem) = Authority::generate(now, lifetime)?;
        let cert = authority.cert_pem().as_bytes();
        let secret = tls_secret(name, CA_HOLDER, cert, cert, key_pem.as_bytes(), None, BTreeMap::new());
        match api.create(&post(), &secret).await {
            Ok(_) => {
                tracing::info!(secret = name, lifetime_s = lifetime.as_secs(), "created the cluster CA");
                return Ok(authority);
            }
            // Another replica made it first: read theirs.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(Error::kube(&format!("creating {what}"), e)),
        }
    }
    Err(Error::unavailable(format!("{what} could not be read or created after {ATTEMPTS} attempts")))
}

fn tls_secret(
    name: &str,
    holder: &str,
    ca: &[u8],
    cert: &[u8],
    key: &[u8],
    owner: Option<OwnerReference>,
    annotations: BTreeMap<String, String>,
) -> Secret {
    let data = [(CA_FILE, ca), (CERT_FILE, cert), (KEY_FILE, key)];
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(managed_labels(holder)),
            annotations: Some(annotations),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        data: Some(data.into_iter().map(|(k, v)| (k.to_owned(), ByteString(v.to_vec()))).collect()),
        type_: Some("kubernetes.io/tls".to_owned()),
        ..Default::default()
    }
}

/// When the certificate in `secret` is due for renewal, if it is one this
/// CA issued for `subject`, valid now, with this CA as `ca.crt`; `None`:
/// it must be issued again.
pub fn renewal_due(secret: &Secret, authority: &Authority, subject: &Subject, now: SystemTime) -> Option<SystemTime> {
    let renew_after: Timestamp = secret.metadata.annotations.as_ref()?.get(ANNOTATION_RENEW_AFTER)?.parse().ok()?;
    let renew_after = SystemTime::from(renew_after);
    if renew_after <= now || data_str(secret, CA_FILE)? != authority.cert_pem() {
        return None;
    }
    let (cert, key) = (data_str(secret, CERT_FILE)?, data_str(secret, KEY_FILE)?);
    // Valid now and still at its renewal time: a forged or stale
    // annotation cannot stretch a certificate past its end.
    for at in [now, renew_after] {
        if let Err(problem) = authority.check(cert, key, subject, at) {
            tracing::info!(secret = ?secret.metadata.name, problem, "certificate to be issued again");
            return None;
        }
    }
    Some(renew_after)
}

/// Makes Secret `name` hold a current certificate for `subject` (valid for
/// `lifetime`), owned by `owner`; returns when it is due for renewal.
pub async fn ensure(
    api: &Api<Secret>,
    name: &str,
    holder: &str,
    subject: &Subject,
    owner: Option<OwnerReference>,
    authority: &Authority,
    lifetime: Duration,
) -> Result<SystemTime> {
    let what = format!("TLS Secret {name}");
    for _ in 0..ATTEMPTS {
        let existing = api.get_opt(name).await.map_err(|e| Error::kube(&format!("reading {what}"), e))?;
        let now = SystemTime::now();
        if let Some(due) = existing.as_ref().and_then(|s| renewal_due(s, authority, subject, now)) {
            return Ok(due);
        }
        let issued = authority.issue(subject, now, lifetime)?;
        let annotations = BTreeMap::from([
            (ANNOTATION_RENEW_AFTER.to_owned(), timestamp(issued.renew_after())),
            (ANNOTATION_NOT_AFTER.to_owned(), timestamp(issued.not_after)),
        ]);
        let ca = authority.cert_pem().as_bytes();
        let mut secret = tls_secret(
            name,
            holder,
            ca,
            issued.cert_pem.as_bytes(),
            issued.key_pem.as_bytes(),
            owner.clone(),
            annotations,
        );
        let written = match existing {
            None => api.create(&post(), &secret).await,
            Some(old) => {
                // Conditional on what was read; other labels are kept.
                secret.metadata.resource_version = old.metadata.resource_version;
                let mut labels = old.metadata.labels.unwrap_or_default();
                labels.extend(secret.metadata.labels.take().unwrap_or_default());
                secret.metadata.labels = Some(labels);
                api.replace(name, &post(), &secret).await
            }
        };
        match written {
            Ok(_) => {
                tracing::info!(
                    secret = name,
                    holder,
                    renew_after = %timestamp(issued.renew_after()),
                    not_after = %timestamp(issued.not_after),
                    "certificate issued"
                );
                return Ok(issued.renew_after());
            }
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(Error::kube(&format!("writing {what}"), e)),
        }
    }
    Err(Error::unavailable(format!("{what} kept changing under {ATTEMPTS} attempts to write it")))
}

#[cfg(test)]
mod tests {
    use super::super::LABEL_HOLDER;
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn secret_for(authority: &Authority, subject: &Subject, now: SystemTime, lifetime: Duration) -> Secret {
        let issued = authority.issue(subject, now, lifetime).unwrap();
        let annotations = BTreeMap::from([(ANNOTATION_RENEW_AFTER.to_owned(), timestamp(issued.renew_after()))]);
        let ca = authority.cert_pem().as_bytes();
        tls_secret("s", LABEL_HOLDER, ca, issued.cert_pem.as_bytes(), issued.key_pem.as_bytes(), None, annotations)
    }

    #[test]
    fn a_fresh_secret_is_kept_until_two_thirds_of_its_lifetime() {
        let now = SystemTime::now();
        let (ca, _) = Authority::generate(now, 100 * HOUR).unwrap();
        let node = Subject::Node("n1".into());
        let secret = secret_for(&ca, &node, now, 3 * HOUR);
        let due = renewal_due(&secret, &ca, &node, now).expect("fresh");
        let expected = now + 2 * HOUR;
        assert!(due.duration_since(expected).unwrap_or_else(|e| e.duration()) < Duration::from_secs(1));
        assert_eq!(renewal_due(&secret, &ca, &node, due + Duration::from_secs(1)), None);
        assert!(renewal_due(&secret, &ca, &node, due - Duration::from_secs(60)).is_some());
    }

    #[test]
    fn another_subject_another_ca_or_a_stretched_annotation_means_issuing_again() {
        let now = SystemTime::now();
        let (ca, _) = Authority::generate(now, 100 * HOUR).unwrap();
        let (other_ca, _) = Authority::generate(now, 100 * HOUR).unwrap();
        let agent = Subject::Server { addresses: vec!["10.0.0.1".parse().unwrap()], node: Some("s1".into()) };
        let secret = secret_for(&ca, &agent, now, HOUR);
        assert!(renewal_due(&secret, &ca, &agent, now).is_some());
        let moved = Subject::Server { addresses: vec!["10.0.0.2".parse().unwrap()], node: Some("s1".into()) };
        assert_eq!(renewal_due(&secret, &ca, &moved, now), None);
        assert_eq!(renewal_due(&secret, &other_ca, &agent, now), None);
        let mut stretched = secret.clone();
        let later = timestamp(now + 10 * HOUR);
        stretched.metadata.annotations.as_mut().unwrap().insert(ANNOTATION_RENEW_AFTER.to_owned(), later);
        assert_eq!(renewal_due(&stretched, &ca, &agent, now), None);
        let mut bare = secret;
        bare.metadata.annotations = None;
        assert_eq!(renewal_due(&bare, &ca, &agent, now), None);
    }

    mod api {
        use csi_events::mock_api::{self, json_body, reply, status};
        use http::{Method, StatusCode};

        use super::*;

        const DAY: Duration = Duration::from_secs(86_400);

        fn with_version(mut secret: Secret, version: &str) -> serde_json::Value {
            secret.metadata.resource_version = Some(version.to_owned());
            serde_json::to_value(secret).unwrap()
        }

        #[tokio::test]
        async fn a_replica_that_loses_the_race_to_create_the_ca_uses_the_winners() {
            let (client, mut handle) = mock_api::client();
            let api: Api<Secret> = Api::namespaced(client, "ns");
            let (winner, winner_key) = Authority::generate(SystemTime::now(), DAY).unwrap();
            let cert = winner.cert_pem().as_bytes();
            let winners = tls_secret("p-ca", "ca", cert, cert, winner_key.as_bytes(), None, BTreeMap::new());
            let server = tokio::spawn(async move {
                let (request, send) = handle.next_request().await.unwrap();
                assert_eq!(
                    (request.method(), request.uri().path()),
                    (&Method::GET, "/api/v1/namespaces/ns/secrets/p-ca")
                );
                reply(send, StatusCode::NOT_FOUND, &status(404, "NotFound", "secrets \"p-ca\" not found"));
                let (request, send) = handle.next_request().await.unwrap();
                assert_eq!(request.method(), Method::POST);
                let body = json_body(request).await;
                assert_eq!(body["type"], "kubernetes.io/tls");
                reply(send, StatusCode::CONFLICT, &status(409, "AlreadyExists", "secrets \"p-ca\" already exists"));
                let (request, send) = handle.next_request().await.unwrap();
                assert_eq!(request.method(), Method::GET);
                reply(send, StatusCode::OK, &with_version(winners, "7"));
            });
            let ca = load_or_create_ca(&api, "p-ca", DAY).await.unwrap();
            assert_eq!(ca.cert_pem(), winner.cert_pem());
            server.await.unwrap();
        }

        #[tokio::test]
        async fn a_renewal_replaces_at_the_version_read_and_one_that_loses_keeps_the_winners() {
            let (client, mut handle) = mock_api::client();
            let api: Api<Secret> = Api::namespaced(client, "ns");
            let now = SystemTime::now();
            let (ca, _) = Authority::generate(now, 100 * DAY).unwrap();
            let node = Subject::Node("w1".into());
            let mut stale = secret_for(&ca, &node, now, DAY);
            stale.metadata.annotations.as_mut().unwrap().insert(ANNOTATION_RENEW_AFTER.into(), timestamp(now));
            let winners = secret_for(&ca, &node, now, DAY);
            let winners_due = winners.metadata.annotations.as_ref().unwrap()[ANNOTATION_RENEW_AFTER].clone();
            let server = tokio::spawn(async move {
                let (_, send) = handle.next_request().await.unwrap();
                reply(send, StatusCode::OK, &with_version(stale, "5"));
                let (request, send) = handle.next_request().await.unwrap();
                assert_eq!((request.method(), request.uri().path()), (&Method::PUT, "/api/v1/namespaces/ns/secrets/s"));
                let body = json_body(request).await;
                assert_eq!(body["metadata"]["resourceVersion"], "5", "replaced at the version read");
                assert_eq!(body["metadata"]["labels"][LABEL_HOLDER], "node");
                reply(send, StatusCode::CONFLICT, &status(409, "Conflict", "the object has been modified"));
                let (_, send) = handle.next_request().await.unwrap();
                reply(send, StatusCode::OK, &with_version(winners, "6"));
            });
            let due = ensure(&api, "s", "node", &node, None, &ca, DAY).await.unwrap();
            assert_eq!(timestamp(due), winners_due, "the winner's certificate is kept, not replaced again");
            server.await.unwrap();
        }
    }
}
