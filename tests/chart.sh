#!/usr/bin/env bash
# Chart, manifests and image checks, without a cluster or a container engine:
#   - helm lint (plain and --strict) with the default and an "everything on" values set
#   - deploy/nbd-csi.yaml is byte-identical to `helm template` with default values
#     (`tests/chart.sh --update` rewrites it)
#   - values.schema.json and the templates reject bad values with a clear message
#   - kubeconform validates the rendered objects (strict) against JSON schemas
#     converted from the OpenAPI document of the pinned Kubernetes release
#   - storage.mode=cluster: the storage agents' DaemonSet and RBAC, and what the
#     controller gains, are what they need and no more (tests/chart_storage.py)
#   - the ServiceMonitors scrape every pod that serves metrics (tests/chart_metrics.py)
#   - the Dockerfile: pinned bases, runtime packages exist in Debian bookworm,
#     the workspace members it copies and the binaries it copies out
# Tools (helm, kubeconform) are built with `go` into ~/.cache/nbd-csi/tools-v1.
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/k8s/tools.sh

CHART=charts/nbd-csi
RELEASE=nbd-csi
NAMESPACE=kube-system
DEPLOY=deploy/nbd-csi.yaml
passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok: $*"; }
bad() { failed=$((failed + 1)); echo "FAILED: $*" >&2; }

ensure_helm
ensure_kubeconform
helm=$TOOLS_BIN/helm
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

