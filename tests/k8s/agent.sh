# shellcheck shell=bash
# `nbd-csi-controller agent` as a process against the kube-apiserver that
# tests/k8s/crds.sh started (sourced by it once the CRDs are Established):
#   - it runs with exactly the RBAC and the storage policy the chart gives
#     storage agents (storage.mode=cluster; a token of the storage
#     ServiceAccount bound to a pod on its node), its own data directory and
#     address 127.0.1.2; the policy refuses it another node's volume and
#     Lease, and refuses a token bound to no pod;
#   - it writes its NbdStorageNode and renews its Lease;
#   - an NbdVolume created with kubectl for its node becomes Available with
#     a port; published to a Node whose InternalIP is 127.0.0.1, the export,
#     under the name derived from the key (computed here with Python's hmac,
#     which pins the derivation), is readable from 127.0.0.1, another peer
#     address and a wrong name are refused, qemu-io writes a pattern, and the
#     object carries no export name;
#   - SIGTERM stops it with exit 0; restarted, it serves the same volume on the
#     same port with the pattern intact; published nowhere it gives its port
#     back, published again it serves the same data; deleting the object
#     deletes its data.
# Uses $work, $kubectl, $helm, $api_url, ok/bad and cluster_kubeconfig from
# tests/k8s/cluster.sh; needs nbdinfo and qemu-io.

agent_ns=nbd-csi-agent
agent_node=storage-a
agent_addr=127.0.1.2
agent_volume=vol-0000000000000000000000000000b001
agent_dir=$work/agent
agent_pid=
mkdir -p "$agent_dir"

agent_wait() { # SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s until it succeeds, while the agent runs
    local deadline=$((SECONDS + $1))
    until "${@:3}" >"$agent_dir/wait.txt" 2>&1; do
        if ! kill -0 "$agent_pid" 2>/dev/null; then
            bad "$2: the agent exited: $(tail -n 5 "$agent_dir/agent.log")"
            return 1
        fi
        if [ $SECONDS -ge $deadline ]; then
            bad "$2: not within $1 s: $(tail -c 600 "$agent_dir/wait.txt")"
            return 1
        fi
        sleep 0.2
    done
    ok "$2"
}

agent_start() {
    NO_COLOR=1 "$agent_bin" agent --node-name "$agent_node" --data-dir "$agent_dir/data" --listen-address "$agent_addr" \
        --nbd-port-range "$agent_ports" --export-key-file "$agent_dir/export.key" --namespace "$agent_ns" \
        --kubeconfig "$agent_dir/kubeconfig" --metrics-address "$agent_addr:$agent_metrics_port" \
        >>"$agent_dir/agent.log" 2>&1 &
    agent_pid=$!
    pids+=("$agent_pid")
}

agent_stop() { # SIGTERM, then the exit status within 30 s
    kill -TERM "$agent_pid"
    local deadline=$((SECONDS + 30)) status
    while kill -0 "$agent_pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    if kill -0 "$agent_pid" 2>/dev/null; then
        bad "the agent ignored SIGTERM for 30 s"
        return 1
    fi
    wait "$agent_pid"
    status=$?
    unset 'pids[-1]'
    if [ "$status" -eq 0 ]; then ok "SIGTERM stops the agent with exit 0"; else bad "the agent exited with $status on SIGTERM: $(tail -n 20 "$agent_dir/agent.log")"; fi
}

announced() { # the NbdStorageNode names the agent's address, first port and some free space
    [ "$("$kubectl" get nbdstoragenode "$agent_node" -o jsonpath='{.spec.address} {.spec.ports.first} {.status.freeBytes}' |
        awk '$3 > 0 {print $1, $2}')" = "$agent_addr ${agent_ports%-*}" ]
}

leased() { [ "$("$kubectl" -n "$agent_ns" get lease "$agent_node" -o jsonpath='{.spec.holderIdentity}')" = "$agent_node" ]; }

available() { "$kubectl" get nbdvolume "$agent_volume" -o jsonpath='{.status.phase} {.status.port}' | grep -qE '^Available [0-9]+$'; }

