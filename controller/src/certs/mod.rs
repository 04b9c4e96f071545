//! The certificates NBD over TLS needs, issued by the controller
//! (`--tls-issuer builtin`) or by cert-manager (`--tls-issuer
//! cert-manager`), each into a `kubernetes.io/tls` Secret in `--namespace`
//! named by [`SecretNames`] (`--tls-secret-prefix`), which its holder
//! writes into its `--tls-dir` (`csi_events::tls_secret`):
//!
//! - a client certificate per node running the node plugin: every CSINode
//!   that lists this driver (the kubelet adds the driver once the plugin
//!   registered, and removes the CSINode with its Node); its one DNS name
//!   is the node, the name NBD exports admit. With
//!   `--tls-certificate-delivery pod` there is no such Secret: the kubelets
//!   ask for pod certificates and this controller signs them
//!   ([`pod_certificates`]), the storage agents' too when
//!   `--tls-storage-service-account` names theirs;
//! - a server certificate per storage agent (cluster mode): every
//!   NbdStorageNode, for its address and node name, issued again when the
//!   address changes;
//! - in embedded mode, the controller's own server certificate for
//!   `--advertise-address` (Secret `<prefix>-controller`).
//!
//! Each Secret is owned by its CSINode or NbdStorageNode, so the garbage
//! collector removes it with its node. The built-in issuer keeps the CA in
//! `<prefix>-ca` (made on first start) and renews every certificate two
//! thirds into `--tls-cert-lifetime` ([`builtin`]); with cert-manager the
//! controller keeps one Certificate per holder and cert-manager does the
//! rest ([`cert_manager`]). Every replica runs this: all writes are
//! conditional (see [`builtin`]) or idempotent (server-side apply), so
//! replicas converge without a leader. Failures are Warning Events on the
//! CSINode or NbdStorageNode (`CertificateNotIssued`), retried after
//! [`RETRY`].

pub mod authority;
pub mod builtin;
pub mod cert_manager;
pub mod pod_certificates;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use agent::resources::NbdStorageNode;
use anyhow::{Context as _, bail};
use csi_events::tls_secret::{Holder, SecretNames};
use k8s_openapi::api::certificates::v1::PodCertificateRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Node, ObjectReference, Secret};
use k8s_openapi::api::storage::v1::CSINode;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::DynamicObject;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use tokio_stream::StreamExt;

use self::authority::{Authority, Subject};
use crate::error::{Error, Result};

/// Annotation: when the built-in issuer renews the Secret's certificate.
pub const ANNOTATION_RENEW_AFTER: &str = "nbd.csi.dev/renew-after";
/// Annotation: when the Secret's certificate expires.
pub const ANNOTATION_NOT_AFTER: &str = "nbd.csi.dev/not-after";
/// Label: whose certificate a Secret holds (`ca`, `node`, `storage`, `controller`).
pub const LABEL_HOLDER: &str = "nbd.csi.dev/certificate";
/// A reconcile that failed is tried again after this.
pub const RETRY: Duration = Duration::from_secs(30);
/// Every holder is looked at again at least this often, so a Secret
/// deleted or edited by hand is mended.
const RESYNC: Duration = Duration::from_secs(600);
/// cert-manager refuses certificates shorter than this.
const CERT_MANAGER_MIN_LIFETIME: Duration = Duration::from_secs(3600);
/// The reportingController of the issuer's Events.
const REPORTING_CONTROLLER: &str = "nbd.csi.dev/controller";

/// Who issues the certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum IssuerKind {
    /// No certificates are issued.
    #[default]
    None,
    /// The controller keeps a CA and issues and renews them itself.
    Builtin,
    /// cert-manager issues them through `--tls-cert-manager-issuer`.
    CertManager,
}

impl std::fmt::Display for IssuerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Builtin => "builtin",
            Self::CertManager => "cert-manager",
        })
    }
}

/// How the node plugins and storage agents get their certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum CertificateDelivery {
    /// A Secret per holder (`<prefix>-node-<node>`, `<prefix>-storage-<node>`)
    /// that the holder reads.
    #[default]
    Secret,
    /// Pod certificates: the kubelet makes the key and asks this
    /// controller, the signer (`pod_certificates`); Kubernetes 1.37+.
    Pod,
}

