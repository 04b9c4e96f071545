#!/usr/bin/env bash
# Installs the chart on a real kube-apiserver: starts etcd and kube-apiserver
# on 127.0.0.1 (free ports, token authentication, RBAC), then
#   - server-side dry-run of deploy/nbd-csi.yaml (every object validated),
#   - helm install into a dedicated namespace, checks of what was created and
#     of the ServiceAccounts' permissions as the server's RBAC evaluates them,
#   - helm upgrade with the other branches of the templates (hostPath, hostNetwork,
#     two StorageClasses), helm uninstall, and a check that everything is gone;
#   - storage.mode=cluster: the controller Deployment (2 replicas, anti-affinity,
#     leader-electing sidecars), its PodDisruptionBudget, the storage policy, the
#     Lease permissions leader election needs; uninstalled without a trace.
# No kubelet, scheduler or controller-manager: pods are never created.
# Tools come from tests/k8s/build-tools.sh (built on first use).
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/k8s/tools.sh
. tests/k8s/cluster.sh

ensure_helm
cluster_init nbd-csi-apiserver
cluster_start

# --- deploy/ manifests pass server-side validation
if "$kubectl" apply --dry-run=server -f deploy/nbd-csi.yaml >"$work/out.txt" 2>&1; then
    ok "deploy/nbd-csi.yaml accepted by server-side dry run ($(wc -l <"$work/out.txt") objects)"
else
    cat "$work/out.txt" >&2
    bad "deploy/nbd-csi.yaml rejected by the server"
fi

# --- helm install into a dedicated namespace
ns=nbd-csi
if "$helm" install nbd-csi charts/nbd-csi --namespace "$ns" --create-namespace >"$work/install.txt" 2>&1; then
    ok "helm install nbd-csi charts/nbd-csi --namespace $ns"
else
    cat "$work/install.txt" >&2
    bad "helm install"
fi
expect() { # DESCRIPTION COMMAND... ; the command's output must equal $want
    local got
    got=$("${@:2}" 2>&1) || true
    if [ "$got" = "$want" ]; then ok "$1"; else bad "$1: got '$got', want '$want'"; fi
}
want="true true File Persistent"
expect "CSIDriver nbd.csi.dev spec" "$kubectl" get csidriver nbd.csi.dev \
    -o jsonpath='{.spec.attachRequired} {.spec.podInfoOnMount} {.spec.fsGroupPolicy} {.spec.volumeLifecycleModes[*]}'
want="nbd.csi.dev Delete true Immediate ext4"
expect "StorageClass nbd" "$kubectl" get storageclass nbd \
    -o jsonpath='{.provisioner} {.reclaimPolicy} {.allowVolumeExpansion} {.volumeBindingMode} {.parameters.csi\.storage\.k8s\.io/fstype}'
want="1 nbd-csi-controller,csi-provisioner,csi-attacher,csi-resizer,csi-snapshotter,liveness-probe,"
expect "controller StatefulSet" "$kubectl" -n "$ns" get statefulset nbd-csi-controller \
    -o jsonpath='{.spec.replicas} {range .spec.template.spec.containers[*]}{.name}{","}{end}'
want="true Bidirectional nbd-csi-node,node-driver-registrar,liveness-probe,"
expect "node DaemonSet" "$kubectl" -n "$ns" get daemonset nbd-csi-node \
    -o jsonpath='{.spec.template.spec.hostNetwork} {.spec.template.spec.containers[0].volumeMounts[?(@.name=="pods-dir")].mountPropagation} {range .spec.template.spec.containers[*]}{.name}{","}{end}'

# RBAC as the server evaluates it: "SERVICEACCOUNT VERB RESOURCE yes|no"
sa_controller=system:serviceaccount:$ns:nbd-csi-controller
sa_node=system:serviceaccount:$ns:nbd-csi-node
while read -r who verb resource answer; do
    sub=()
    case $resource in */*) sub=(--subresource "${resource#*/}") ;; esac
    got=$("$kubectl" auth can-i "$verb" "${resource%%/*}" "${sub[@]}" --as "$who" 2>/dev/null || true)
    if [ "$got" = "$answer" ]; then ok "can-i $verb $resource as ${who##*:}: $got"; else bad "can-i $verb $resource as ${who##*:}: got '$got', want '$answer'"; fi
done <<CHECKS
$sa_controller get nodes yes
$sa_controller list nodes yes
$sa_controller delete nodes no
$sa_controller create persistentvolumes yes
$sa_controller patch volumeattachments.storage.k8s.io/status yes
$sa_controller create events.events.k8s.io yes
$sa_controller get secrets no
$sa_controller create pods no
$sa_controller create leases.coordination.k8s.io no
$sa_node create events yes
$sa_node create events.events.k8s.io yes
$sa_node get nodes no
$sa_node list persistentvolumes no
$sa_node get secrets no
CHECKS
# The certificate Secrets, in the release's namespace only: the controller
# issues and renews them (tls.issuer=builtin). This API server serves
# PodCertificateRequest, so the chart (tls.certificateDelivery=auto) gives the
# node plugin a pod certificate: it reads no Secret at all.
while read -r who verb answer; do
    check "can-i $verb secrets in $ns as ${who##*:}" "$answer" \
        "$("$kubectl" auth can-i "$verb" secrets -n "$ns" --as "$who" 2>/dev/null || true)"