render() { "$helm" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" "$@"; }

# A JSON object with a key twice keeps only the last (two branches that each
# added a block merged as two "tls" entries once): the schema has none.
if dup=$(python3 -c '
import json, sys
def pairs(items):
    keys = [k for k, _ in items]
    for k in {k for k in keys if keys.count(k) > 1}:
        print(k)
    return dict(items)
json.load(open(sys.argv[1]), object_pairs_hook=pairs)' "$CHART/values.schema.json") && [ -z "$dup" ]; then
    ok "values.schema.json has no key twice in one object"
else
    bad "values.schema.json repeats keys: $(echo "$dup" | paste -sd' ')"
fi

# A values file that turns every optional part on.
cat >"$work/all-on.yaml" <<'VALUES'
controller:
  hostNetwork: true
  storage:
    type: hostPath
  nodeSelector:
    kubernetes.io/hostname: storage-0
  tolerations:
    - key: node-role.kubernetes.io/control-plane
      operator: Exists
      effect: NoSchedule
  resources:
    requests: {cpu: 100m, memory: 128Mi}
    limits: {memory: 1Gi}
  nbd:
    portRange: {first: 20000, last: 20009}
    maxConnections: 256
    maxConnectionsPerPeer: 16
node:
  connections: 2
  modprobe: {required: true, parameters: [nbds_max=64]}
storageClasses:
  - {name: nbd-ext4, default: true, fsType: ext4, reclaimPolicy: Delete, allowVolumeExpansion: true, volumeBindingMode: Immediate}
  - {name: nbd-xfs, fsType: xfs, reclaimPolicy: Retain, allowVolumeExpansion: false, volumeBindingMode: WaitForFirstConsumer, mountOptions: [noatime], parameters: {example.dev/tier: fast}}
volumeSnapshotClass: {create: true, default: true}
serviceMonitor: {enabled: true, labels: {release: prometheus}}
tls: {issuer: cert-manager, certLifetime: 720h, caLifetime: 43800h, mode: required}
VALUES
# Cluster mode with every option of the storage agents set.
cat >"$work/cluster.yaml" <<'VALUES'
storage:
  mode: cluster
  nodeSelector: {nbd.csi.dev/storage: "true", topology.kubernetes.io/zone: a}
  hostPath: /srv/nbd-storage
  exportKeySecret: cluster-export-key
  nbd:
    portRange: {first: 21000, last: 21099}
    maxConnections: 64
    maxConnectionsPerPeer: 16
  metrics: {enabled: true, port: 9900}
  tolerations:
    - {key: dedicated, operator: Equal, value: storage, effect: NoSchedule}
  resources:
    requests: {cpu: 100m, memory: 64Mi}
  podAnnotations: {example.dev/a: b}
  podLabels: {example.dev/c: d}
  extraArgs: []
  extraEnv: [{name: EXTRA, value: x}]
serviceAccount:
  storage: {create: true, name: storage-agent, annotations: {example.dev/e: f}}
tls: {mode: allowed}
VALUES

# --- helm lint
for strict in "" --strict; do
    for values in "" "$work/all-on.yaml" "$work/cluster.yaml"; do
        lint_args=()
        [ -n "$strict" ] && lint_args+=("$strict")
        [ -n "$values" ] && lint_args+=(--values "$values")
        if "$helm" lint "$CHART" "${lint_args[@]}" >"$work/lint.txt" 2>&1; then
            ok "helm lint ${lint_args[*]}"
        else
            cat "$work/lint.txt" >&2
            bad "helm lint ${lint_args[*]}"
        fi
    done
done

# --- appVersion follows the crate version
crate_version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' Cargo.toml)
app_version=$(sed -n 's/^appVersion: "\(.*\)"$/\1/p' "$CHART/Chart.yaml")
if [ -n "$crate_version" ] && [ "$crate_version" = "$app_version" ]; then
    ok "Chart appVersion $app_version is the crate version"
else
    bad "Chart appVersion '$app_version' differs from the workspace version '$crate_version'"
fi

# --- deploy/ is the rendered chart
render >"$work/default.yaml"
if [ "${1:-}" = "--update" ]; then
    cp "$work/default.yaml" "$DEPLOY"
    echo "updated $DEPLOY"
fi
if cmp -s "$work/default.yaml" "$DEPLOY"; then
    ok "$DEPLOY matches helm template"
else
    diff -u "$DEPLOY" "$work/default.yaml" | head -40 >&2 || true
    bad "$DEPLOY differs from 'helm template $RELEASE $CHART --namespace $NAMESPACE' (run tests/chart.sh --update)"
fi
if render --values "$work/all-on.yaml" >"$work/all-on-rendered.yaml"; then
    ok "render with every option on"
else
    bad "render with every option on"
fi
if render --values "$work/cluster.yaml" >"$work/cluster-rendered.yaml"; then
    ok "render storage.mode=cluster with every storage option set"
else
    bad "render storage.mode=cluster with every storage option set"
fi
# What the storage role and cluster mode are given, with the default names.
if render --set storage.mode=cluster >"$work/cluster-default.yaml" &&
    python3 tests/chart_storage.py "$work/cluster-default.yaml" "$work/default.yaml" >"$work/storage.txt" 2>&1; then
    sed 's/^ok: /ok: storage.mode=cluster: /' "$work/storage.txt"
    passed=$((passed + $(grep -c '^ok:' "$work/storage.txt")))
else
    cat "$work/storage.txt" >&2
    bad "storage.mode=cluster checks (tests/chart_storage.py)"
fi

# Node certificates: pod certificates where the API server has them (auto),
# and when asked for; a Secret per node otherwise (the default render).
for how in "--api-versions certificates.k8s.io/v1/PodCertificateRequest" "--set tls.certificateDelivery=podCertificate"; do
    # shellcheck disable=SC2086 # the arguments are split on purpose
    if render $how >"$work/pod-certificates.yaml" &&
        render $how --set storage.mode=cluster >"$work/pod-certificates-cluster.yaml" &&
        python3 tests/chart_pod_certificates.py "$work/pod-certificates.yaml" "$work/default.yaml" \
            "$work/pod-certificates-cluster.yaml" "$work/cluster-default.yaml" >"$work/pod-certs.txt" 2>&1; then
        sed "s|^ok: |ok: ${how##* }: |" "$work/pod-certs.txt"
        passed=$((passed + $(grep -c '^ok:' "$work/pod-certs.txt")))
    else
        cat "$work/pod-certs.txt" >&2
        bad "$how: node certificates (tests/chart_pod_certificates.py)"
    fi
done
if render --api-versions certificates.k8s.io/v1/PodCertificateRequest --set tls.mode=off | grep -q -- '--tls-certificate-delivery'; then
    bad "tls.mode=off: auto chose pod certificates (every holder's start would wait for the controller)"
else
    ok "tls.mode=off: auto keeps node certificates in Secrets, so no pod waits for the controller to sign"
fi
if render --api-versions certificates.k8s.io/v1/PodCertificateRequest --set tls.issuer=cert-manager | grep -q -- '--tls-certificate-delivery'; then
    bad "tls.issuer=cert-manager: the chart asked the controller to sign pod certificates"
else
    ok "tls.issuer=cert-manager: node certificates stay Secrets even where pod certificates exist (cert-manager issues them)"
fi

# Cluster mode on the host's network: two replicas may never share a node
# (the same host ports; the sidecars' leader identity is the hostname).
hostnet_anti=$(render --set storage.mode=cluster --set controller.hostNetwork=true | python3 -c '
import sys, yaml
(d,) = [d for d in yaml.safe_load_all(sys.stdin) if d and d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-controller")]
spec = d["spec"]["template"]["spec"]
anti = spec.get("affinity", {}).get("podAntiAffinity", {})
print(spec.get("hostNetwork"), d["spec"]["replicas"], [t["topologyKey"] for t in anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])])')
if [ "$hostnet_anti" = "True 2 ['kubernetes.io/hostname']" ]; then
    ok "storage.mode=cluster with controller.hostNetwork: the 2 replicas are required on different nodes"
else
    bad "storage.mode=cluster with controller.hostNetwork: hostNetwork, replicas, required anti-affinity = $hostnet_anti"
fi

# The ServiceMonitors reach every pod that serves metrics, in both modes.
for mode in embedded:controller,node cluster:controller,node,storage; do
    if render --set serviceMonitor.enabled=true --set storage.mode="${mode%%:*}" >"$work/monitored.yaml" &&
        python3 tests/chart_metrics.py "$work/monitored.yaml" "${mode#*:}" >"$work/metrics.txt" 2>&1; then
        sed "s/^ok: /ok: storage.mode=${mode%%:*}: /" "$work/metrics.txt"
        passed=$((passed + $(grep -c '^ok:' "$work/metrics.txt")))
    else
        cat "$work/metrics.txt" >&2
        bad "storage.mode=${mode%%:*}: ServiceMonitors (tests/chart_metrics.py)"
    fi
done

# --- bad values fail with a clear message: "helm arguments|expected text"
rejects=(
    "--set tls.issuer=vault|value must be one of 'builtin', 'cert-manager'"
    "--set tls.certLifetime=90d|at '/tls/certLifetime': '90d' does not match pattern"
    "--set controller.storage.type=nfs|value must be one of 'persistentVolumeClaim', 'hostPath'"
    "--set controller.nbd.portRange.first=80|at '/controller/nbd/portRange/first': minimum: got 80"
    "--set controller.nbd.portRange.first=11000|controller.nbd.portRange: first (11000) must not be greater than last (10999)"
    "--set controller.nbd.portRange.last=12000|controller.nbd.portRange: at most 1000 ports"
    "--set controller.healthPort=10950|controller.healthPort (10950) lies inside controller.nbd.portRange 10900-10999"
    "--set node.connections=0|minimum: got 0, want 1"
    "--set controller.nbd.maxConnectionsPerPeer=0|minimum: got 0, want 1"
    "--set node.connections=four|got string, want integer"
    "--set storageClasses[0].fsType=btrfs|value must be one of 'ext4', 'xfs'"
    "--set storageClasses[0].reclaimPolicy=Recycle|value must be one of 'Delete', 'Retain'"
    "--set storageClasses[0].volumeBindingMode=Lazy|value must be one of 'Immediate', 'WaitForFirstConsumer'"
    "--set storageClasses[0].name=Fast_Disks|does not match pattern"
    "--set kubeletDir=var/lib/kubelet|does not match pattern '^/.+'"
    "--set sidecars.provisioner.image.tag=latest|does not match pattern"
    "--set controller.advertiseAddress=nbd.example|/controller/advertiseAddress"
    "--set controler.hostNetwork=true|additional properties 'controler' not allowed"
    "--set serviceMonitor.enabled=true --set controller.metrics.enabled=false|serviceMonitor.enabled needs controller.metrics.enabled"
    "--set volumeSnapshotClass.create=true --set sidecars.snapshotter.enabled=false|volumeSnapshotClass.create needs sidecars.snapshotter.enabled"
    "--set controller.storage.persistentVolumeClaim.storageClassName=nbd|must not use a StorageClass of this driver"
    "--set storage.mode=distributed|value must be one of 'embedded', 'cluster'"
    "--set tls.mode=on|value must be one of 'off', 'allowed', 'required'"
    "--set tls.certificateDelivery=csr|value must be one of 'auto', 'podCertificate', 'secret'"
    "--set tls.certificateDelivery=podCertificate --set tls.issuer=cert-manager|tls.certificateDelivery=podCertificate needs tls.issuer=builtin"
    "--set-json tls.mode=false|got boolean, want string"
    "--set storage.mode=cluster --set storage.nbd.portRange.first=11000|storage.nbd.portRange: first (11000) must not be greater than last (10999)"
    "--set storage.mode=cluster --set storage.metrics.port=9809|storage.metrics.port (9809) is node.healthPort too"
    "--set storage.mode=cluster --set storage.metrics.port=10950|storage.metrics.port (10950) lies inside storage.nbd.portRange 10900-10999"
    "--set node.metrics.port=9811|node.metrics.port (9811) is node.registrarHealthPort too"
    "--set node.metrics.port=10950|node.metrics.port (10950) lies inside controller.nbd.portRange 10900-10999"
    "--set node.metrics.port=80|at '/node/metrics/port': minimum: got 80"
    "--set storage.mode=cluster --set storage.metrics.port=9813|storage.metrics.port (9813) is node.metrics.port too"
    "--set storage.hostPath=srv|/storage/hostPath"
    "--set storage.exportKeySecret=Key_Secret|/storage/exportKeySecret"
)
for case in "${rejects[@]}"; do
    set_args=${case%%|*}
    want=${case#*|}
    # shellcheck disable=SC2086 # the arguments are split on purpose
    if render $set_args >"$work/out.yaml" 2>"$work/err.txt"; then
        bad "accepted bad values: $set_args"
    elif grep -qF -- "$want" "$work/err.txt"; then
        ok "rejects $set_args: $(grep -F -- "$want" "$work/err.txt" | head -1 | sed 's/^[[:space:]-]*//' | cut -c1-150)"
    else
        cat "$work/err.txt" >&2
        bad "rejected $set_args, but without '$want'"
    fi
done

# --- kubeconform against the pinned release's OpenAPI, offline
schemas=$NBD_CSI_TOOLS/schemas/kubernetes-$KUBERNETES_VERSION
if [ ! -f "$schemas/.complete" ]; then
    swagger=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')/api/openapi-spec/swagger.json
    rm -rf "$schemas"
    python3 tests/k8s/openapi2jsonschema.py "$swagger" "$schemas"
    touch "$schemas/.complete"
fi
# shellcheck disable=SC2054 # the comma belongs to -skip's argument
kubeconform_args=(-strict -summary -kubernetes-version "${KUBERNETES_VERSION#v}"
    -schema-location "$schemas/{{ .ResourceKind }}{{ .KindSuffix }}.json"
    # CRD kinds have no schema in the Kubernetes OpenAPI document.
    -skip VolumeSnapshotClass,ServiceMonitor,Issuer,Certificate)
for f in "$work/default.yaml" "$work/all-on-rendered.yaml" "$work/cluster-rendered.yaml"; do
    if "$TOOLS_BIN/kubeconform" "${kubeconform_args[@]}" "$f" >"$work/kc.txt" 2>&1; then
        ok "kubeconform $(basename "$f"): $(tail -1 "$work/kc.txt")"
    else
        cat "$work/kc.txt" >&2
        bad "kubeconform $(basename "$f")"
    fi
done
# The converted schemas must catch a misspelt field, or the check above proves nothing.
sed 's/^      hostNetwork: /      hostNetworkk: /' "$work/default.yaml" >"$work/typo.yaml"
if "$TOOLS_BIN/kubeconform" "${kubeconform_args[@]}" "$work/typo.yaml" >"$work/kc.txt" 2>&1; then
    bad "kubeconform accepted a misspelt field"
elif grep -q hostNetworkk "$work/kc.txt"; then
    ok "kubeconform rejects a misspelt field"
else
    cat "$work/kc.txt" >&2
    bad "kubeconform failed on the misspelt field for another reason"
fi

# --- Dockerfile, without a container engine
# Base images carry explicit version tags.
while read -r image; do
    case $image in
        *:latest) bad "Dockerfile base $image is not pinned" ;;
        *:*) ok "Dockerfile base $image pinned" ;;
        *) bad "Dockerfile base $image has no tag" ;;
    esac