impl std::fmt::Display for CertificateDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Secret => "secret",
            Self::Pod => "pod",
        })
    }
}

/// A lifetime such as `2160h`, `90m` or `30s` (a Go duration, as
/// cert-manager reads them too).
fn parse_lifetime(s: &str) -> Result<Duration, String> {
    let d: k8s_openapi::jiff::SignedDuration =
        s.parse().map_err(|e| format!("{s:?} is not a duration such as 2160h, 90m or 30s: {e}"))?;
    let d = Duration::try_from(d).map_err(|_| format!("{s:?} is negative"))?;
    if d < Duration::from_secs(10) {
        return Err(format!("{s:?} is shorter than 10s"));
    }
    Ok(d)
}

#[derive(Debug, Clone, clap::Args)]
pub struct IssuerArgs {
    /// Who issues the TLS certificates of the nodes and servers: none,
    /// builtin (this controller keeps a CA in a Secret) or cert-manager.
    #[arg(long, env = "NBD_CSI_TLS_ISSUER", value_enum, default_value_t = IssuerKind::None)]
    pub tls_issuer: IssuerKind,
    /// Names the certificate Secrets in --namespace: <prefix>-ca,
    /// <prefix>-node-<node>, <prefix>-storage-<node>, <prefix>-controller.
    #[allow(rustdoc::invalid_html_tags)] // --help text, not HTML
    #[arg(long, env = "NBD_CSI_TLS_SECRET_PREFIX")]
    pub tls_secret_prefix: Option<String>,
    /// Lifetime of the issued certificates; each is renewed two thirds in.
    #[arg(long, env = "NBD_CSI_TLS_CERT_LIFETIME", default_value = "2160h", value_parser = parse_lifetime)]
    pub tls_cert_lifetime: Duration,
    /// Lifetime of the CA the built-in issuer makes on its first start.
    #[arg(long, env = "NBD_CSI_TLS_CA_LIFETIME", default_value = "87600h", value_parser = parse_lifetime)]
    pub tls_ca_lifetime: Duration,
    /// With cert-manager: the Issuer (in --namespace) that signs.
    #[arg(long, env = "NBD_CSI_TLS_CERT_MANAGER_ISSUER")]
    pub tls_cert_manager_issuer: Option<String>,
    /// How the node plugins and the storage agents get their certificates:
    /// secret (one Secret per holder) or pod (pod certificates signed by
    /// this controller as <driver>/node and <driver>/storage, the CA in
    /// ConfigMap <prefix>-ca; built-in issuer only).
    #[allow(rustdoc::invalid_html_tags)] // --help text, not HTML
    #[arg(long, env = "NBD_CSI_TLS_CERTIFICATE_DELIVERY", value_enum, default_value_t = CertificateDelivery::Secret)]
    pub tls_certificate_delivery: CertificateDelivery,
    /// With pod certificates: the node plugin's service account (in
    /// --namespace), the only one whose pods get node certificates.
    #[arg(long, env = "NBD_CSI_TLS_NODE_SERVICE_ACCOUNT")]
    pub tls_node_service_account: Option<String>,
    /// With pod certificates in cluster mode: the storage agents' service
    /// account, the only one whose pods get storage server certificates;
    /// without it the agents keep their Secrets.
    #[arg(long, env = "NBD_CSI_TLS_STORAGE_SERVICE_ACCOUNT")]
    pub tls_storage_service_account: Option<String>,
}

impl Default for IssuerArgs {
    /// As without any of the flags: nothing is issued.
    fn default() -> Self {
        Self {
            tls_issuer: IssuerKind::None,
            tls_secret_prefix: None,
            tls_cert_lifetime: Duration::from_secs(2160 * 3600),
            tls_ca_lifetime: Duration::from_secs(87600 * 3600),
            tls_cert_manager_issuer: None,
            tls_certificate_delivery: CertificateDelivery::Secret,
            tls_node_service_account: None,
            tls_storage_service_account: None,
        }
    }
}

