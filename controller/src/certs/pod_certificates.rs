//! The certificates of the node plugins and the storage agents as
//! Kubernetes pod certificates (`certificates.k8s.io/v1`
//! PodCertificateRequest), with the built-in CA as the signer.
//!
//! Why not Secrets: a DaemonSet's pods cannot be limited by RBAC to their
//! own node's Secret, so a holder that reads its certificate from a Secret
//! may read every Secret of the namespace, the CA's key among them, and one
//! compromised node would then impersonate every other. With a
//! `podCertificate` projected volume the kubelet makes the key on the node
//! (it never leaves it), asks this signer through a PodCertificateRequest
//! that the API server has checked (the pod, its node, its service account,
//! the CSR's signature), writes the key and the chain into the pod as one
//! credential bundle, and asks again before the end. The holders read no
//! Secret at all; the CA certificate (public) reaches them through a
//! ConfigMap ([`keep_ca_config_map`]).
//!
//! Two signers: `<driver>/node` issues a node plugin's client certificate
//! (its one DNS name: the node, the name NBD exports admit) and
//! `<driver>/storage` a storage agent's server certificate (the node's
//! addresses, one of which the agent listens on, and its name). What is
//! checked: the request names one of them and comes from a pod of that
//! signer's service account in our namespace (a pod of any other account
//! on that node could otherwise get the node's identity), with no
//! annotations we do not know. The node is `spec.nodeName`, the one the API
//! server says the pod runs on.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::certificates::v1::{PodCertificateRequest, PodCertificateRequestStatus};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use rcgen::CertificateSigningRequestParams;
use rustls_pki_types::CertificateSigningRequestDer;

use super::authority::{Authority, Subject, renew_after};
use super::managed_labels;
use crate::error::{Error, Result};
use crate::storage::FIELD_MANAGER;
use csi_events::tls_secret::CA_FILE;

/// The API server refuses certificates shorter than this.
const MIN_LIFETIME: Duration = Duration::from_secs(3600);
/// What the API server assumes when a request gives no maximum.
const DEFAULT_MAX_EXPIRATION: Duration = Duration::from_secs(86_400);
/// Certificates start this far in the past, so a peer whose clock is a
/// little behind accepts them at once; the API server wants notBefore
/// within 5 minutes of its own clock, so less than the Secret path's 5.
const BACKDATE: Duration = Duration::from_secs(60);

/// Whose certificate a signer issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A node plugin's client certificate.
    Node,
    /// A storage agent's server certificate.
    Storage,
}

impl Role {
    /// The signer's name for `driver` (`nbd.csi.dev/node`, `nbd.csi.dev/storage`).
    pub fn signer_name(self, driver: &str) -> String {
        match self {
            Self::Node => format!("{driver}/node"),
            Self::Storage => format!("{driver}/storage"),
        }
    }
}

/// One signer: its name, its role, and the service account whose pods it
/// certifies (in the signer's namespace).
#[derive(Debug, Clone)]
pub struct Signer {
    pub name: String,
    pub role: Role,
    pub service_account: String,
}

/// Whose requests are answered, and for how long they are certified.
#[derive(Debug, Clone)]
pub struct Policy {
    pub signers: Vec<Signer>,
    /// The longest lifetime (`--tls-cert-lifetime`); a request may ask
    /// for less.
    pub lifetime: Duration,
}

impl Policy {
    /// The signer `request` asks, if it is one of ours.
    pub fn signer(&self, request: &PodCertificateRequest) -> Option<&Signer> {
        self.signers.iter().find(|s| s.name == request.spec.signer_name)
    }

    /// The lifetime for a request that allows at most `max` seconds.
    fn lifetime(&self, max: Option<i32>) -> Duration {
        let max = max.and_then(|s| u64::try_from(s).ok()).map_or(DEFAULT_MAX_EXPIRATION, Duration::from_secs);
        self.lifetime.min(max).max(MIN_LIFETIME)
    }
}

/// What to do with a request.
#[derive(Debug)]
pub enum Decision {
    /// Not ours, or already answered.
    Ignore,
    Issue(PodCertificateRequestStatus),
    Deny {
        reason: &'static str,
        message: String,
    },
}

fn time(t: SystemTime) -> Result<Time> {
    Timestamp::try_from(t).map(Time).map_err(|e| Error::internal(format!("time out of range: {e}")))
}

/// `t` without its fraction of a second: X.509 keeps whole seconds, and
/// the status's times must equal the certificate's.
fn whole_seconds(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs())
}

