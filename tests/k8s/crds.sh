#!/usr/bin/env bash
# The nbd.csi.dev CRDs (charts/nbd-csi/crds, generated from agent/src/resources)
# on a real kube-apiserver: they install and become Established, and the
# server enforces the rules their schemas carry (sizes, names, node names,
# one entry per node, one source, ordered port ranges, no shrinking, no move
# to another storage node, immutable snapshot specs, status enums), the
# status subresource and the spec.storageNode field selector the agents
# watch with. Then the agent's reconciler against that server
# (agent/tests/apiserver.rs): objects in, a served and fenced volume and its
# status out, deletion through the finalizer, an unclaimed volume
# quarantined with an Event, its NbdStorageNode and Lease. Then the agent as
# the process storage nodes run, `nbd-csi-controller agent`, with the chart's
# RBAC (tests/k8s/agent.sh): an NbdVolume served from 127.0.1.2, across a
# SIGTERM and a restart, on the same port with its data. Last, the
# controller in cluster mode against three in-process agents
# (controller/src/tests/cluster.rs).
# Tools come from tests/k8s/build-tools.sh (built on first use).
set -uo pipefail
cd "$(dirname "$0")/../.."
. tests/k8s/tools.sh
. tests/k8s/cluster.sh

ensure_helm
cluster_init nbd-csi-crds
cluster_start
k=$kubectl
if "$k" apply --server-side -f charts/nbd-csi/crds/nbd.csi.dev.yaml >"$work/out.txt" 2>&1 &&
    "$k" wait --for=condition=Established --timeout=60s \
        crd/nbdvolumes.nbd.csi.dev crd/nbdsnapshots.nbd.csi.dev crd/nbdstoragenodes.nbd.csi.dev >>"$work/out.txt" 2>&1; then
    ok "the three CRDs install and are Established"
else
    cat "$work/out.txt" >&2
    bad "CRDs rejected"
fi

V=vol-0123456789abcdef0123456789abcdef
S=snap-0123456789abcdef0123456789abcdef
volume() { # NAME SIZE STORAGE-NODE [MORE SPEC FIELDS]: an NbdVolume manifest
    printf 'apiVersion: nbd.csi.dev/v1alpha1\nkind: NbdVolume\nmetadata: {name: %s}\n' "$1"
    printf 'spec: {storageNode: %s, requestName: pvc-1, sizeBytes: %s, accessType: Mount%s}\n' "$3" "$2" "${4:-}"
}
accepted() { # DESCRIPTION COMMAND...
    if "${@:2}" >"$work/out.txt" 2>&1; then ok "$1"; else bad "$1: $(cat "$work/out.txt")"; fi
}
refused() { # DESCRIPTION REASON COMMAND...: the server must refuse, saying REASON
    if "${@:3}" >"$work/out.txt" 2>&1; then
        bad "$1: accepted"
    elif grep -qF -- "$2" "$work/out.txt"; then
        ok "$1 refused"
    else
        bad "$1 refused, but not for '$2': $(cat "$work/out.txt")"
    fi
}
create() { "$k" create -f - <<<"$1"; }

accepted "a volume published to a node, from a snapshot" \
    create "$(volume $V 1048576 storage-0 ", publishedTo: [{node: worker-1, accessMode: SingleNodeWriter}], source: {snapshot: $S}")"
refused "size 0" "should be greater than or equal to 1" create "$(volume vol-00000000000000000000000000000001 0 storage-0)"
refused "a name that is not a volume id" "the name is the volume id" create "$(volume my-volume 1 storage-0)"
refused "a storage node that is not a Node name" "spec.storageNode in body should match" create "$(volume vol-00000000000000000000000000000002 1 Storage_0)"
refused "a node published to twice" "Duplicate value" \
    create "$(volume vol-00000000000000000000000000000003 1 storage-0 ', publishedTo: [{node: a}, {node: a}]')"
refused "two sources" "one and only one schema" \
    create "$(volume vol-00000000000000000000000000000004 1 storage-0 ', source: {snapshot: a, volume: b}')"
refused "an unknown access type" 'Unsupported value: "Floppy"' create "$(volume vol-00000000000000000000000000000005 1 storage-0 | sed s/Mount/Floppy/)"
refused "shrinking" "a volume never shrinks" "$k" patch nbdvolume $V --type merge -p '{"spec":{"sizeBytes":1024}}'
accepted "growing" "$k" patch nbdvolume $V --type merge -p '{"spec":{"sizeBytes":2097152}}'
refused "moving to another storage node" "a volume stays on its storage node" "$k" patch nbdvolume $V --type merge -p '{"spec":{"storageNode":"storage-1"}}'
refused "changing the source" "a volume's source never changes" "$k" patch nbdvolume $V --type merge -p \
    '{"spec":{"source":{"snapshot":"snap-ffffffffffffffffffffffffffffffff"}}}'