done < <(sed -n 's/^ARG [A-Z_]*IMAGE=//p' Dockerfile)
# Every workspace member is copied into the builder stage.
members=$(cargo metadata --no-deps --format-version 1 --offline 2>/dev/null |
    python3 -c 'import json,os,sys; m=json.load(sys.stdin); r=m["workspace_root"]; print("\n".join(sorted(os.path.relpath(os.path.dirname(p["manifest_path"]), r) for p in m["packages"])))')
for member in $members; do
    if grep -qE "^COPY $member $member\$" Dockerfile && grep -qx "!$member/" .dockerignore; then
        ok "Dockerfile copies workspace member $member"
    else
        bad "Dockerfile or .dockerignore misses workspace member $member"
    fi
done
# The binaries both final stages copy (from the builder or a prebuilt image)
# are workspace binaries.
bins=$(cargo metadata --no-deps --format-version 1 --offline 2>/dev/null |
    python3 -c 'import json,sys; print("\n".join(t["name"] for p in json.load(sys.stdin)["packages"] for t in p["targets"] if "bin" in t["kind"]))')
for bin in $(sed -n 's#^COPY --from=\(builder\|prebuilt\) \(.*\) /usr/local/bin/$#\2#p' Dockerfile | tr ' ' '\n' | sort -u); do
    name=$(basename "$bin")
    if grep -qx "$name" <<<"$bins"; then ok "Dockerfile copies binary target $name"; else bad "Dockerfile copies $bin, no such binary target"; fi
    # Built binaries (cargo build --release) must not need a newer glibc than bookworm's 2.36.
    if [ -x "target/release/$name" ]; then
        need=$(objdump -T "target/release/$name" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
        if [ -z "$need" ] || [ "$(printf '%s\n' "$need" GLIBC_2.36 | sort -V | tail -1)" = GLIBC_2.36 ]; then
            ok "target/release/$name needs ${need:-no versioned glibc} (bookworm has 2.36)"
        else
            bad "target/release/$name needs $need, newer than bookworm's glibc 2.36"
        fi
    fi
done
# Runtime packages exist in Debian bookworm (this machine's suite).
if grep -q 'VERSION_CODENAME=bookworm' /etc/os-release; then
    [ -n "$(find /var/lib/apt/lists -name '*bookworm*Packages*' -print -quit)" ] || apt-get update -qq
    for pkg in $(sed -n 's/.*apt-get install -y --no-install-recommends \([a-z0-9 .+-]*\).*/\1/p' Dockerfile); do
        if apt-cache show --no-all-versions "$pkg" >/dev/null 2>&1; then ok "bookworm has package $pkg"; else bad "bookworm has no package $pkg"; fi
    done
else
    echo "skip: this machine is not Debian bookworm, runtime packages not checked"
fi

echo "chart: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