fn answered(request: &PodCertificateRequest) -> bool {
    let Some(status) = &request.status else { return false };
    status.certificate_chain.is_some()
        || status.conditions.iter().flatten().any(|c| matches!(c.type_.as_str(), "Issued" | "Denied" | "Failed"))
}

fn deny(reason: &'static str, message: String) -> Result<Decision> {
    Ok(Decision::Deny { reason, message })
}

/// The decision on `request` in `namespace` at `now`; `node_addresses`:
/// the addresses of its node (`spec.nodeName`), which a storage agent's
/// certificate names.
pub fn decide(
    request: &PodCertificateRequest,
    namespace: &str,
    policy: &Policy,
    authority: &Authority,
    node_addresses: &[IpAddr],
    now: SystemTime,
) -> Result<Decision> {
    let spec = &request.spec;
    let Some(signer) = policy.signer(request).filter(|_| !answered(request)) else {
        return Ok(Decision::Ignore);
    };
    let from = request.metadata.namespace.as_deref().unwrap_or_default();
    if from != namespace || spec.service_account_name != signer.service_account {
        let message = format!(
            "{} issues certificates only to pods of service account {namespace}/{}; pod {from}/{} runs as {:?}",
            signer.name, signer.service_account, spec.pod_name, spec.service_account_name
        );
        return deny("NotTheHolder", message);
    }
    if let Some(keys) = spec.unverified_user_annotations.as_ref().filter(|a| !a.is_empty()) {
        return deny("UnknownAnnotations", format!("{} reads no user annotations; got {:?}", signer.name, keys.keys()));
    }
    let subject = match signer.role {
        Role::Node => Subject::Node(spec.node_name.clone()),
        Role::Storage if node_addresses.is_empty() => {
            let message = format!("node {:?} has no address for a server certificate to name", spec.node_name);
            return deny("NoNodeAddress", message);
        }
        Role::Storage => Subject::Server { addresses: node_addresses.to_vec(), node: Some(spec.node_name.clone()) },
    };
    let der = CertificateSigningRequestDer::from(spec.stub_pkc_s10_request.0.as_slice());
    let public_key = match CertificateSigningRequestParams::from_der(&der) {
        Ok(csr) => csr.public_key,
        Err(e) => {
            return deny("UnsupportedKeyType", format!("the request's key cannot be certified ({e}); ECDSAP256 can"));
        }
    };
    let not_before = whole_seconds(now) - BACKDATE;
    let not_after = not_before + policy.lifetime(spec.max_expiration_seconds);
    let chain = authority.certify(&subject, &public_key, not_before, not_after)?;
    let issued = Condition {
        type_: "Issued".to_owned(),
        status: "True".to_owned(),
        reason: "Issued".to_owned(),
        message: format!("{:?} certificate for node {} from the nbd-csi cluster CA", signer.role, spec.node_name),
        last_transition_time: time(whole_seconds(now))?,
        observed_generation: request.metadata.generation,
    };
    Ok(Decision::Issue(PodCertificateRequestStatus {
        certificate_chain: Some(chain),
        not_before: Some(time(not_before)?),
        not_after: Some(time(not_after)?),
        begin_refresh_at: Some(time(renew_after(not_before + BACKDATE, not_after))?),
        conditions: Some(vec![issued]),
    }))
}