done <<CHECKS
$sa_controller create yes
$sa_controller update yes
$sa_controller list no
$sa_controller delete no
$sa_node get no
$sa_node watch no
$sa_node update no
CHECKS
# The controller signs the node plugins' pod certificates, as
# nbd.csi.dev/node only, and publishes the CA in one ConfigMap.
while read -r who verb resource answer; do
    sub=()
    case $resource in */status) sub=(--subresource status); resource=${resource%/status} ;; esac
    check "can-i $verb $resource ${sub[*]} in $ns as ${who##*:}" "$answer" \
        "$("$kubectl" auth can-i "$verb" "$resource" "${sub[@]}" -n "$ns" --as "$who" 2>/dev/null || true)"
done <<CHECKS
$sa_controller watch podcertificaterequests.certificates.k8s.io yes
$sa_controller patch podcertificaterequests.certificates.k8s.io/status yes
$sa_controller patch podcertificaterequests.certificates.k8s.io no
$sa_controller get configmaps/nbd-csi-ca yes
$sa_controller get configmaps/other no
$sa_node create podcertificaterequests.certificates.k8s.io no
CHECKS
# A signer's name has a slash, which `auth can-i TYPE/NAME` splits: asked
# as the API server is asked, with a SubjectAccessReview.
may_sign() { # SIGNER: whether the controller's ServiceAccount may sign as SIGNER
    "$kubectl" create -o jsonpath='{.status.allowed}' -f - <<SAR 2>&1
apiVersion: authorization.k8s.io/v1
kind: SubjectAccessReview
spec:
  user: $sa_controller
  resourceAttributes: {group: certificates.k8s.io, resource: signers, verb: sign, name: "$1"}
SAR
}
check "the controller may sign as nbd.csi.dev/node" true "$(may_sign nbd.csi.dev/node)"
check "the controller may not sign as another signer" false "$(may_sign example.com/other)"
node_tls=$("$kubectl" -n "$ns" get daemonset nbd-csi-node -o jsonpath='{.spec.template.spec.volumes[?(@.name=="tls-certs")].projected.sources[0].podCertificate.signerName} {.spec.template.spec.volumes[?(@.name=="tls-certs")].projected.sources[0].podCertificate.credentialBundlePath} {.spec.template.spec.volumes[?(@.name=="tls-certs")].projected.sources[1].configMap.name}' 2>&1)
node_args=$("$kubectl" -n "$ns" get daemonset nbd-csi-node -o jsonpath='{.spec.template.spec.containers[0].args}' 2>&1)
case $node_args in *--tls-secret-prefix*) node_tls="$node_tls, follows a Secret: $node_args" ;; esac
check "node DaemonSet: a pod certificate and the CA's ConfigMap as its TLS directory, no Secret to follow" \
    "nbd.csi.dev/node credentials.pem nbd-csi-ca" "$node_tls"


# --- helm upgrade with changed (mutable) values
cat >"$work/upgrade.yaml" <<'VALUES'
controller:
  hostNetwork: true
  nbd: {portRange: {first: 20000, last: 20099}}
node:
  connections: 2
  modprobe: {required: true, parameters: [nbds_max=64]}
storageClasses:
  - {name: nbd, default: true, fsType: ext4, reclaimPolicy: Delete, allowVolumeExpansion: true, volumeBindingMode: Immediate}
  - {name: nbd-xfs, fsType: xfs, reclaimPolicy: Retain, allowVolumeExpansion: false, volumeBindingMode: WaitForFirstConsumer, mountOptions: [noatime]}
VALUES
if "$helm" upgrade nbd-csi charts/nbd-csi --namespace "$ns" --values "$work/upgrade.yaml" >"$work/upgrade.txt" 2>&1; then
    ok "helm upgrade (hostNetwork, another port range, two StorageClasses)"
else
    cat "$work/upgrade.txt" >&2
    bad "helm upgrade"
fi
want="xfs WaitForFirstConsumer"
expect "StorageClass nbd-xfs after upgrade" "$kubectl" get storageclass nbd-xfs \
    -o jsonpath='{.parameters.csi\.storage\.k8s\.io/fstype} {.volumeBindingMode}'
want="true 20000 --advertise-address=\$(NODE_IP)"
expect "controller after upgrade" "$kubectl" -n "$ns" get statefulset nbd-csi-controller \
    -o jsonpath='{.spec.template.spec.hostNetwork} {.spec.template.spec.containers[0].ports[?(@.name=="nbd-20000")].containerPort} {.spec.template.spec.containers[0].args[3]}'