deleted() { ! "$kubectl" get nbdvolume "$agent_volume" >/dev/null 2>&1 && [ ! -e "$agent_dir/data/volumes/$agent_volume.img" ]; }

served() { # PORT: the export under its derived name has the volume's size
    [ "$(nbdinfo --size "nbd://$agent_addr:$1/$agent_export" 2>&1)" = 4194304 ]
}

qemu_io() { # COMMANDS...: qemu-io on the export; fails on any failed command
    local args=() c out
    for c in "$@"; do args+=(-c "$c"); done
    out=$(qemu-io -f raw "nbd://$agent_addr:$agent_port/$agent_export" "${args[@]}" 2>&1) || { echo "$out"; return 1; }
    if grep -qiE 'fail|error' <<<"$out"; then echo "$out"; return 1; fi
}

# --- the agent's binary, RBAC, identity and key
if ! agent_bin=$(controller_binary 2>"$agent_dir/build.txt"); then
    cat "$agent_dir/build.txt" >&2
    bad "building nbd-csi-controller"
    return 0
fi
# Ten ports free on the agent's address, and one for its metrics.
read -r agent_ports agent_metrics_port < <(python3 - "$agent_addr" <<'PY'
import socket, sys
for base in range(29870, 30870, 11):
    held = []
    try:
        for port in range(base, base + 11):
            s = socket.socket()
            s.bind((sys.argv[1], port))
            held.append(s)
    except OSError:
        continue
    finally:
        for s in held:
            s.close()
    print(f"{base}-{base + 9} {base + 10}")
    break
PY
)
"$kubectl" create namespace "$agent_ns" >/dev/null
if "$helm" template nbd-csi charts/nbd-csi --namespace "$agent_ns" --set storage.mode=cluster \
    --show-only templates/serviceaccounts.yaml --show-only templates/rbac.yaml \
    --show-only templates/storage-policy.yaml >"$agent_dir/rbac.yaml" 2>&1 &&
    "$kubectl" apply -f "$agent_dir/rbac.yaml" >"$agent_dir/apply.txt" 2>&1; then
    ok "the chart's ServiceAccounts, RBAC and storage policy for storage.mode=cluster installed in $agent_ns"
else
    cat "$agent_dir/rbac.yaml" "$agent_dir/apply.txt" >&2
    bad "installing the chart's RBAC for storage.mode=cluster"
fi
agent_token=$(cluster_pod_token "$agent_ns" nbd-csi-storage "$agent_node")
cluster_kubeconfig "$agent_dir/kubeconfig" nbd-csi-storage "$agent_token"
"$kubectl" create -f - >/dev/null <<'NODE'
apiVersion: v1
kind: Node
metadata: {name: worker-a}
NODE
"$kubectl" patch node worker-a --subresource=status --type=merge \
    -p '{"status":{"addresses":[{"type":"InternalIP","address":"127.0.0.1"},{"type":"Hostname","address":"worker-a"}]}}' >/dev/null
head -c 32 /dev/urandom >"$agent_dir/export.key"
agent_export=$(python3 -c 'import hashlib, hmac, sys
key = open(sys.argv[1], "rb").read()
print(hmac.new(key, b"nbd-csi export name v1\0" + sys.argv[2].encode(), hashlib.sha256).hexdigest())' \
    "$agent_dir/export.key" "$agent_volume")

# --- presence
agent_start
agent_wait 60 "the agent's NbdStorageNode names $agent_addr, its ports and its free space" announced
agent_wait 30 "the agent's Lease in $agent_ns" leased

# --- the chart's storage policy: the agent changes only its own node's objects
refused_to_agent() { # DESCRIPTION PATTERN TOKEN METHOD PATH [BODY]: the API server refuses the request, saying PATTERN
    local out type=application/json
    [ "$4" = PATCH ] && type=application/merge-patch+json
    out=$(curl -sS --cacert "$api_ca" -H "Authorization: Bearer $3" -X "$4" -H "Content-Type: $type" \
        ${6:+--data "$6"} -w ' HTTP %{http_code}' "$api_url$5" 2>&1)
    if grep -q ' HTTP 403$' <<<"$out" && grep -qE "$2" <<<"$out"; then ok "$1"; else bad "$1: $out"; fi
}
"$kubectl" create -f - >/dev/null <<'OTHER'
apiVersion: nbd.csi.dev/v1alpha1
kind: NbdVolume
metadata: {name: vol-0000000000000000000000000000b0b0}
spec: {storageNode: storage-b, requestName: pvc-other, sizeBytes: 1048576, accessType: Block}
OTHER
refused_to_agent "the agent may not write the status of another storage node's volume" \
    "storage agent on node $agent_node may change only its own node's objects" "$agent_token" PATCH \
    /apis/nbd.csi.dev/v1alpha1/nbdvolumes/vol-0000000000000000000000000000b0b0/status '{"status":{"phase":"Available"}}'
refused_to_agent "the agent may not take another node's Lease" "may change only its own node's objects, not leases storage-b" \
    "$agent_token" POST "/apis/coordination.k8s.io/v1/namespaces/$agent_ns/leases" \
    '{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{"name":"storage-b"}}'
"$kubectl" delete nbdvolume vol-0000000000000000000000000000b0b0 >/dev/null
refused_to_agent "a token of the agent's ServiceAccount not bound to a pod is refused" "token names no node" \
    "$("$kubectl" -n "$agent_ns" create token nbd-csi-storage --duration 10m)" PATCH \
    "/apis/nbd.csi.dev/v1alpha1/nbdstoragenodes/$agent_node/status" '{"status":{"freeBytes":1}}'

# --- a volume, published to worker-a (127.0.0.1)
"$kubectl" create -f - >"$agent_dir/create.txt" 2>&1 <<VOLUME || bad "creating the NbdVolume: $(cat "$agent_dir/create.txt")"
apiVersion: nbd.csi.dev/v1alpha1
kind: NbdVolume
metadata: {name: $agent_volume}
spec:
  storageNode: $agent_node
  requestName: pvc-agent
  sizeBytes: 4194304
  accessType: Block
  publishedTo: [{node: worker-a, accessMode: SingleNodeWriter}]
VOLUME
agent_wait 60 "the NbdVolume becomes Available with a port" available
agent_port=$("$kubectl" get nbdvolume "$agent_volume" -o jsonpath='{.status.port}')
if [ "${agent_port:-0}" -ge "${agent_ports%-*}" ] && [ "${agent_port:-0}" -le "${agent_ports#*-}" ]; then
    ok "its port $agent_port is of the agent's range $agent_ports"
else
    bad "its port '$agent_port' is not of the agent's range $agent_ports"
fi
if "$kubectl" get nbdvolume "$agent_volume" -o json | grep -q "$agent_export"; then
    bad "the NbdVolume carries its export name"
else
    ok "the NbdVolume carries no export name"
fi
if served "$agent_port"; then
    ok "nbdinfo from 127.0.0.1 reads the export under its derived name: 4194304 bytes"
else
    bad "nbdinfo nbd://$agent_addr:$agent_port/<derived name>: $(nbdinfo --size "nbd://$agent_addr:$agent_port/$agent_export" 2>&1)"
fi
out=$(python3 tests/k8s/nbd_probe.py 127.0.0.9 "nbd://$agent_addr:$agent_port/$agent_export" 2>&1)
status=$?
if [ "$status" -eq 2 ]; then
    ok "a peer at 127.0.0.9, not worker-a's address, is refused"
else
    bad "a peer at 127.0.0.9: exit $status: $out"
fi
if nbdinfo --size "nbd://$agent_addr:$agent_port/$(printf '%064d' 0)" >/dev/null 2>&1; then
    bad "a wrong export name was served"
else
    ok "a wrong export name is refused"
fi
if out=$(qemu_io "write -P 0xa5 0 1M" "write -P 0x3c 3M 512k" "flush"); then
    ok "qemu-io writes two patterns"
else
    bad "qemu-io write: $out"
fi
if curl -sf "http://$agent_addr:$agent_metrics_port/metrics" 2>&1 |
    grep -qE "^nbd_csi_volume_written_bytes_total\{volume_id=\"$agent_volume\"\} 1572864$"; then
    ok "the agent's metrics count the bytes written to the volume"
else
    bad "metrics: $(curl -s "http://$agent_addr:$agent_metrics_port/metrics" 2>&1 | grep -E "$agent_volume" | head -5)"
fi

# --- SIGTERM, restart: the same port, the data intact
agent_stop
if [ "$(stat -c %s "$agent_dir/data/volumes/$agent_volume.img" 2>&1)" = 4194304 ]; then
    ok "the image stays in the agent's data directory"
else
    bad "no image of 4194304 bytes: $(ls -lR "$agent_dir/data" 2>&1 | head -20)"
fi
agent_start
agent_wait 60 "restarted, the agent serves the volume again on port $agent_port" served "$agent_port"
got=$("$kubectl" get nbdvolume "$agent_volume" -o jsonpath='{.status.phase} {.status.port}')
if [ "$got" = "Available $agent_port" ]; then ok "its status still says Available on port $agent_port"; else bad "status after the restart: $got"; fi
if out=$(qemu_io "read -P 0xa5 0 1M" "read -P 0 1M 2M" "read -P 0x3c 3M 512k" "read -P 0 3670016 512k"); then
    ok "qemu-io reads both patterns back, and zeroes around them"
else
    bad "qemu-io read after the restart: $out"
fi

# --- published nowhere: the server stops and the port is given back; published again: a port, the data intact
idle() { # Available, no port, Ready for the reason Unpublished
    [ "$("$kubectl" get nbdvolume "$agent_volume" -o jsonpath='{.status.phase}/{.status.port}/{.status.conditions[?(@.type=="Ready")].reason}')" = Available//Unpublished ]
}
listening() { python3 -c 'import socket, sys; sys.exit(socket.create_connection((sys.argv[1], int(sys.argv[2])), 2) is None)' "$agent_addr" "$1" 2>/dev/null; }
"$kubectl" patch nbdvolume "$agent_volume" --type merge -p '{"spec":{"publishedTo":[]}}' >/dev/null
agent_wait 60 "published nowhere, the NbdVolume is Available without a port (Ready: Unpublished)" idle
if listening "$agent_port"; then bad "port $agent_port still accepts connections"; else ok "nothing listens on its old port $agent_port any more"; fi
"$kubectl" patch nbdvolume "$agent_volume" --type merge \
    -p '{"spec":{"publishedTo":[{"node":"worker-a","accessMode":"SingleNodeWriter"}]}}' >/dev/null
agent_wait 60 "published again, the NbdVolume is Available with a port" available
agent_port=$("$kubectl" get nbdvolume "$agent_volume" -o jsonpath='{.status.port}')
if out=$(qemu_io "read -P 0xa5 0 1M" "read -P 0x3c 3M 512k"); then
    ok "published again on port $agent_port: both patterns read back"
else
    bad "qemu-io read after publishing again: $out"
fi

# --- deleted through its finalizer, then stopped and its objects removed
got=$("$kubectl" get nbdvolume "$agent_volume" -o jsonpath='{.metadata.finalizers}')
if grep -qF nbd.csi.dev/agent <<<"$got"; then ok "the NbdVolume carries the agent's finalizer"; else bad "finalizers: '$got'"; fi
"$kubectl" delete nbdvolume "$agent_volume" --wait=false >/dev/null
agent_wait 60 "the deleted NbdVolume is gone, and its image with it" deleted
agent_stop
"$kubectl" delete nbdstoragenode "$agent_node" >/dev/null
"$kubectl" -n "$agent_ns" delete lease "$agent_node" >/dev/null
if grep -qE ' (ERROR|WARN) ' "$agent_dir/agent.log"; then
    echo "--- warnings and errors in the agent's log:" >&2
    grep -E ' (ERROR|WARN) ' "$agent_dir/agent.log" | head -20 >&2
fi