/// The addresses a storage agent on `node` may listen on: the Node's
/// InternalIP and ExternalIP (an agent listens on its pod's `status.hostIP`,
/// one of them).
pub fn node_addresses(node: &Node) -> Vec<IpAddr> {
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    addresses
        .into_iter()
        .flatten()
        .filter(|a| matches!(a.type_.as_str(), "InternalIP" | "ExternalIP"))
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

/// Answers `request` (see [`decide`]) through its status subresource.
pub async fn answer(
    api: &Api<PodCertificateRequest>,
    nodes: &Api<Node>,
    request: &PodCertificateRequest,
    namespace: &str,
    policy: &Policy,
    authority: &Authority,
) -> Result<()> {
    let name = request.metadata.name.clone().unwrap_or_default();
    let addresses = match policy.signer(request) {
        Some(Signer { role: Role::Storage, .. }) => {
            let node = &request.spec.node_name;
            let found = nodes.get_opt(node).await.map_err(|e| Error::kube(&format!("reading Node {node}"), e))?;
            found.as_ref().map(node_addresses).unwrap_or_default()
        }
        _ => Vec::new(),
    };
    let spec = &request.spec;
    let status = match decide(request, namespace, policy, authority, &addresses, SystemTime::now())? {
        Decision::Ignore => return Ok(()),
        Decision::Issue(status) => {
            tracing::info!(
                request = name,
                signer = spec.signer_name,
                node = spec.node_name,
                pod = spec.pod_name,
                "pod certificate issued"
            );
            status
        }
        Decision::Deny { reason, message } => {
            tracing::warn!(request = name, signer = spec.signer_name, reason, message, "pod certificate denied");
            let denied = Condition {
                type_: "Denied".to_owned(),
                status: "True".to_owned(),
                reason: reason.to_owned(),
                message,
                last_transition_time: time(whole_seconds(SystemTime::now()))?,
                observed_generation: request.metadata.generation,
            };
            PodCertificateRequestStatus { conditions: Some(vec![denied]), ..Default::default() }
        }
    };
    // At the version read: of two controller replicas answering at once,
    // one wins and the other's 409 means the request is answered.
    let version = request.metadata.resource_version.clone();
    let patch = serde_json::json!({ "metadata": { "resourceVersion": version }, "status": status });
    match api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            tracing::debug!(request = name, "PodCertificateRequest changed meanwhile (another replica answered)");
            Ok(())
        }
        Err(e) => Err(Error::kube(&format!("answering PodCertificateRequest {name}"), e)),
    }
}