# Changing the storage type would change immutable volumeClaimTemplates: the
# chart refuses with its own message before the API server does.
if "$helm" upgrade nbd-csi charts/nbd-csi --namespace "$ns" --reuse-values --set controller.storage.type=hostPath >"$work/upgrade2.txt" 2>&1; then
    bad "helm upgrade accepted a change of controller.storage.type"
elif grep -q 'controller.storage.type cannot change on an existing release' "$work/upgrade2.txt"; then
    ok "helm upgrade refuses to change controller.storage.type"
else
    cat "$work/upgrade2.txt" >&2
    bad "helm upgrade of controller.storage.type failed without the chart's message"
fi

# --- helm uninstall leaves nothing of the chart behind
if "$helm" uninstall nbd-csi --namespace "$ns" --wait >"$work/uninstall.txt" 2>&1; then
    ok "helm uninstall"
else
    cat "$work/uninstall.txt" >&2
    bad "helm uninstall"
fi
left=$("$kubectl" get csidriver,storageclass,clusterrole,clusterrolebinding -l app.kubernetes.io/instance=nbd-csi -o name 2>&1)
left+=$("$kubectl" -n "$ns" get all,serviceaccount -l app.kubernetes.io/instance=nbd-csi -o name 2>&1)
if [ -z "$left" ]; then ok "nothing labelled app.kubernetes.io/instance=nbd-csi is left"; else bad "left after uninstall: $left"; fi

# --- a fresh install with the hostPath branch, then uninstall
if "$helm" install nbd-csi charts/nbd-csi --namespace "$ns" \
    --set controller.storage.type=hostPath --set controller.nodeSelector.kubernetes\\.io/hostname=storage-0 \
    --set volumeSnapshotClass.create=false >"$work/install2.txt" 2>&1 &&
    "$helm" uninstall nbd-csi --namespace "$ns" --wait >>"$work/install2.txt" 2>&1; then
    ok "helm install and uninstall with controller.storage.type=hostPath"
else
    cat "$work/install2.txt" >&2
    bad "helm install with controller.storage.type=hostPath"
fi

# --- cluster mode: the controller as a Deployment of 2 replicas whose
# sidecars elect leaders, a disruption budget, the storage policy
ha=nbd-csi-ha
if "$helm" install nbd-csi charts/nbd-csi --namespace "$ha" --create-namespace --set storage.mode=cluster \
    --set volumeSnapshotClass.create=false >"$work/install3.txt" 2>&1; then
    ok "helm install --set storage.mode=cluster"
else
    cat "$work/install3.txt" >&2
    bad "helm install with storage.mode=cluster"
fi
want="2 kubernetes.io/hostname nbd-csi-controller=,csi-provisioner=--leader-election,csi-attacher=--leader-election,"
want+="csi-resizer=--leader-election,csi-snapshotter=--leader-election,liveness-probe=,"
expect "controller Deployment: 2 replicas spread over nodes, every acting sidecar electing" \
    "$kubectl" -n "$ha" get deployment nbd-csi-controller -o jsonpath='{.spec.replicas} {.spec.template.spec.affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].podAffinityTerm.topologyKey} {range .spec.template.spec.containers[*]}{.name}={.args[?(@=="--leader-election")]},{end}'
want="1"
expect "PodDisruptionBudget keeps one controller" "$kubectl" -n "$ha" get pdb nbd-csi-controller -o jsonpath='{.spec.minAvailable}'
want="nbd-csi-storage-own-node Deny"
expect "storage policy and its binding" "$kubectl" get validatingadmissionpolicybinding nbd-csi-storage-own-node \
    -o jsonpath='{.spec.policyName} {.spec.validationActions[*]}'
sa_ha=system:serviceaccount:$ha:nbd-csi-controller
for check in "create $ha yes" "update $ha yes" "create default no"; do
    read -r verb where answer <<<"$check"
    got=$("$kubectl" auth can-i "$verb" leases.coordination.k8s.io -n "$where" --as "$sa_ha" 2>/dev/null || true)
    if [ "$got" = "$answer" ]; then ok "can-i $verb leases in $where as the cluster-mode controller (leader election): $got"; else bad "can-i $verb leases in $where: got '$got', want '$answer'"; fi
done
if "$helm" uninstall nbd-csi --namespace "$ha" --wait >"$work/uninstall3.txt" 2>&1 &&
    [ -z "$("$kubectl" -n "$ha" get all,pdb,serviceaccount -l app.kubernetes.io/instance=nbd-csi -o name 2>&1)" ] &&
    [ -z "$("$kubectl" get validatingadmissionpolicy,validatingadmissionpolicybinding -l app.kubernetes.io/instance=nbd-csi -o name 2>&1)" ]; then
    ok "helm uninstall of the cluster-mode release leaves nothing of it"
else
    cat "$work/uninstall3.txt" >&2
    bad "helm uninstall of the cluster-mode release"
fi

echo "apiserver: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