refused "turning TLS on" "a volume's TLS mode never changes" "$k" patch nbdvolume $V --type merge -p '{"spec":{"tls":"required"}}'
refused "an unknown TLS mode" 'Unsupported value: "on"' create "$(volume vol-00000000000000000000000000000006 1 storage-0 ', tls: "on"')"
accepted "status through its subresource" "$k" patch nbdvolume $V --subresource status --type merge -p \
    '{"status":{"phase":"Available","port":10900,"sizeBytes":2097152,"conditions":[{"type":"Ready","status":"True","reason":"Serving","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}'
refused "an unknown phase" 'Unsupported value: "Happy"' "$k" patch nbdvolume $V --subresource status --type merge -p '{"status":{"phase":"Happy"}}'
want=$V
got=$("$k" get nbdvolumes --field-selector spec.storageNode=storage-0 -o jsonpath='{.items[*].metadata.name}' 2>&1)
if [ "$got" = "$want" ]; then ok "field selector spec.storageNode"; else bad "field selector: got '$got', want '$want'"; fi
got=$("$k" get nbdvolumes --field-selector spec.storageNode=storage-1 -o jsonpath='{.items[*].metadata.name}' 2>&1)
if [ -z "$got" ]; then ok "field selector excludes other storage nodes"; else bad "field selector: got '$got'"; fi
want="storage-0 2097152 Available 10900"
got=$("$k" get nbdvolume $V -o wide --no-headers 2>&1 | awk '{print $2, $3, $4, $5}')
if [ "$got" = "$want" ]; then ok "printer columns"; else bad "printer columns: got '$got', want '$want'"; fi

node() { # NAME FIRST LAST
    printf 'apiVersion: nbd.csi.dev/v1alpha1\nkind: NbdStorageNode\nmetadata: {name: %s}\n' "$1"
    printf 'spec: {address: 10.0.0.5, ports: {first: %s, last: %s}}\n' "$2" "$3"
}
accepted "a storage node" create "$(node storage-0 10900 10999)"
refused "a reversed port range" "the first port comes before the last" create "$(node storage-1 11000 10000)"
accepted "a snapshot" create "$(printf 'apiVersion: nbd.csi.dev/v1alpha1\nkind: NbdSnapshot\nmetadata: {name: %s}\nspec: {storageNode: storage-0, requestName: s1, sourceVolume: %s}\n' $S $V)"
refused "changing a snapshot's spec" "a snapshot's spec never changes" "$k" patch nbdsnapshot $S --type merge -p '{"spec":{"requestName":"s2"}}'

# --- the reconciler, on objects of its own
"$k" delete nbdvolumes,nbdsnapshots,nbdstoragenodes --all >/dev/null
"$k" create -f - >/dev/null <<'NODE'
apiVersion: v1
kind: Node
metadata: {name: worker-1}
NODE
"$k" patch node worker-1 --subresource=status --type=merge \
    -p '{"status":{"addresses":[{"type":"InternalIP","address":"127.0.0.1"},{"type":"Hostname","address":"worker-1"}]}}' >/dev/null
if NBD_CSI_TEST_KUBECONFIG=$KUBECONFIG workspace_test -q --test apiserver \
    -- --nocapture >"$work/reconciler.txt" 2>&1; then
    ok "the agent's reconciler on the API server (agent/tests/apiserver.rs)"
else
    cat "$work/reconciler.txt" >&2
    bad "the agent's reconciler on the API server (agent/tests/apiserver.rs)"
fi

# --- the agent as a process
. tests/k8s/agent.sh

# --- the controller in cluster mode (controller/src/tests/cluster.rs): three
# in-process agents on 127.0.1.1-3 with tmpfs of 64/128/192 MiB, a stale
# storage node, CSI calls over the controller's Unix socket. It wants a
# cluster without the objects above.
"$k" delete nbdvolumes,nbdsnapshots,nbdstoragenodes --all --wait=false >/dev/null
"$k" delete leases --all -n default >/dev/null
if NBD_CSI_TEST_KUBECONFIG=$KUBECONFIG workspace_test -q --lib tests::cluster:: \
    -- --nocapture >"$work/cluster-mode.txt" 2>&1; then
    ok "the controller in cluster mode: placement, publish, unpublish, clone, snapshot, expand, delete"
    grep -E '^(spread of|CreateVolume through)' "$work/cluster-mode.txt"
else
    cat "$work/cluster-mode.txt" >&2
    bad "the controller in cluster mode (controller/src/tests/cluster.rs)"
fi

echo "crds: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