/// Makes ConfigMap `name` hold the CA certificate as `ca.crt`, which the
/// holders' projected volumes mount beside their pod certificate.
pub async fn keep_ca_config_map(api: &Api<ConfigMap>, name: &str, ca_pem: &str) -> Result<()> {
    let what = format!("the CA ConfigMap {name}");
    let wanted = ConfigMap {
        metadata: ObjectMeta { name: Some(name.to_owned()), labels: Some(managed_labels("ca")), ..Default::default() },
        data: Some([(CA_FILE.to_owned(), ca_pem.to_owned())].into()),
        ..Default::default()
    };
    let post = PostParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..Default::default() };
    let existing = api.get_opt(name).await.map_err(|e| Error::kube(&format!("reading {what}"), e))?;
    let written = match existing {
        None => api.create(&post, &wanted).await,
        Some(existing) if existing.data.as_ref().and_then(|d| d.get(CA_FILE)).map(String::as_str) == Some(ca_pem) => {
            return Ok(());
        }
        Some(existing) => {
            let mut replacement = wanted;
            replacement.metadata.resource_version = existing.metadata.resource_version;
            api.replace(name, &post, &replacement).await
        }
    };
    match written {
        Ok(_) => tracing::info!(config_map = name, "CA certificate published for the pod certificates' holders"),
        // Another replica wrote it first; the next look compares again.
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(e) => return Err(Error::kube(&format!("writing {what}"), e)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use k8s_openapi::ByteString;
    use k8s_openapi::api::certificates::v1::PodCertificateRequestSpec;
    use rcgen::{CertificateParams, KeyPair};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, UnixTime};

    use super::*;

    const NS: &str = "nbd-csi";
    const HOUR: Duration = Duration::from_secs(3600);

    fn policy() -> Policy {
        let signer = |role: Role, account: &str| Signer {
            name: role.signer_name("nbd.csi.dev"),
            role,
            service_account: account.into(),
        };
        Policy {
            signers: vec![signer(Role::Node, "nbd-csi-node"), signer(Role::Storage, "nbd-csi-storage")],
            lifetime: 2160 * HOUR,
        }
    }

    /// A request as the kubelet makes one: an empty CSR signed by a new key.
    fn request(key: &KeyPair, role: Role, account: &str, node: &str, max: Option<i32>) -> PodCertificateRequest {
        let csr = CertificateParams::default().serialize_request(key).unwrap();
        PodCertificateRequest {
            metadata: ObjectMeta {
                name: Some("req-1".into()),
                namespace: Some(NS.into()),
                generation: Some(1),
                ..Default::default()
            },
            spec: PodCertificateRequestSpec {
                signer_name: role.signer_name("nbd.csi.dev"),
                service_account_name: account.into(),
                node_name: node.into(),
                pod_name: "nbd-csi-node-abcde".into(),
                max_expiration_seconds: max,
                stub_pkc_s10_request: ByteString(csr.der().to_vec()),
                ..Default::default()
            },
            status: None,
        }
    }

    fn node_request(key: &KeyPair, account: &str) -> PodCertificateRequest {
        request(key, Role::Node, account, "worker-1", None)
    }

    fn ca(now: SystemTime) -> Authority {
        Authority::generate(now, 3650 * 24 * HOUR).unwrap().0
    }

    fn issued(decision: Decision) -> PodCertificateRequestStatus {
        match decision {
            Decision::Issue(status) => status,
            other => panic!("expected a certificate, got {other:?}"),
        }
    }

    fn denied(decision: Decision) -> (&'static str, String) {
        match decision {
            Decision::Deny { reason, message } => (reason, message),
            other => panic!("expected a denial, got {other:?}"),
        }
    }

    fn seconds(t: &Option<Time>) -> i64 {
        t.as_ref().unwrap().0.as_second()
    }

    /// The issued chain, with the kubelet's key, is a client certificate
    /// rustls accepts for the node, and the status's times are the
    /// certificate's.
    #[test]
    fn a_node_plugin_request_gets_a_client_certificate_for_its_node_and_key() {
        let now = SystemTime::now();
        let ca = ca(now);
        let key = KeyPair::generate().unwrap();
        let req = request(&key, Role::Node, "nbd-csi-node", "worker-1", Some(7_862_400));
        let status = issued(decide(&req, NS, &policy(), &ca, &[], now).unwrap());
        let chain = status.certificate_chain.clone().unwrap();
        ca.check(&chain, &key.serialize_pem(), &Subject::Node("worker-1".into()), now).unwrap();
        // 90 days (the policy), not the 91 the request allowed.
        assert_eq!(seconds(&status.not_after) - seconds(&status.not_before), 2160 * 3600);
        // Refreshed two thirds in: at least 10 minutes from either end, as
        // the API server requires.
        let begin = seconds(&status.begin_refresh_at);
        assert!(begin >= seconds(&status.not_before) + 600 && begin <= seconds(&status.not_after) - 600);
        // The certificate's validity is what the status says.
        let leaf = CertificateDer::from_pem_slice(chain.as_bytes()).unwrap();
        let verify = |t: i64| {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap()).unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
            verifier.verify_client_cert(&leaf, &[], UnixTime::since_unix_epoch(Duration::from_secs(t as u64))).is_ok()
        };
        assert!(verify(seconds(&status.not_before)) && verify(seconds(&status.not_after)));
        assert!(!verify(seconds(&status.not_before) - 1) && !verify(seconds(&status.not_after) + 1));
        let conditions = status.conditions.unwrap();
        assert_eq!((conditions[0].type_.as_str(), conditions[0].status.as_str()), ("Issued", "True"));
        // The kubelet's key is not ours to know: another key does not fit.
        let other = KeyPair::generate().unwrap();
        assert!(ca.check(&chain, &other.serialize_pem(), &Subject::Node("worker-1".into()), now).is_err());
    }

    /// The storage signer: a server certificate for the node's addresses
    /// and name, for the storage agents' service account only.
    #[test]
    fn a_storage_agent_request_gets_a_server_certificate_for_its_nodes_addresses() {
        let now = SystemTime::now();
        let ca = ca(now);
        let key = KeyPair::generate().unwrap();
        let mut agent = request(&key, Role::Storage, "nbd-csi-storage", "storage-1", None);
        let addresses: Vec<IpAddr> = vec!["192.0.2.7".parse().unwrap(), "2001:db8::7".parse().unwrap()];
        let status = issued(decide(&agent, NS, &policy(), &ca, &addresses, now).unwrap());
        let server = Subject::Server { addresses, node: Some("storage-1".into()) };
        ca.check(&status.certificate_chain.unwrap(), &key.serialize_pem(), &server, now).unwrap();
        assert_eq!(denied(decide(&agent, NS, &policy(), &ca, &[], now).unwrap()).0, "NoNodeAddress");
        // The node plugin's account cannot get a server certificate.
        agent.spec.service_account_name = "nbd-csi-node".into();
        assert_eq!(denied(decide(&agent, NS, &policy(), &ca, &[], now).unwrap()).0, "NotTheHolder");
    }

    #[test]
    fn node_addresses_are_the_internal_and_external_ips() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "storage-1"},
            "status": {"addresses": [
                {"type": "Hostname", "address": "storage-1"},
                {"type": "InternalIP", "address": "10.0.0.7"},
                {"type": "ExternalIP", "address": "203.0.113.7"},
                {"type": "InternalDNS", "address": "storage-1.internal"}
            ]}
        }))
        .unwrap();
        let want: Vec<IpAddr> = vec!["10.0.0.7".parse().unwrap(), "203.0.113.7".parse().unwrap()];
        assert_eq!(node_addresses(&node), want);
        assert!(node_addresses(&Node::default()).is_empty());
    }

    #[test]
    fn the_lifetime_is_the_shortest_allowed_and_never_under_an_hour() {
        let p = Policy { lifetime: 10 * HOUR, ..policy() };
        assert_eq!(p.lifetime(None), 10 * HOUR, "the API server's default is 24 h");
        assert_eq!(p.lifetime(Some(7200)), 2 * HOUR);
        assert_eq!(Policy { lifetime: 60 * HOUR, ..policy() }.lifetime(None), 24 * HOUR);
        assert_eq!(Policy { lifetime: Duration::from_secs(60), ..policy() }.lifetime(None), HOUR);
    }

    /// The answer goes through the status subresource at the version read;
    /// a 409 (another replica answered first) is no failure.
    #[tokio::test]
    async fn the_answer_is_a_status_patch_at_the_version_read_and_a_conflict_is_no_error() {
        use csi_events::mock_api::{self, json_body, reply, status};
        use http::{Method, StatusCode};

        let (client, mut handle) = mock_api::client();
        let requests: Api<PodCertificateRequest> = Api::namespaced(client.clone(), NS);
        let nodes: Api<Node> = Api::all(client);
        let ca = ca(SystemTime::now());
        let key = KeyPair::generate().unwrap();
        let mut req = node_request(&key, "nbd-csi-node");
        req.metadata.resource_version = Some("41".into());
        let stored = serde_json::to_value(&req).unwrap();
        let server = tokio::spawn(async move {
            for answer in [StatusCode::OK, StatusCode::CONFLICT] {
                let (request, send) = handle.next_request().await.unwrap();
                assert_eq!(
                    (request.method(), request.uri().path()),
                    (
                        &Method::PATCH,
                        "/apis/certificates.k8s.io/v1/namespaces/nbd-csi/podcertificaterequests/req-1/status"
                    )
                );
                let body = json_body(request).await;
                assert_eq!(body["metadata"]["resourceVersion"], "41");
                assert_eq!(body["status"]["conditions"][0]["type"], "Issued");
                assert!(
                    body["status"]["certificateChain"].as_str().unwrap().starts_with("-----BEGIN CERTIFICATE-----")
                );
                let reply_body =
                    if answer == StatusCode::OK { stored.clone() } else { status(409, "Conflict", "modified") };
                reply(send, answer, &reply_body);
            }
        });
        answer(&requests, &nodes, &req, NS, &policy(), &ca).await.unwrap();
        answer(&requests, &nodes, &req, NS, &policy(), &ca).await.expect("a conflict means answered");
        server.await.unwrap();
    }

    #[test]
    fn other_accounts_namespaces_annotations_and_signers_are_not_certified() {
        let now = SystemTime::now();
        let ca = ca(now);
        let key = KeyPair::generate().unwrap();
        let decide_now = |r: &PodCertificateRequest| decide(r, NS, &policy(), &ca, &[], now).unwrap();
        let (reason, message) = denied(decide_now(&node_request(&key, "default")));
        assert_eq!(reason, "NotTheHolder");
        assert!(message.contains("nbd-csi/nbd-csi-node") && message.contains("\"default\""), "{message}");
        let mut elsewhere = node_request(&key, "nbd-csi-node");
        elsewhere.metadata.namespace = Some("tenant".into());
        assert_eq!(denied(decide_now(&elsewhere)).0, "NotTheHolder");
        let mut annotated = node_request(&key, "nbd-csi-node");
        annotated.spec.unverified_user_annotations = Some(BTreeMap::from([("x.dev/role".into(), "admin".into())]));
        assert_eq!(denied(decide_now(&annotated)).0, "UnknownAnnotations");
        let mut broken = node_request(&key, "nbd-csi-node");
        broken.spec.stub_pkc_s10_request.0.truncate(20);
        assert_eq!(denied(decide_now(&broken)).0, "UnsupportedKeyType");
        // Another signer's, or one already answered: left alone.
        let mut theirs = node_request(&key, "nbd-csi-node");
        theirs.spec.signer_name = "example.com/other".into();
        assert!(matches!(decide_now(&theirs), Decision::Ignore));
        let mut done = node_request(&key, "nbd-csi-node");
        done.status = Some(issued(decide_now(&done)));
        assert!(matches!(decide_now(&done), Decision::Ignore));
    }
}
