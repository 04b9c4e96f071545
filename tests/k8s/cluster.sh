# shellcheck shell=bash
# Shared by the suites in tests/k8s/ (sourced after
# tests/k8s/tools.sh, from the repository root):
#   - ok/bad: one line per check, counted in $passed and $failed
#   - cluster_init PREFIX: a work directory ($work) and an EXIT trap that stops
#     every process in $pids, newest first (so kube-apiserver before etcd)
#   - controller_binary: the nbd-csi-controller to run (built when needed)
#   - cluster_start: etcd and kube-apiserver on 127.0.0.1 (free ports, token
#     authentication, RBAC, service-account tokens); exports KUBECONFIG (admin)
#     and sets $api_url, $api_ca, $admin_token, $kubectl, $helm,
#     $apiserver_pid; apiserver_start runs kube-apiserver again after a kill,
#     apiserver_ready waits for it
#   - wait_until, jp, gone, check, acting, logs: polling and checking
#   - cluster mode as processes (the agents, the controller, their objects
#     and disks): see the section near the end
#   - Nodes kept as kubelets keep them (status, heartbeat Leases), for the
#     suites that run Kubernetes' own controllers: the last section
# No kubelet runs; the suites that need kube-controller-manager or
# kube-scheduler start them.

passed=0
failed=0
. "$(dirname "${BASH_SOURCE[0]}")/../cargo.sh"
# A binary of the workspace, its path on stdout: $ENVVAR when set, otherwise
# the workspace's debug build, built here (cargo's messages on stderr).
workspace_binary() { # BINARY ENVVAR
    if [ -n "${!2:-}" ]; then
        realpath "${!2}"
        return
    fi
    debug_build >&2 || return 1
    cargo metadata --manifest-path "$cargo_manifest" --format-version 1 --no-deps --offline |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"] + "/debug/" + sys.argv[1])' "$1"
}
# The nbd-csi-controller binary the suites run ($NBD_CSI_CONTROLLER when set).
controller_binary() { workspace_binary nbd-csi-controller NBD_CSI_CONTROLLER; }
# The nbd-csi-node binary ($NBD_CSI_NODE when set).
node_binary() { workspace_binary nbd-csi-node NBD_CSI_NODE; }

ok() { passed=$((passed + 1)); echo "ok [${SECONDS}s]: $*"; }
bad() { failed=$((failed + 1)); echo "FAILED [${SECONDS}s]: $*" >&2; }

pids=()
work=
# Storage node name -> anything non-empty, for the agents that serve TLS:
# with $tls_prefix set, each follows its certificate Secret (below).
declare -A agent_tls_sync=()