impl IssuerArgs {
    /// The flags checked; `None` when nothing is issued.
    pub fn checked(&self) -> anyhow::Result<Option<SecretNames>> {
        if self.tls_issuer == IssuerKind::None {
            return Ok(None);
        }
        let prefix = self.tls_secret_prefix.as_deref().context("--tls-issuer needs --tls-secret-prefix")?;
        let names = SecretNames::new(prefix).map_err(|e| anyhow::anyhow!("--tls-secret-prefix: {e}"))?;
        if self.tls_ca_lifetime <= self.tls_cert_lifetime {
            bail!("--tls-ca-lifetime must be longer than --tls-cert-lifetime: a certificate cannot outlive its CA");
        }
        if self.tls_issuer == IssuerKind::CertManager {
            let issuer = self.tls_cert_manager_issuer.as_deref().unwrap_or_default();
            if issuer.is_empty() {
                bail!("--tls-issuer cert-manager needs --tls-cert-manager-issuer (the CA Issuer's name)");
            }
            if self.tls_cert_lifetime < CERT_MANAGER_MIN_LIFETIME {
                bail!("--tls-cert-lifetime must be at least 1h with cert-manager, which refuses shorter certificates");
            }
        }
        if self.tls_certificate_delivery == CertificateDelivery::Pod {
            if self.tls_issuer != IssuerKind::Builtin {
                bail!("--tls-certificate-delivery pod needs --tls-issuer builtin (this controller signs them)");
            }
            if self.tls_node_service_account.as_deref().unwrap_or_default().is_empty() {
                bail!(
                    "--tls-certificate-delivery pod needs --tls-node-service-account (whose pods get node certificates)"
                );
            }
        }
        Ok(Some(names))
    }

    /// `key=value` lines for the validation mode.
    pub fn print(&self) {
        println!("tls_issuer={}", self.tls_issuer);
        println!("tls_secret_prefix={}", self.tls_secret_prefix.clone().unwrap_or_default());
        println!("tls_cert_lifetime={}s", self.tls_cert_lifetime.as_secs());
        println!("tls_ca_lifetime={}s", self.tls_ca_lifetime.as_secs());
        println!("tls_cert_manager_issuer={}", self.tls_cert_manager_issuer.clone().unwrap_or_default());
        println!("tls_certificate_delivery={}", self.tls_certificate_delivery);
        println!("tls_node_service_account={}", self.tls_node_service_account.clone().unwrap_or_default());
        println!("tls_storage_service_account={}", self.tls_storage_service_account.clone().unwrap_or_default());
    }
}

/// Labels of every Secret and Certificate the issuer writes.
pub fn managed_labels(holder: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/managed-by".to_owned(), crate::storage::FIELD_MANAGER.to_owned()),
        (LABEL_HOLDER.to_owned(), holder.to_owned()),
    ])
}

/// Who signs.
enum Signer {
    Builtin(Box<Authority>),
    CertManager { issuer: String },
}

/// What the issuer works from.
pub struct Issuer {
    client: kube::Client,
    names: SecretNames,
    driver_name: String,
    lifetime: Duration,
    signer: Signer,
    secrets: Api<Secret>,
    certificates: Api<DynamicObject>,
    events: Arc<csi_events::Recorder>,
    /// Node certificates as pod certificates: whose requests are signed.
    pod_certificates: Option<pod_certificates::Policy>,
    namespace: String,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer").field("names", &self.names).field("driver_name", &self.driver_name).finish()
    }
}

/// Where the issuer runs and what else it serves.
#[derive(Debug, Clone)]
pub struct Scope {
    pub namespace: String,
    pub driver_name: String,
    /// Cluster mode: the storage agents get server certificates.
    pub storage_nodes: bool,
    /// Embedded mode: the controller's own advertised address.
    pub controller_address: Option<IpAddr>,
}

