#!/bin/bash
# Inside the cluster VM (run by boot.sh): a one-node Kubernetes cluster as
# kubeadm would lay it out, but as plain processes: etcd, kube-apiserver,
# kube-controller-manager (every default controller), kube-scheduler,
# containerd, the kubelet and kube-proxy; the run's images imported into
# containerd; then scenarios.sh, which installs the chart with helm and
# checks what a user sees. Prints RESULT lines and one SUMMARY line.
set -u
. /payload/run.env   # VERSION, SCENARIOS, tokens
logs=/tmp/logs
mkdir -p "$logs" /etc/kubernetes /var/lib/etcd
pki=/etc/kubernetes/pki
mkdir -p "$pki"
cp /payload/secrets/* "$pki/"
node_ip=10.0.2.15
api=https://$node_ip:6443
t0=$(cut -d' ' -f1 /proc/uptime)
uptime_s() { cut -d' ' -f1 /proc/uptime; }
say() { echo "cluster: [$(uptime_s)s] $*"; }

pids=()
start() { # NAME COMMAND...: runs in the background, logs to $logs/NAME.log
    local name=$1; shift
    "$@" >"$logs/$name.log" 2>&1 &
    pids+=($!)
}
dump_logs() {
    for f in "$logs"/*.log; do
        echo "----- $f (last 40 lines)"
        tail -n 40 "$f"
    done
}
# wait_for SECONDS WHAT COMMAND...: polls every second.
wait_for() {
    local deadline=$(( ${SECONDS} + $1 )) what=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            say "$what: not within the time allowed"
            return 1
        fi
        sleep 1
    done
    say "$what"
}
fatal() {
    echo "RESULT cluster-start FAIL $*"
    dump_logs
    echo "SUMMARY passed=0 failed=1"
    exit 1
}

# containerd first: the image import runs while the control plane starts.
start containerd containerd
wait_for 60 "containerd up" ctr version || fatal "containerd"
(
    for f in /payload/images/*.tar; do
        ctr -n k8s.io images import "$f" >/dev/null || echo "import $f failed"
    done
    say "images imported: $(ctr -n k8s.io images ls -q | grep -c localhost/)"
) >"$logs/import.log" 2>&1 &
import_pid=$!

start etcd etcd --name nbd-node --data-dir /var/lib/etcd \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster nbd-node=http://127.0.0.1:2380 --listen-metrics-urls "" --log-level warn
start kube-apiserver kube-apiserver \
    --etcd-servers http://127.0.0.1:2379 \
    --advertise-address "$node_ip" --bind-address 0.0.0.0 --secure-port 6443 \
    --cert-dir "$pki" \
    --token-auth-file "$pki/tokens.csv" \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --allow-privileged=true \
    --service-cluster-ip-range 10.96.0.0/24 \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$pki/sa.pub" \
    --service-account-signing-key-file "$pki/sa.key" \
    --enable-priority-and-fairness=false --profiling=false
api_ready() { curl -sf -m 5 --cacert "$pki/apiserver.crt" -H "Authorization: Bearer $ADMIN_TOKEN" "$api/readyz"; }
wait_for 300 "kube-apiserver ready" api_ready || fatal "kube-apiserver"

kubeconfig() { # FILE USER TOKEN
    kubectl --kubeconfig "$1" config set-cluster local --server "$api" --certificate-authority "$pki/apiserver.crt" --embed-certs >/dev/null
    kubectl --kubeconfig "$1" config set-credentials "$2" --token "$3" >/dev/null
    kubectl --kubeconfig "$1" config set-context local --cluster local --user "$2" >/dev/null
    kubectl --kubeconfig "$1" config use-context local >/dev/null
}
kubeconfig /etc/kubernetes/admin.conf admin "$ADMIN_TOKEN"
kubeconfig /etc/kubernetes/controller-manager.conf system:kube-controller-manager "$KCM_TOKEN"
kubeconfig /etc/kubernetes/scheduler.conf system:kube-scheduler "$SCHEDULER_TOKEN"
kubeconfig /etc/kubernetes/kubelet.conf system:node:nbd-node "$KUBELET_TOKEN"
kubeconfig /etc/kubernetes/kube-proxy.conf system:kube-proxy "$PROXY_TOKEN"
export KUBECONFIG=/etc/kubernetes/admin.conf

start kube-controller-manager kube-controller-manager \
    --kubeconfig /etc/kubernetes/controller-manager.conf \
    --authentication-kubeconfig /etc/kubernetes/controller-manager.conf \
    --authorization-kubeconfig /etc/kubernetes/controller-manager.conf \
    --use-service-account-credentials \
    --service-account-private-key-file "$pki/sa.key" \
    --root-ca-file "$pki/apiserver.crt" \
    --leader-elect=false --profiling=false
start kube-scheduler kube-scheduler \
    --kubeconfig /etc/kubernetes/scheduler.conf \
    --authentication-kubeconfig /etc/kubernetes/scheduler.conf \
    --authorization-kubeconfig /etc/kubernetes/scheduler.conf \
    --leader-elect=false --profiling=false

cat >/etc/kubernetes/kubelet.yaml <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
failSwapOn: false
authentication:
  anonymous: { enabled: true }
  webhook: { enabled: false }
authorization: { mode: AlwaysAllow }
resolvConf: /etc/resolv.conf
serializeImagePulls: false
evictionHard: { memory.available: "50Mi", nodefs.available: "2%", imagefs.available: "2%" }
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
YAML
wait "$import_pid"
cat "$logs/import.log"
start kubelet kubelet --kubeconfig /etc/kubernetes/kubelet.conf --config /etc/kubernetes/kubelet.yaml \
    --node-ip "$node_ip" --hostname-override nbd-node
start kube-proxy kube-proxy --kubeconfig /etc/kubernetes/kube-proxy.conf \
    --hostname-override nbd-node --cluster-cidr 10.244.0.0/24
node_ready() { [ "$(kubectl get node nbd-node -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]; }
wait_for 300 "node Ready" node_ready || fatal "node not Ready"
# Pods reach the API server through the kubernetes Service, which only
# kube-proxy's rules make reachable (a SYN sent before they exist goes out
# dummy0 and is lost: hence the bounded curl).
service_ready() { curl -sf -m 5 --cacert "$pki/apiserver.crt" -H "Authorization: Bearer $ADMIN_TOKEN" https://10.96.0.1/readyz; }
service_diagnostics() {
    ip route
    iptables-save 2>&1 | grep -E "^-A (OUTPUT|PREROUTING)|10\.96\.0\.1|^#" | head -20
    kubectl get svc,endpointslices -A -o wide 2>&1
    curl -sk -m 5 -v https://10.96.0.1/readyz 2>&1 | tail -5
}
if ! wait_for 120 "kubernetes Service (10.96.0.1) answers" service_ready; then
    service_diagnostics
    fatal "the kubernetes Service is not reachable"
fi
sa_ready() { kubectl -n default get serviceaccount default; }
wait_for 120 "default ServiceAccount" sa_ready || fatal "no default ServiceAccount"
echo "RESULT cluster-start ok $(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { printf "%.0fs", b - a }')"

bash /payload/guest/scenarios.sh
status=$?
[ "$status" -eq 0 ] || dump_logs
exit "$status"