cluster_cleanup() {
    # Newest first; each gets 15 s to stop on SIGTERM.
    local i pid
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        pid=${pids[i]}
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    [ -n "$work" ] || return 0
    if [ "${KEEP_WORK:-}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}

cluster_init() { # PREFIX
    work=$(mktemp -d "/tmp/$1.XXXXXX")
    trap cluster_cleanup EXIT
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }

# shellcheck disable=SC2034 # $helm is for the scripts that source this file
cluster_start() {
    ensure_etcd
    ensure_kubernetes
    helm=$TOOLS_BIN/helm
    kubectl=$TOOLS_BIN/kubectl
    local peer_port
    etcd_port=$(free_port)
    peer_port=$(free_port)
    api_port=$(free_port)

    "$TOOLS_BIN/etcd" --name nbd-csi-test --data-dir "$work/etcd" \
        --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
        --initial-cluster "nbd-csi-test=http://127.0.0.1:$peer_port" \
        --listen-metrics-urls "" --log-level warn >"$work/etcd.log" 2>&1 &
    pids+=($!)

    admin_token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
    echo "$admin_token,nbd-csi-admin,nbd-csi-admin,system:masters" >"$work/tokens.csv"
    openssl genrsa -out "$work/sa.key" 2048 2>/dev/null
    openssl rsa -in "$work/sa.key" -pubout -out "$work/sa.pub" 2>/dev/null
    mkdir -p "$work/certs"
    api_url=https://127.0.0.1:$api_port
    api_ca=$work/certs/apiserver.crt
    apiserver_start
    if ! apiserver_ready 180; then
        tail -n 30 "$work/etcd.log" "$work/kube-apiserver.log" >&2
        echo "kube-apiserver did not become ready" >&2
        exit 1
    fi
    export KUBECONFIG=$work/kubeconfig
    cluster_kubeconfig "$KUBECONFIG" admin "$admin_token"
    ok "etcd $ETCD_VERSION and kube-apiserver $("$kubectl" version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])') ready on 127.0.0.1:$api_port"
}

# kube-apiserver on $api_port over the etcd cluster_start ran, with its
# certificates, tokens and service-account keys; $apiserver_pid. Run again
# after the server was killed (tests/k8s/faults.sh), it serves the same
# cluster on the same address, certificate included (--cert-dir keeps it).
apiserver_start() {
    "$TOOLS_BIN/kube-apiserver" \
        --etcd-servers "http://127.0.0.1:$etcd_port" \
        --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
        --cert-dir "$work/certs" \
        --token-auth-file "$work/tokens.csv" \
        --authorization-mode RBAC \
        --allow-privileged=true \
        --service-cluster-ip-range 10.0.0.0/24 \
        --endpoint-reconciler-type none \
        --service-account-issuer https://kubernetes.default.svc \
        --service-account-key-file "$work/sa.pub" \
        --service-account-signing-key-file "$work/sa.key" \
        --enable-priority-and-fairness=false \
        --profiling=false \
        >>"$work/kube-apiserver.log" 2>&1 &
    apiserver_pid=$!
    pids+=("$apiserver_pid")
}

apiserver_ready() { # SECONDS: /readyz answers within SECONDS, while the server runs
    local deadline=$((SECONDS + $1))
    until curl -sf --cacert "$api_ca" -H "Authorization: Bearer $admin_token" "$api_url/readyz" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ] || ! kill -0 "$apiserver_pid" 2>/dev/null; then
            return 1
        fi
        sleep 0.5
    done
}

cluster_kubeconfig() { # FILE USER TOKEN: a kubeconfig for the test server with a bearer token
    "$kubectl" --kubeconfig "$1" config set-cluster test --server "$api_url" --certificate-authority "$api_ca" --embed-certs >/dev/null
    "$kubectl" --kubeconfig "$1" config set-credentials "$2" --token "$3" >/dev/null
    "$kubectl" --kubeconfig "$1" config set-context test --cluster test --user "$2" >/dev/null
    "$kubectl" --kubeconfig "$1" config use-context test >/dev/null
}

# --- small helpers of the suites that drive a cluster
wait_until() { # SECONDS COMMAND...: polls every 0.5 s; false after SECONDS
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.5
    done
}
jp() { "$kubectl" get "$@" 2>/dev/null || true; } # jp KIND NAME -o jsonpath=...
# volume_attachment NAME PV NODE: a VolumeAttachment of PV to NODE for
# $driver, as the attach/detach controller makes one.
volume_attachment() {
    "$kubectl" create -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: VolumeAttachment
metadata: {name: $1}
spec:
  attacher: $driver
  nodeName: $3
  source: {persistentVolumeName: $2}
EOF
}
gone() { ! "$kubectl" get "$@" >/dev/null 2>&1; }
check() { # DESCRIPTION WANT GOT
    if [ "$2" = "$3" ]; then ok "$1"; else bad "$1: got '$3', want '$2'"; fi
}
acting() { echo "   (acting as $1)"; }
logs() { # FILE...: the tail of each, from $work
    local f
    for f in "$@"; do echo "--- tail of $f" >&2; tail -n 25 "$work/$f" >&2 || true; done
}

# --- cluster mode as processes (tests/k8s/scale-out.sh, tests/k8s/faults.sh).
# The suite sets: $controller_bin, $driver, $ns (the chart's namespace),
# $socket (the controller's CSI socket), the agents' names in agents=(...),
# their addresses in the associative array agent_addr, $disks (each agent's
# data lives in $disks/NAME/data) and $port_base (agent i gets the ports
# port_base+100i to +49, its metrics +99; $agent_port_block instead of 100
# for more); optionally $storage_timeout (the controller's
# --storage-timeout, default 30), controller_tls_args=(...) (its issuer
# flags) and $tls_prefix (each agent of agent_tls_sync then follows its
# certificate Secret <prefix>-storage-NAME into $work/tls/NAME).
controller_tls_args=()
tls_prefix=""


# The agents' disks live outside $work, in $disks: each a tmpfs
# (mount_agent_disk), unmounted after every process has stopped, before
# the work directory goes. Call after cluster_init: it takes over the EXIT trap.
agent_disks_init() { # PREFIX
    disks=$(mktemp -d "/tmp/$1-disks.XXXXXX")
    trap agent_disks_cleanup EXIT
}
agent_disks_cleanup() {
    cluster_cleanup
    local d
    for d in "$disks"/*; do umount "$d" 2>/dev/null || umount -l "$d" 2>/dev/null || true; done
    rm -rf "$disks"
}
mount_agent_disk() { # NAME MIB: a tmpfs of MIB for agent NAME (needs root)
    mkdir -p "$disks/$1"
    mount -t tmpfs -o "size=$2m,mode=0755" nbd-csi-agent "$disks/$1" || { bad "mounting a tmpfs (needs root)"; return 1; }
}

# The chart's CRDs, CSIDriver, StorageClass, ServiceAccounts, RBAC and
# storage policy for storage.mode=cluster in $ns, and a kubeconfig with a
# token of the controller's ServiceAccount: $work/controller.kubeconfig
# (each agent gets its own, bound to a pod on its node: start_agent).
cluster_mode_objects() {
    "$kubectl" create namespace "$ns" >/dev/null
    "$helm" template nbd-csi charts/nbd-csi --namespace "$ns" --set storage.mode=cluster \
        --show-only templates/csidriver.yaml --show-only templates/storageclasses.yaml \
        --show-only templates/serviceaccounts.yaml --show-only templates/rbac.yaml \
        --show-only templates/storage-policy.yaml >"$work/chart.yaml"
    if "$kubectl" apply --server-side -f charts/nbd-csi/crds/nbd.csi.dev.yaml >"$work/apply.txt" 2>&1 &&
        "$kubectl" wait --for=condition=Established --timeout=60s \
            crd/nbdvolumes.nbd.csi.dev crd/nbdsnapshots.nbd.csi.dev crd/nbdstoragenodes.nbd.csi.dev >>"$work/apply.txt" 2>&1 &&
        "$kubectl" apply -f "$work/chart.yaml" >>"$work/apply.txt" 2>&1; then
        ok "the chart's CRDs, CSIDriver, StorageClass, ServiceAccounts, RBAC and storage policy for storage.mode=cluster applied"
    else
        cat "$work/apply.txt" >&2
        bad "applying the chart's objects"
        return 1
    fi
    cluster_kubeconfig "$work/controller.kubeconfig" nbd-csi-controller "$("$kubectl" -n "$ns" create token nbd-csi-controller --duration 2h)"
}

start_controller() { # LOG [HOSTNAME]: the controller in cluster mode on $socket; $controller_pid
    # With HOSTNAME, in a UTS namespace whose hostname it is (a pod's name).
    local uts=()
    [ -z "${2:-}" ] || uts=(unshare --uts sh -c 'hostname "$0" && exec "$@"' "$2")
    rm -f "$socket"
    NO_COLOR=1 RUST_LOG=${RUST_LOG:-info,nbd_csi_controller=debug} "${uts[@]}" "$controller_bin" \
        --endpoint "unix://$socket" --driver-name "$driver" --storage-mode cluster \
        --export-key-secret nbd-csi-export-key --namespace "$ns" --storage-timeout "${storage_timeout:-30}" \
        --kubeconfig "$work/controller.kubeconfig" "${controller_tls_args[@]}" >"$work/$1" 2>&1 &
    controller_pid=$!
    pids+=("$controller_pid")
    wait_until 60 test -S "$socket" && kill -0 "$controller_pid"
}

# The export key as a storage node mounts it: from the Secret the
# controller created, into $work/export.key.
mount_export_key() {
    if wait_until 30 "$kubectl" -n "$ns" get secret nbd-csi-export-key; then
        ok "the controller created the export-key Secret $ns/nbd-csi-export-key"
    else
        logs controller.log
        bad "no export-key Secret"
        return 1
    fi
    acting "kubelet: the Secret's key mounted as a file on each storage node"
    "$kubectl" -n "$ns" get secret nbd-csi-export-key -o jsonpath='{.data.key}' | base64 -d >"$work/export.key"
    chmod 0400 "$work/export.key"
}

start_agent() { # NAME: `nbd-csi-controller agent` for storage node NAME; ${agent_pid[NAME]}
    local a=$1 i
    for i in "${!agents[@]}"; do [ "${agents[i]}" = "$a" ] && break; done
    # Its pod's token, which names its node (the chart's storage policy wants it).
    [ -f "$work/storage-$a.kubeconfig" ] ||
        cluster_kubeconfig "$work/storage-$a.kubeconfig" nbd-csi-storage "$(cluster_pod_token "$ns" nbd-csi-storage "$a")"
    local block=${agent_port_block:-100} first tls=()
    first=$((port_base + block * i))
    [ -z "$tls_prefix" ] || [ -z "${agent_tls_sync[$a]:-}" ] ||
        tls=(--tls-dir "$work/tls/$a" --tls-secret-prefix "$tls_prefix")
    NO_COLOR=1 "$controller_bin" agent --node-name "$a" --data-dir "$disks/$a/data" \
        --listen-address "${agent_addr[$a]}" --nbd-port-range "$first-$((first + block / 2 - 1))" \
        --export-key-file "$work/export.key" --namespace "$ns" --kubeconfig "$work/storage-$a.kubeconfig" \
        --metrics-address "${agent_addr[$a]}:$((first + block - 1))" "${tls[@]}" >>"$work/agent-$a.log" 2>&1 &
    agent_pid[$a]=$!
    pids+=("${agent_pid[$a]}")
}

announced() { # NAME: its NbdStorageNode reports free space
    [ "$("$kubectl" get nbdstoragenode "$1" -o jsonpath='{.status.freeBytes}' 2>/dev/null)" -gt 0 ] 2>/dev/null
}

start_agents() { # each agent of $agents on a tmpfs of ${agent_mib[NAME]} MiB; false unless all announce
    local a
    for a in "${agents[@]}"; do
        mount_agent_disk "$a" "${agent_mib[$a]}" || return 1
        start_agent "$a"
    done
    for a in "${agents[@]}"; do
        if wait_until 60 announced "$a"; then
            ok "agent $a on ${agent_addr[$a]} (${agent_mib[$a]} MiB tmpfs): NbdStorageNode reports $(jp nbdstoragenode "$a" -o jsonpath='{.status.freeBytes}') bytes free"
        else
            logs "agent-$a.log"
            bad "agent $a did not announce itself"
            return 1
        fi
    done
}

# Every agent's volume records against the NbdVolumes: "" when each record
# has its object on that storage node and each object its record, else the
# differences ("record-only ID@NODE", "object-only ID@NODE").
records_vs_objects() {
    local a
    {
        for a in "${agents[@]}"; do
            find "$disks/$a/data/volumes" -maxdepth 1 -name 'vol-*.json' -printf "%f@$a\n" 2>/dev/null | sed 's/\.json@/@/'
        done
    } | sort >"$work/agent-records.txt"
    "$kubectl" get nbdvolumes -o jsonpath='{range .items[*]}{.metadata.name}@{.spec.storageNode}{"\n"}{end}' | sort >"$work/object-nodes.txt"
    diff "$work/agent-records.txt" "$work/object-nodes.txt" | sed -n 's/^< /record-only /p; s/^> /object-only /p' | paste -sd' '
}

cluster_node() { # NAME IP DRIVER: a Node as its kubelet registers it, with InternalIP IP unless
    # IP is empty, and with DRIVER unless empty a CSINode naming that driver, as
    # node-driver-registrar makes the kubelet create it.
    "$kubectl" create -f - >/dev/null <<EOF || return 1
apiVersion: v1
kind: Node
metadata: {name: $1}
EOF
    if [ -n "$2" ]; then
        "$kubectl" patch node "$1" --subresource=status --type=merge \
            -p "{\"status\":{\"addresses\":[{\"type\":\"InternalIP\",\"address\":\"$2\"},{\"type\":\"Hostname\",\"address\":\"$1\"}]}}" >/dev/null || return 1
    fi
    [ -z "$3" ] || "$kubectl" create -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: CSINode
metadata: {name: $1}
spec:
  drivers:
    - {name: $3, nodeID: $1}
EOF
}

cluster_pod_token() { # NAMESPACE SERVICEACCOUNT NODE: a token of SERVICEACCOUNT bound to a pod on NODE, as
    # the kubelet gives one to the storage agent's pod there (it names the node, which the
    # chart's storage policy requires). The pod object only carries the binding: no kubelet runs it.
    "$kubectl" -n "$1" create -f - >/dev/null <<EOF || return 1
apiVersion: v1
kind: Pod
metadata: {name: $2-$3}
spec:
  serviceAccountName: $2
  nodeName: $3
  containers: [{name: agent, image: localhost/nbd-csi:test}]
EOF
    "$kubectl" -n "$1" create token "$2" --duration 2h --bound-object-kind Pod --bound-object-name "$2-$3"
}

# --- Nodes kept as kubelets keep them, for Kubernetes' own controllers
# (tests/k8s/controllers.sh). No kubelet runs: the Node objects, their
# status and their heartbeat Leases are written here, so that
# kube-controller-manager's node lifecycle controller sees live nodes, the
# attach/detach controller manages their attachments and kube-scheduler
# places pods on them (the pods themselves never run).

kubelet_node() { # NAME IP DRIVER [LABEL=VALUE...]: a Node as its kubelet registers it with
    # controller-managed attach/detach (the kubelet default): that
    # annotation, InternalIP IP, Ready, room for pods; its CSINode naming
    # DRIVER unless empty, as node-driver-registrar makes the kubelet create
    # it. Its heartbeat: node_heartbeats_start.
    local name=$1 ip=$2 csi=$3 labels="kubernetes.io/hostname: $1, kubernetes.io/os: linux" l now
    shift 3
    for l in "$@"; do labels="$labels, ${l%%=*}: \"${l#*=}\""; done
    "$kubectl" create -f - >/dev/null <<EON || return 1
apiVersion: v1
kind: Node
metadata:
  name: $name
  labels: {$labels}
  annotations: {volumes.kubernetes.io/controller-managed-attach-detach: "true"}
EON
    now=$(date -u +%FT%TZ)
    "$kubectl" patch node "$name" --subresource=status --type=merge -p "{\"status\":{
        \"addresses\":[{\"type\":\"InternalIP\",\"address\":\"$ip\"},{\"type\":\"Hostname\",\"address\":\"$name\"}],
        \"capacity\":{\"cpu\":\"2\",\"memory\":\"4Gi\",\"pods\":\"110\"},
        \"allocatable\":{\"cpu\":\"2\",\"memory\":\"4Gi\",\"pods\":\"110\"},
        \"conditions\":[{\"type\":\"Ready\",\"status\":\"True\",\"reason\":\"KubeletReady\",\"message\":\"kubelet is posting ready status\",
            \"lastHeartbeatTime\":\"$now\",\"lastTransitionTime\":\"$now\"}]}}" >/dev/null || return 1
    [ -z "$csi" ] || "$kubectl" create -f - >/dev/null <<EOC
apiVersion: storage.k8s.io/v1
kind: CSINode
metadata: {name: $name}
spec:
  drivers:
    - {name: $csi, nodeID: $name}
EOC
}

# The heartbeat Leases of the Nodes named in $work/heartbeats (one a line),
# renewed every 2 s by tests/k8s/node_heartbeats.py as the admin; a name
# taken out (node_heartbeat_stop) stops beating, as a powered-off node's
# kubelet does.
node_heartbeats_start() { # NAME...
    printf '%s\n' "$@" >"$work/heartbeats"
    KUBE_TOKEN=$admin_token python3 tests/k8s/node_heartbeats.py "$api_url" "$api_ca" "$work/heartbeats" 2 \
        >"$work/heartbeats.log" 2>&1 &
    pids+=($!)
}
node_heartbeat_stop() { # NAME
    grep -vx "$1" "$work/heartbeats" >"$work/heartbeats.new"
    mv "$work/heartbeats.new" "$work/heartbeats"
}