impl Issuer {
    /// The issuer `args` ask for, its CA loaded or made; `None` without
    /// `--tls-issuer`.
    pub async fn start(client: kube::Client, args: &IssuerArgs, scope: &Scope) -> anyhow::Result<Option<Arc<Self>>> {
        let Some(names) = args.checked()? else { return Ok(None) };
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &scope.namespace);
        let signer = match args.tls_issuer {
            IssuerKind::None => return Ok(None),
            IssuerKind::Builtin => Signer::Builtin(Box::new(
                builtin::load_or_create_ca(&secrets, &names.ca(), args.tls_ca_lifetime)
                    .await
                    .with_context(|| format!("the CA in Secret {}/{}", scope.namespace, names.ca()))?,
            )),
            IssuerKind::CertManager => {
                Signer::CertManager { issuer: args.tls_cert_manager_issuer.clone().unwrap_or_default() }
            }
        };
        let certificates =
            Api::namespaced_with(client.clone(), &scope.namespace, &cert_manager::certificate_resource());
        let instance = std::env::var("HOSTNAME").unwrap_or_else(|_| "nbd-csi-controller".to_owned());
        let events = Arc::new(csi_events::Recorder::new(client.clone(), REPORTING_CONTROLLER.to_owned(), &instance));
        let pod_certificates = (args.tls_certificate_delivery == CertificateDelivery::Pod).then(|| {
            let signer = |role: pod_certificates::Role, account: &String| pod_certificates::Signer {
                name: role.signer_name(&scope.driver_name),
                role,
                service_account: account.clone(),
            };
            let node = args.tls_node_service_account.iter().map(|a| signer(pod_certificates::Role::Node, a));
            let storage = args.tls_storage_service_account.iter().filter(|_| scope.storage_nodes);
            let storage = storage.map(|a| signer(pod_certificates::Role::Storage, a));
            pod_certificates::Policy { signers: node.chain(storage).collect(), lifetime: args.tls_cert_lifetime }
        });
        tracing::info!(issuer = %args.tls_issuer, prefix = ?args.tls_secret_prefix, namespace = scope.namespace, delivery = %args.tls_certificate_delivery, "issuing TLS certificates");
        Ok(Some(Arc::new(Self {
            client,
            names,
            driver_name: scope.driver_name.clone(),
            lifetime: args.tls_cert_lifetime,
            signer,
            secrets,
            certificates,
            events,
            pod_certificates,
            namespace: scope.namespace.clone(),
        })))
    }

    /// Whether the storage agents get pod certificates, not Secrets.
    fn storage_signed(&self) -> bool {
        let signers = self.pod_certificates.iter().flat_map(|p| &p.signers);
        signers.into_iter().any(|s| s.role == pod_certificates::Role::Storage)
    }

    /// The node plugins' certificates: one Secret per CSINode that lists
    /// the driver, or, as pod certificates, the answers to the kubelets'
    /// requests (the storage agents' too) and the CA's ConfigMap.
    async fn run_nodes(self: Arc<Self>) {
        let (Some(policy), Signer::Builtin(authority)) = (self.pod_certificates.clone(), &self.signer) else {
            let nodes = Controller::new(Api::<CSINode>::all(self.client.clone()), watcher::Config::default()).run(
                |o, me: Arc<Self>| async move { me.reconcile_node(&o).await },
                |o, e, me| me.failed(o.as_ref(), e),
                Arc::clone(&self),
            );
            return drain("CSINode", nodes).await;
        };
        let ca_pem = authority.cert_pem().to_owned();
        let config_maps = Api::<ConfigMap>::namespaced(self.client.clone(), &self.namespace);
        let ca_name = self.names.ca();
        let publish_ca = async move {
            loop {
                let wait = match pod_certificates::keep_ca_config_map(&config_maps, &ca_name, &ca_pem).await {
                    Ok(()) => RESYNC,
                    Err(e) => {
                        tracing::warn!(error = %e, "the CA ConfigMap could not be written");
                        RETRY
                    }
                };
                tokio::time::sleep(wait).await;
            }
        };
        let requests = Api::<PodCertificateRequest>::namespaced(self.client.clone(), &self.namespace);
        let nodes = Api::<Node>::all(self.client.clone());
        let answered = Controller::new(requests.clone(), watcher::Config::default()).run(
            move |o, me: Arc<Self>| {
                let (requests, nodes, policy) = (requests.clone(), nodes.clone(), policy.clone());
                async move {
                    let Signer::Builtin(authority) = &me.signer else { return Ok(Action::await_change()) };
                    pod_certificates::answer(&requests, &nodes, &o, &me.namespace, &policy, authority).await?;
                    Ok::<_, Error>(Action::await_change())
                }
            },
            |o, e, me| me.failed(o.as_ref(), e),
            Arc::clone(&self),
        );
        tokio::select! {
            () = publish_ca => {}
            () = drain("PodCertificateRequest", answered) => {}
        }
    }

    /// Keeps every holder's certificate until the process ends.
    pub async fn run(self: Arc<Self>, scope: Scope) {
        let nodes = Arc::clone(&self).run_nodes();
        let storage = {
            let me = Arc::clone(&self);
            async move {
                if !scope.storage_nodes || me.storage_signed() {
                    return std::future::pending().await;
                }
                let api = Api::<NbdStorageNode>::all(me.client.clone());
                let reconciled = Controller::new(api, watcher::Config::default()).run(
                    |o, me: Arc<Self>| async move { me.reconcile_storage(&o).await },
                    |o, e, me| me.failed(o.as_ref(), e),
                    Arc::clone(&me),
                );
                drain("NbdStorageNode", reconciled).await
            }
        };
        let own = {
            let me = Arc::clone(&self);
            async move {
                let Some(address) = scope.controller_address else { return std::future::pending().await };
                let subject = Subject::Server { addresses: vec![address], node: None };
                loop {
                    let wait = match me.keep(Holder::Controller, "controller", &subject, None).await {
                        Ok(due) => until(due),
                        Err(e) => {
                            tracing::warn!(error = %e, "the controller's own certificate could not be issued");
                            RETRY
                        }
                    };
                    tokio::time::sleep(wait).await;
                }
            }
        };
        tokio::select! {
            () = nodes => {}
            () = storage => {}
            () = own => {}
        }
    }

    async fn reconcile_node(&self, csinode: &CSINode) -> Result<Action> {
        let node = csinode.name_any();
        if !csinode.spec.drivers.iter().any(|d| d.name == self.driver_name) {
            // Not (yet) running the plugin; the kubelet's update brings it back.
            return Ok(Action::await_change());
        }
        let due = self.keep(Holder::Node(&node), "node", &Subject::Node(node.clone()), owner(csinode)).await?;
        Ok(Action::requeue(until(due)))
    }

    async fn reconcile_storage(&self, storage: &NbdStorageNode) -> Result<Action> {
        let node = storage.name_any();
        let (address, _) = storage.endpoint().map_err(|e| Error::invalid(e.to_string()))?;
        let subject = Subject::Server { addresses: vec![address], node: Some(node.clone()) };
        let due = self.keep(Holder::Storage(&node), "storage", &subject, owner(storage)).await?;
        Ok(Action::requeue(until(due)))
    }

    /// Makes `holder`'s Secret (or Certificate) current; returns when to
    /// look again.
    async fn keep(
        &self,
        holder: Holder<'_>,
        label: &str,
        subject: &Subject,
        owner: Option<OwnerReference>,
    ) -> Result<SystemTime> {
        let name = self.names.of(holder).map_err(|e| Error::invalid(e.to_string()))?;
        match &self.signer {
            Signer::Builtin(authority) => {
                builtin::ensure(&self.secrets, &name, label, subject, owner, authority, self.lifetime).await
            }
            Signer::CertManager { issuer } => {
                let certificate = cert_manager::certificate(&name, label, subject, owner, issuer, self.lifetime);
                cert_manager::apply(&self.certificates, &name, &certificate).await?;
                Ok(SystemTime::now() + RESYNC)
            }
        }
    }

    /// A failed reconcile: a Warning Event on the object, and a retry.
    fn failed<K: Resource<DynamicType = ()>>(&self, object: &K, error: &Error) -> Action {
        tracing::warn!(kind = %K::kind(&()), name = ?object.meta().name, error = %error, "certificate not issued");
        // A namespaced object's Event goes into its namespace; a
        // cluster-scoped one's (a CSINode's) into `default`.
        let namespace = object.meta().namespace.clone();
        let regarding = ObjectReference {
            api_version: Some(K::api_version(&()).into_owned()),
            kind: Some(K::kind(&()).into_owned()),
            name: object.meta().name.clone(),
            namespace: namespace.clone(),
            uid: object.meta().uid.clone(),
            ..Default::default()
        };
        let warning = csi_events::WarningEvent {
            namespace: namespace.unwrap_or_else(|| "default".to_owned()),
            regarding,
            related: None,
            reason: "CertificateNotIssued",
            action: "IssueCertificate",
            note: error.to_string(),
        };
        let events = Arc::clone(&self.events);
        csi_events::in_background("CertificateNotIssued", async move { events.record(warning).await.map(Some) });
        Action::requeue(RETRY)
    }
}

