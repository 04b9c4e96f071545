#!/usr/bin/env python3
"""Checks chart renders for how the node plugins and the storage agents
get their certificates (tls.certificateDelivery):

    chart_pod_certificates.py POD.yaml SECRET.yaml POD-CLUSTER.yaml SECRET-CLUSTER.yaml

POD*.yaml are rendered where pod certificates apply (an API server serving
certificates.k8s.io/v1 PodCertificateRequest, the built-in issuer), the
SECRET*.yaml ones where they do not, each in the embedded and the cluster
storage mode:

  - pod certificates: each holder's TLS directory is one read-only
    projected volume, the kubelet's podCertificate (ECDSA P-256, its
    signer, the credential bundle) beside the CA's ConfigMap; the holder is
    given no Secret to follow and may read no Secret; the controller is
    told to sign as <driver>/node (and in cluster mode <driver>/storage) for
    the holders' ServiceAccounts, and gets exactly the permissions that
    needs;
  - Secrets: the holders follow their Secret and may read the namespace's.
Prints "ok: ..." / "FAILED: ..." lines; exits 1 on any failure.
"""

import sys

from chart_storage import CONTROLLER_SA, NAMESPACE, compare, load, permissions, workload
from checks import bad, failed, ok

NODE_SA = "nbd-csi-node"
STORAGE_SA = "nbd-csi-storage"
CA_CONFIG_MAP = "nbd-csi-ca"
SIGNER_NEEDS = {
    ("cluster", "certificates.k8s.io", "signers", "sign", "nbd.csi.dev/node"),
    *((NAMESPACE, "certificates.k8s.io", "podcertificaterequests", v, "") for v in ("get", "list", "watch")),
    *((NAMESPACE, "certificates.k8s.io", "podcertificaterequests/status", v, "") for v in ("update", "patch")),
    (NAMESPACE, "", "configmaps", "create", ""),
    *((NAMESPACE, "", "configmaps", v, CA_CONFIG_MAP) for v in ("get", "update")),
}
CLUSTER_SIGNER_NEEDS = SIGNER_NEEDS | {("cluster", "certificates.k8s.io", "signers", "sign", "nbd.csi.dev/storage")}
HOLDER_SECRETS = {(NAMESPACE, "", "secrets", v, "") for v in ("get", "list", "watch")}


def holder(docs, kind, name, container):
    found = workload(docs, kind, name)
    if found is None:
        return None, None
    pod = found["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == container]
    return pod, c


def node_plugin(docs):
    return holder(docs, "DaemonSet", "nbd-csi-node", "nbd-csi-node")


def storage_agent(docs):
    return holder(docs, "DaemonSet", "nbd-csi-storage", "nbd-csi-agent")


def controller_args(docs):
    for kind in ("StatefulSet", "Deployment"):
        found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == "nbd-csi-controller"]
        if found:
            (c,) = [c for c in found[0]["spec"]["template"]["spec"]["containers"] if c["name"] == "nbd-csi-controller"]
            return c.get("args", [])
    bad("no controller workload")
    return []


def check_holder(docs, what, pod, container, signer, account):
    if pod is None:
        return
    tls_args = [a for a in container.get("args", []) if a.startswith("--tls")]
    if tls_args == ["--tls-dir=/run/nbd-csi/tls"]:
        ok(f"pod certificates: the {what} is given {tls_args} and no Secret to follow")
    else:
        bad(f"pod certificates: the {what}'s TLS arguments are {tls_args}")
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tls-certs"]
    sources = volume.get("projected", {}).get("sources", [])
    want = [
        {"podCertificate": {"signerName": signer, "keyType": "ECDSAP256", "credentialBundlePath": "credentials.pem",
                            "maxExpirationSeconds": 7862400}},
        {"configMap": {"name": CA_CONFIG_MAP, "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
    ]
    if sources == want and volume["projected"].get("defaultMode") == 0o400:
        ok(f"pod certificates: the {what}'s TLS directory is the kubelet's podCertificate from {signer} "
           f"(ECDSA P-256, credentials.pem) and ConfigMap {CA_CONFIG_MAP}'s ca.crt, mode 0400")
    else:
        bad(f"pod certificates: the {what}'s TLS volume is {volume}")
    secrets = sorted(p for p in permissions(docs, account) if p[2] == "secrets")
    if secrets:
        bad(f"pod certificates: the {what} may still read Secrets: {secrets}")
    else:
        ok(f"pod certificates: the {what} may read no Secret")


def check_controller(docs, want_args):
    args = controller_args(docs)
    if all(a in args for a in want_args):
        ok(f"pod certificates: the controller signs them: {want_args}")
    else:
        bad(f"pod certificates: the controller's arguments {args} lack {want_args}")


def check_secrets(docs, what, container, account):
    if container is None:
        return
    args = [a for a in container.get("args", []) if a.startswith("--tls")]
    if "--tls-secret-prefix=nbd-csi" in args and HOLDER_SECRETS <= permissions(docs, account):
        ok(f"Secrets: the {what} follows its Secret ({args})")
    else:
        bad(f"Secrets: the {what}'s TLS arguments {args}, or no right to read its Secret")


def main():
    pods, secrets, cluster_pods, cluster_secrets = (load(p) for p in sys.argv[1:5])
    node_args = ["--tls-certificate-delivery=pod", f"--tls-node-service-account={NODE_SA}"]
    check_holder(pods, "node plugin", *node_plugin(pods), "nbd.csi.dev/node", NODE_SA)
    check_controller(pods, node_args)
    if any(a.startswith("--tls-storage-service-account") for a in controller_args(pods)):
        bad("pod certificates, embedded mode: the controller was given the storage agents' account")
    compare("what pod certificates add to the controller's RBAC",
            permissions(pods, CONTROLLER_SA) - permissions(secrets, CONTROLLER_SA), SIGNER_NEEDS)
    check_holder(cluster_pods, "storage agent", *storage_agent(cluster_pods), "nbd.csi.dev/storage", STORAGE_SA)
    check_holder(cluster_pods, "node plugin (cluster mode)", *node_plugin(cluster_pods), "nbd.csi.dev/node", NODE_SA)
    check_controller(cluster_pods, [*node_args, f"--tls-storage-service-account={STORAGE_SA}"])
    compare("what pod certificates add to the controller's RBAC in cluster mode",
            permissions(cluster_pods, CONTROLLER_SA) - permissions(cluster_secrets, CONTROLLER_SA), CLUSTER_SIGNER_NEEDS)
    check_secrets(secrets, "node plugin", node_plugin(secrets)[1], NODE_SA)
    check_secrets(cluster_secrets, "storage agent", storage_agent(cluster_secrets)[1], STORAGE_SA)
    if any("--tls-certificate-delivery=pod" in controller_args(d) for d in (secrets, cluster_secrets)):
        bad("Secrets: the controller was told to sign pod certificates")
    return 1 if failed() else 0


if __name__ == "__main__":
    sys.exit(main())
