# shellcheck shell=bash
# Shared by the suites in tests/k8s/ (sourced after
# tests/k8s/tools.sh, from the repository root):
#   - ok/bad: one line per check, counted in $passed and $failed
#   - cluster_init PREFIX: a work directory ($work) and an EXIT trap that stops
#     every process in $pids, newest first (so kube-apiserver before etcd)
#   - controller_binary: the nbd-csi-controller to run (built when needed)
#   - cluster_start: etcd and kube-apiserver on 127.0.0.1 (free ports, token
#     authentication, RBAC, service-account tokens); exports KUBECONFIG (admin)
#     and sets $api_url, $api_ca, $admin_token, $kubectl, $helm.
# No kubelet, scheduler or controller-manager runs.

passed=0
failed=0
# The nbd-csi-controller binary the suites run, its path on stdout:
# $NBD_CSI_CONTROLLER when set, otherwise the workspace's debug build, built
# here (cargo's messages on stderr).
controller_binary() {
    if [ -n "${NBD_CSI_CONTROLLER:-}" ]; then
        realpath "$NBD_CSI_CONTROLLER"
        return
    fi
    cargo build --locked -q -p nbd-csi-controller --bin nbd-csi-controller >&2 || return 1
    cargo metadata --format-version 1 --no-deps --offline |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"] + "/debug/nbd-csi-controller")'
}

ok() { passed=$((passed + 1)); echo "ok [${SECONDS}s]: $*"; }
bad() { failed=$((failed + 1)); echo "FAILED [${SECONDS}s]: $*" >&2; }

pids=()
work=

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
    local etcd_port peer_port api_port apiserver_pid
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
        >"$work/kube-apiserver.log" 2>&1 &
    apiserver_pid=$!
    pids+=("$apiserver_pid")

    api_url=https://127.0.0.1:$api_port
    api_ca=$work/certs/apiserver.crt
    local deadline=$((SECONDS + 180))
    until curl -sf --cacert "$api_ca" -H "Authorization: Bearer $admin_token" "$api_url/readyz" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ] || ! kill -0 "$apiserver_pid" 2>/dev/null; then
            tail -n 30 "$work/etcd.log" "$work/kube-apiserver.log" >&2
            echo "kube-apiserver did not become ready" >&2
            exit 1
        fi
        sleep 1
    done
    export KUBECONFIG=$work/kubeconfig
    cluster_kubeconfig "$KUBECONFIG" admin "$admin_token"
    ok "etcd $ETCD_VERSION and kube-apiserver $("$kubectl" version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])') ready on 127.0.0.1:$api_port"
}

cluster_kubeconfig() { # FILE USER TOKEN: a kubeconfig for the test server with a bearer token
    "$kubectl" --kubeconfig "$1" config set-cluster test --server "$api_url" --certificate-authority "$api_ca" --embed-certs >/dev/null
    "$kubectl" --kubeconfig "$1" config set-credentials "$2" --token "$3" >/dev/null
    "$kubectl" --kubeconfig "$1" config set-context test --cluster test --user "$2" >/dev/null
    "$kubectl" --kubeconfig "$1" config use-context test >/dev/null
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