/// The Secret's owner: the object it was issued for. It blocks nothing
/// (no `blockOwnerDeletion`, which would need rights on the owner).
fn owner<K: Resource<DynamicType = ()>>(object: &K) -> Option<OwnerReference> {
    object.controller_owner_ref(&()).map(|o| OwnerReference { block_owner_deletion: None, ..o })
}

/// How long until `due`, at least a second and at most [`RESYNC`].
fn until(due: SystemTime) -> Duration {
    due.duration_since(SystemTime::now()).unwrap_or_default().clamp(Duration::from_secs(1), RESYNC)
}

async fn drain<T, E: std::fmt::Display>(kind: &'static str, results: impl tokio_stream::Stream<Item = Result<T, E>>) {
    let mut results = std::pin::pin!(results);
    while let Some(result) = results.next().await {
        if let Err(e) = result {
            tracing::debug!(kind, error = %e, "certificate reconcile failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: IssuerArgs,
    }

    fn parse(argv: &[&str]) -> Result<IssuerArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("x").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn lifetimes_read_as_go_durations() {
        assert_eq!(parse_lifetime("2160h"), Ok(Duration::from_secs(2160 * 3600)));
        assert_eq!(parse_lifetime("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_lifetime("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_lifetime("30s"), Ok(Duration::from_secs(30)));
        assert!(parse_lifetime("5s").unwrap_err().contains("shorter than 10s"));
        assert!(parse_lifetime("soon").is_err());
        assert!(parse_lifetime("-1h").is_err());
    }

    #[test]
    fn the_flags_are_checked_together() {
        assert_eq!(parse(&[]).unwrap().checked().unwrap(), None);
        let e = parse(&["--tls-issuer", "builtin"]).unwrap().checked().unwrap_err();
        assert!(e.to_string().contains("--tls-secret-prefix"), "{e}");
        let names = parse(&["--tls-issuer", "builtin", "--tls-secret-prefix", "nbd-csi"]).unwrap().checked().unwrap();
        assert_eq!(names.unwrap().ca(), "nbd-csi-ca");
        let e = parse(&["--tls-issuer=builtin", "--tls-secret-prefix=p", "--tls-cert-lifetime=100000h"])
            .unwrap()
            .checked()
            .unwrap_err();
        assert!(e.to_string().contains("outlive its CA"), "{e}");
        let e = parse(&["--tls-issuer=cert-manager", "--tls-secret-prefix=p"]).unwrap().checked().unwrap_err();
        assert!(e.to_string().contains("--tls-cert-manager-issuer"), "{e}");
        let short = ["--tls-issuer=cert-manager", "--tls-secret-prefix=p", "--tls-cert-manager-issuer=p-ca"];
        let e = parse(&[&short[..], &["--tls-cert-lifetime=30m"]].concat()).unwrap().checked().unwrap_err();
        assert!(e.to_string().contains("at least 1h"), "{e}");
        assert!(parse(&short).unwrap().checked().unwrap().is_some());
        let pods = ["--tls-issuer=builtin", "--tls-secret-prefix=p", "--tls-certificate-delivery=pod"];
        let e = parse(&pods).unwrap().checked().unwrap_err();
        assert!(e.to_string().contains("--tls-node-service-account"), "{e}");
        assert!(
            parse(&[&pods[..], &["--tls-node-service-account=p-node"]].concat()).unwrap().checked().unwrap().is_some()
        );
        let e = parse(&[&short[..], &["--tls-certificate-delivery=pod", "--tls-node-service-account=n"]].concat())
            .unwrap()
            .checked()
            .unwrap_err();
        assert!(e.to_string().contains("needs --tls-issuer builtin"), "{e}");
    }
}
