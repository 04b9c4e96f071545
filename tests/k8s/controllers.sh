#!/usr/bin/env bash
# Kubernetes' own controllers drive cluster mode (issue 13, deliverables 3
# and 4) on a real kube-apiserver and etcd on 127.0.0.1, everything as
# processes:
#   - kube-controller-manager with the controllers that a pod's volume and
#     the controller's own pods go through: the PV binder, attach/detach,
#     PV/PVC protection, node lifecycle (heartbeat grace 16 s), taint
#     eviction, pod GC, StatefulSet, Deployment, ReplicaSet, disruption (the
#     PodDisruptionBudget) and ServiceAccount (every controller with the
#     admin's credentials, --use-service-account-credentials=false), and
#     kube-scheduler;
#   - Nodes as kubelets keep them (tests/k8s/cluster.sh kubelet_node): the
#     attach/detach annotation, Ready, heartbeat Leases renewed every 2 s;
#     storage-1..3 on 127.0.1.1..3 run the three `nbd-csi-controller agent`s,
#     worker-1 and worker-2 on 127.0.2.1..2 take the app's pod, system-1..3
#     on 127.0.3.1..3 the controller's pods: the storage nodes and the
#     workers are tainted nbd-csi.test/dedicated=storage|worker:NoSchedule,
#     which the app's pod tolerates and the controller's pods, as the chart
#     renders them, do not (no toleration; nodeSelector kubernetes.io/os);
#   - the chart's controller Deployment and PodDisruptionBudget
#     (storage.mode=cluster) applied exactly as `helm template` renders them:
#     the Deployment and ReplicaSet controllers make its two pods,
#     kube-scheduler places them on two system nodes (the chart's preferred
#     anti-affinity), the disruption controller keeps the budget's status;
#   - the kubelet's part for those pods, and only that, is a stand-in
#     (tests/k8s/controller_pods.sh), on live nodes only: a pod bound to a
#     node gets its processes, nbd-csi-controller on its own socket and
#     csi-provisioner and csi-attacher with the arguments the chart renders
#     (--leader-election and the chart's lease timing), each in a UTS
#     namespace whose hostname is the pod's name (the sidecars' leader
#     identity), and is reported Running and Ready once they are up; a pod
#     marked for deletion has its processes stopped with SIGTERM (SIGKILL
#     after its grace period) and is then deleted with grace 0.
# Every other step is Kubernetes': the test performs none of its
# controllers' steps. A StatefulSet's claim is made by the StatefulSet
# controller, provisioned by csi-provisioner through our controller and
# bound by the PV controller; its pod is placed by kube-scheduler; its
# VolumeAttachment is made by the attach/detach controller and attached by
# csi-attacher through our controller; the controller's pods are made,
# placed, evicted and replaced by Kubernetes. The test acts only as an admin
# (taints, kubectl drain and uncordon), as the power of a node (its
# heartbeats stop) and as the users (claims).
#
# The stand-in restarts no process. Were a replica's processes killed on a
# live node, a kubelet would restart them in the same pod (restartPolicy
# Always), and the restarted sidecars, under the same identity, would take
# their Leases straight back (client-go renews a Lease its own identity
# holds): scenario (a) would test a restart, not a failover. So in (a) the
# replica dies with its node: the node's heartbeats stop with its
# processes, nothing restarts them, the other replica takes the Leases when
# they expire, and Kubernetes replaces the pod once an admin declares the
# node out of service. A process that died on a live node would not be
# restarted either: the last checks report it instead of hiding a crash.
#
# Checks:
#   - that attach: the export admits the pod's node, from its address (an
#     NBD client bound to it, tests/k8s/nbd_probe.py), and refuses the other
#     worker;
#   - (c) the agent serving the attached volume restarted (SIGTERM, start)
#     while a session from the node is open: no VolumeAttachment changes,
#     the node's I/O resumes and reads back what it wrote before;
#   - (b) the pod's node stops (its heartbeats end), the node lifecycle
#     controller marks it NotReady, an admin taints it out-of-service: the
#     pod is evicted, the attach/detach controller deletes its
#     VolumeAttachment, our controller fences the node (the open session is
#     closed, VolumeFenced Events on the PVC and the Node), the pod GC and
#     the StatefulSet controller make the pod again, kube-scheduler puts it on
#     the other worker, where it is attached and reads the data; the fenced
#     node's address is refused by the export; the timeline is printed;
#   - (a) the node of the leading replica fails (its heartbeats stop, the
#     replica's controller and sidecars get SIGKILL) during a storm of 20
#     PVCs: every PVC Bound through the other replica, one NbdVolume per
#     request name, no NbdVolume without its PV, no agent record without its
#     NbdVolume; the time to all Bound is printed. The node goes NotReady and
#     so does its pod: the PodDisruptionBudget then refuses to evict the
#     last Ready replica (HTTP 429); an admin taints the node out-of-service
#     and the taint eviction, ReplicaSet and scheduler put a new pod on the
#     spare system node;
#   - `kubectl drain NODE --ignore-daemonsets --delete-emptydir-data` of the
#     node of the leading replica while a PVC is created every second: the
#     drain succeeds, evicting that one pod within the budget, whose
#     processes the stand-in stops; the ReplicaSet makes a replacement,
#     which kube-scheduler cannot put on the cordoned node (where it goes, or
#     that it stays Pending, is printed); every PVC Bound; the drain's
#     duration, its timeline and the longest gap between two PVs made (each
#     made right after a successful CreateVolume) are printed, the gap
#     within 2.2 retry periods and 5 s when the chart's sidecars give their
#     Lease back on exit (sidecars.leaderElection.releaseOnExit), else
#     within the lease duration, twice the retry period and 10 s; then
#     `kubectl uncordon`.
# Needs root (tmpfs mounts, UTS namespaces).
# NBD_CSI_CONTROLLER=path uses that controller binary instead of building one.
set -uo pipefail
cd "$(dirname "$0")/../.."
. tests/k8s/tools.sh
. tests/k8s/cluster.sh
. tests/k8s/controller_pods.sh

ensure_helm
ensure_csi_sidecars
controller_bin=$(controller_binary) || exit 1
driver=nbd.csi.dev
ns=nbd-csi
probe=(python3 tests/k8s/nbd_probe.py)

cluster_init nbd-csi-controllers
agent_disks_init nbd-csi-controllers
# The controller pods' processes stop first, while the API server still
# serves the Leases their sidecars give back.
trap 'controller_pods_cleanup; agent_disks_cleanup' EXIT
cluster_start
k() { "$kubectl" "$@"; }
since() { python3 -c 'import sys, time; print(f"{time.time() - float(sys.argv[1]):.1f}")' "$1"; } # EPOCHREALTIME: seconds since
cluster_mode_objects || exit 1
k create namespace app >/dev/null

# --- Kubernetes' controllers and scheduler
kcm_controllers=persistentvolume-binder-controller,persistentvolume-attach-detach-controller
kcm_controllers+=,persistentvolume-protection-controller,persistentvolumeclaim-protection-controller
kcm_controllers+=,node-lifecycle-controller,taint-eviction-controller,pod-garbage-collector-controller
kcm_controllers+=,statefulset-controller,deployment-controller,replicaset-controller,disruption-controller
kcm_controllers+=,serviceaccount-controller
"$TOOLS_BIN/kube-controller-manager" --kubeconfig "$KUBECONFIG" --leader-elect=false \
    --use-service-account-credentials=false --controllers="$kcm_controllers" \
    --node-monitor-period=2s --node-monitor-grace-period=16s --pvclaimbinder-sync-period=5s \
    --bind-address 127.0.0.1 --secure-port "$(free_port)" \
    --authentication-skip-lookup --authorization-always-allow-paths=/healthz >"$work/kcm.log" 2>&1 &
pids+=($!)
"$TOOLS_BIN/kube-scheduler" --kubeconfig "$KUBECONFIG" --leader-elect=false \
    --bind-address 127.0.0.1 --secure-port "$(free_port)" \
    --authentication-skip-lookup --authorization-always-allow-paths=/healthz >"$work/scheduler.log" 2>&1 &
pids+=($!)
scheduler_pid=$!

# --- Nodes: three storage nodes, two workers, three system nodes, alive by their heartbeats
acting "kubelet: Node objects with the attach/detach annotation, Ready, their CSINodes and heartbeat Leases"
agents=(storage-1 storage-2 storage-3)
declare -A agent_addr=([storage-1]=127.0.1.1 [storage-2]=127.0.1.2 [storage-3]=127.0.1.3)
declare -A agent_mib=([storage-1]=256 [storage-2]=256 [storage-3]=256)
declare -A agent_pid
workers=(worker-1 worker-2)
declare -A node_addr=([worker-1]=127.0.2.1 [worker-2]=127.0.2.2)
systems=(system-1 system-2 system-3)
declare -A system_addr=([system-1]=127.0.3.1 [system-2]=127.0.3.2 [system-3]=127.0.3.3)
for a in "${agents[@]}"; do kubelet_node "$a" "${agent_addr[$a]}" "" || bad "Node $a"; done
for w in "${workers[@]}"; do kubelet_node "$w" "${node_addr[$w]}" "$driver" nbd-csi.test/role=worker || bad "Node $w"; done
for n in "${systems[@]}"; do kubelet_node "$n" "${system_addr[$n]}" "" nbd-csi.test/role=system || bad "Node $n"; done
acting "an admin: dedicate the storage nodes and the workers (NoSchedule taints)"
for a in "${agents[@]}"; do k taint node "$a" nbd-csi.test/dedicated=storage:NoSchedule >/dev/null || bad "tainting $a"; done
for w in "${workers[@]}"; do k taint node "$w" nbd-csi.test/dedicated=worker:NoSchedule >/dev/null || bad "tainting $w"; done
node_heartbeats_start "${agents[@]}" "${workers[@]}" "${systems[@]}"
ready() { [ "$(jp node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = "$2" ]; } # NODE STATUS
beating() { [ -n "$(jp lease -n kube-node-lease "$1" -o jsonpath='{.spec.renewTime}')" ]; }
for n in "${agents[@]}" "${workers[@]}" "${systems[@]}"; do
    wait_until 30 beating "$n" || bad "no heartbeat Lease for $n: $(tail -n 3 "$work/heartbeats.log")"
done
ok "8 Nodes Ready with heartbeat Leases: ${agents[*]} (storage, tainted), ${workers[*]} (label nbd-csi.test/role=worker, tainted, CSINode for $driver), ${systems[*]}"

# --- the chart's controller Deployment and PodDisruptionBudget, their pods run by the kubelet stand-in
"$helm" template nbd-csi charts/nbd-csi --namespace "$ns" --set storage.mode=cluster \
    --show-only templates/controller.yaml --show-only templates/controller-pdb.yaml >"$work/controller.yaml"
chart_replicas=$(python3 - "$work/controller.yaml" "$work" <<'PY'
import sys

import yaml

kinds = {d["kind"]: d for d in yaml.safe_load_all(open(sys.argv[1])) if d}
assert sorted(kinds) == ["Deployment", "PodDisruptionBudget"], sorted(kinds)
deployment = kinds["Deployment"]
for container in deployment["spec"]["template"]["spec"]["containers"]:
    if container["name"] in ("csi-provisioner", "csi-attacher"):
        with open(f"{sys.argv[2]}/{container['name']}.args", "w") as f:
            f.write("".join(arg + "\n" for arg in container["args"]))
print(deployment["spec"]["replicas"], kinds["PodDisruptionBudget"]["spec"]["minAvailable"])
PY
)
check "the chart's controller Deployment (storage.mode=cluster) has 2 replicas, its PodDisruptionBudget minAvailable 1" "2 1" "$chart_replicas"
check "its csi-provisioner and csi-attacher elect a leader" "2" \
    "$(cat "$work/csi-provisioner.args" "$work/csi-attacher.args" | grep -cx -- --leader-election)"
echo "   csi-provisioner: $(paste -sd' ' "$work/csi-provisioner.args")"
echo "   csi-attacher: $(paste -sd' ' "$work/csi-attacher.args")"

# The Deployment's pods, one a line: NAME|NODE|READY|DELETING|UID.
controller_pods() {
    jp -n "$ns" pods -l "$controller_pod_selector" \
        -o jsonpath='{range .items[*]}{.metadata.name}|{.spec.nodeName}|{.status.conditions[?(@.type=="Ready")].status}|{.metadata.deletionTimestamp}|{.metadata.uid}{"\n"}{end}'
}
ready_pods() { controller_pods | awk -F'|' '$3 == "True" && $4 == "" { print $1 }'; } # Ready, not being deleted
pod_node() { jp -n "$ns" pod "$1" -o jsonpath='{.spec.nodeName}'; }
pdb_status() { jp -n "$ns" pdb nbd-csi-controller -o jsonpath='{.status.currentHealthy} {.status.disruptionsAllowed}'; }
pdb_is() { [ "$(pdb_status)" = "$1" ]; } # "HEALTHY ALLOWED"
two_ready() { [ "$(ready_pods | wc -l)" = 2 ]; }

controller_pods_start
if k apply -f "$work/controller.yaml" >"$work/apply-controller.txt" 2>&1; then
    ok "the chart's Deployment and PodDisruptionBudget applied as rendered: $(paste -sd' ' "$work/apply-controller.txt")"
else
    bad "applying the chart's Deployment and PodDisruptionBudget: $(cat "$work/apply-controller.txt")"
    exit 1
fi
if wait_until 120 two_ready; then
    mapfile -t replicas < <(ready_pods)
    placed="${replicas[0]} on $(pod_node "${replicas[0]}"), ${replicas[1]} on $(pod_node "${replicas[1]}")"
    ok "the ReplicaSet controller made 2 pods, kube-scheduler placed them, the stand-in runs them and reports them Ready: $placed"
    nodes_of_replicas=$(for r in "${replicas[@]}"; do pod_node "$r"; echo; done | sort -u | paste -sd' ')
    check "the two replicas on two distinct system nodes (anti-affinity, the other nodes tainted)" "2 system system" \
        "$(wc -w <<<"$nodes_of_replicas") $(for n in $nodes_of_replicas; do jp node "$n" -o jsonpath='{.metadata.labels.nbd-csi\.test/role}'; echo -n ' '; done | xargs)"
    for r in "${replicas[@]}"; do
        check "pod $r: its nbd-csi-controller, csi-provisioner and csi-attacher running, in UTS namespaces named after it" "3 $r $r $r" \
            "$(controller_pod_running "$r") $(for pid in $(controller_pod_pids "$r"); do nsenter --target "$pid" --uts hostname 2>/dev/null || echo '?'; done | paste -sd' ')"
    done
else
    logs kubelet.log kcm.log scheduler.log
    bad "no 2 Ready controller pods within 120 s: $(controller_pods | paste -sd' ')"
    exit 1
fi
if wait_until 60 pdb_is "2 1"; then
    ok "PodDisruptionBudget nbd-csi-controller: 2 healthy, 1 disruption allowed (the disruption controller)"
else
    bad "PodDisruptionBudget status '$(pdb_status)', want 2 healthy and 1 disruption allowed"
fi
mount_export_key || exit 1
port_base=$((30000 + RANDOM % 2000))
start_agents || exit 1
provisioner_lease=nbd-csi-dev
attacher_lease=external-attacher-leader-nbd-csi-dev
holder() { jp lease -n "$ns" "$1" -o jsonpath='{.spec.holderIdentity}'; }
held() { [ -n "$(holder "$1")" ]; }
if wait_until 60 held "$provisioner_lease" && wait_until 60 held "$attacher_lease"; then
    ok "leaders elected in $ns: csi-provisioner $(holder "$provisioner_lease"), csi-attacher $(holder "$attacher_lease")"
else
    logs "${replicas[0]}-csi-provisioner.log"
    bad "no leader elected: Leases $(k -n "$ns" get leases -o name | paste -sd' ')"
    exit 1
fi

# --- a StatefulSet's pod and claim, all through Kubernetes' controllers
pvc_yaml() { # NAME SIZE
    cat <<EOF
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1, namespace: app}
spec:
  storageClassName: nbd
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: $2}}
EOF
}
k create -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: app, namespace: app}
spec:
  replicas: 1
  serviceName: app
  selector: {matchLabels: {app: app}}
  template:
    metadata: {labels: {app: app}}
    spec:
      nodeSelector: {nbd-csi.test/role: worker}
      tolerations: [{key: nbd-csi.test/dedicated, value: worker, effect: NoSchedule}]
      automountServiceAccountToken: false
      containers:
        - name: app
          image: localhost/app:never-runs
          volumeDevices: [{name: data, devicePath: /dev/data}]
  volumeClaimTemplates:
    - metadata: {name: data}
      spec:
        storageClassName: nbd
        accessModes: [ReadWriteOnce]
        volumeMode: Block
        resources: {requests: {storage: 8Mi}}
EOF
claim=data-app-0
bound() { [ "$(jp -n app pvc "$1" -o jsonpath='{.status.phase}')" = Bound ]; }
if wait_until 120 bound "$claim"; then
    pv=$(jp -n app pvc "$claim" -o jsonpath='{.spec.volumeName}')
    check "PVC app/$claim (made by the StatefulSet controller) Bound by the PV controller to the PV csi-provisioner made" \
        "yes yes $driver" \
        "$(jp -n app pvc "$claim" -o jsonpath='{.metadata.annotations.pv\.kubernetes\.io/bind-completed} {.metadata.annotations.pv\.kubernetes\.io/bound-by-controller}') $(jp pv "$pv" -o jsonpath='{.spec.csi.driver}')"
else
    logs kcm.log "${replicas[0]}-csi-provisioner.log" "${replicas[1]}-csi-provisioner.log"
    bad "PVC app/$claim not Bound within 120 s: $(jp -n app pvc "$claim" -o jsonpath='{.status.phase}')"
    exit 1
fi
volume=$(jp pv "$pv" -o jsonpath='{.spec.csi.volumeHandle}')
storage_node=$(jp nbdvolume "$volume" -o jsonpath='{.spec.storageNode}')
scheduled() { [ -n "$(jp -n app pod app-0 -o jsonpath='{.spec.nodeName}')" ]; }
if wait_until 60 scheduled; then
    node=$(jp -n app pod app-0 -o jsonpath='{.spec.nodeName}')
    check "pod app/app-0 placed by kube-scheduler on a worker (PodScheduled)" "True worker" \
        "$(jp -n app pod app-0 -o jsonpath='{.status.conditions[?(@.type=="PodScheduled")].status}') $(jp node "$node" -o jsonpath='{.metadata.labels.nbd-csi\.test/role}')"
else
    logs scheduler.log
    bad "pod app/app-0 not scheduled within 60 s: $(jp -n app pod app-0 -o jsonpath='{.status.conditions}')"
    exit 1
fi
other=worker-1
[ "$node" = worker-1 ] && other=worker-2

va_on() { # PV NODE: the VolumeAttachment of PV to NODE
    k get volumeattachments -o jsonpath='{range .items[*]}{.metadata.name} {.spec.source.persistentVolumeName} {.spec.nodeName}{"\n"}{end}' |
        awk -v pv="$1" -v n="$2" '$2 == pv && $3 == n { print $1 }'
}
attached() { [ "$(jp volumeattachment "$1" -o jsonpath='{.status.attached}')" = true ]; }
uri_of() { jp volumeattachment "$1" -o jsonpath='{.status.attachmentMetadata.nbdUri}'; }
published_to() { jp nbdvolume "$volume" -o jsonpath='{.spec.publishedTo[*].node}'; }
va_attached_on() { # NODE: the VolumeAttachment of $pv to NODE exists and is attached; its name in $va
    va=$(va_on "$pv" "$1")
    [ -n "$va" ] && attached "$va"
}
if wait_until 90 va_attached_on "$node"; then
    ok "VolumeAttachment $va of $pv to $node made by the attach/detach controller and attached by csi-attacher through our controller"
else
    logs kcm.log "${replicas[0]}-csi-attacher.log" "${replicas[1]}-csi-attacher.log"
    bad "no attached VolumeAttachment of $pv to $node within 90 s: $(k get volumeattachments -o jsonpath='{range .items[*]}{.metadata.name} {.spec.nodeName} {.status}{"\n"}{end}')"
    exit 1
fi
check "the attach/detach controller reports it attached in Node $node's status" "kubernetes.io/csi/$driver^$volume" \
    "$(jp node "$node" -o jsonpath='{.status.volumesAttached[*].name}')"
uri=$(uri_of "$va")
if [[ $uri =~ ^nbd://${agent_addr[$storage_node]//./\\.}:[0-9]+/[0-9a-f]{64}$ ]]; then
    ok "nbdUri on $storage_node's agent (${agent_addr[$storage_node]}), the volume's storage node"
else
    bad "nbdUri '$uri', want one on $storage_node (${agent_addr[$storage_node]})"
fi
probe_is() { # DESCRIPTION STATUS NODE URI [PROBE-ARGS...]: the probe from NODE's address exits with STATUS
    local out status=0
    out=$("${probe[@]}" "${node_addr[$3]}" "$4" "${@:5}" 2>&1) || status=$?
    if [ "$status" = "$2" ]; then ok "$1: $out"; else bad "$1: exit $status, want $2: $out"; fi
}
probe_is "the export admits $node from ${node_addr[$node]} and takes its writes" 0 "$node" "$uri" --write 0x5e
probe_is "the export refuses $other (${node_addr[$other]})" 2 "$other" "$uri"

# --- (c) the agent restarted while the attached volume is in use
va_state() { jp volumeattachment "$1" -o jsonpath='{.metadata.uid} {.metadata.resourceVersion} {.spec.nodeName} {.status.attached} {.status.attachmentMetadata.nbdUri}'; }
va_before=$(va_state "$va")
published_before=$(published_to)
"${probe[@]}" "${node_addr[$node]}" "$uri" --hold 60 >"$work/held-c.txt" 2>&1 &
holder_pid=$!
wait_until 10 grep -q '^holding' "$work/held-c.txt" || bad "no session held from $node: $(cat "$work/held-c.txt")"
restart_start=$EPOCHREALTIME
kill -TERM "${agent_pid[$storage_node]}"
for _ in $(seq 300); do kill -0 "${agent_pid[$storage_node]}" 2>/dev/null || break; sleep 0.1; done
wait "${agent_pid[$storage_node]}"
check "agent $storage_node stopped by SIGTERM (exit status)" 0 "$?"
start_agent "$storage_node"
resumed() { "${probe[@]}" "${node_addr[$node]}" "$uri" --read 0x5e --write 0x6f >>"$work/resumed.txt" 2>&1; }
if wait_until 60 resumed; then
    ok "agent $storage_node restarted: I/O from $node resumes $(since "$restart_start") s after the SIGTERM, the data written before read back: $(tail -n 1 "$work/resumed.txt")"
else
    logs "agent-$storage_node.log"
    bad "I/O from $node did not resume within 60 s of the agent's restart: $(sort "$work/resumed.txt" | uniq -c | paste -sd' ')"
fi
wait "$holder_pid"
status=$?
if [ "$status" = 4 ]; then ok "the session open during the restart ended cleanly: $(tail -n 1 "$work/held-c.txt")"; else bad "the held session: exit $status: $(cat "$work/held-c.txt")"; fi
check "VolumeAttachment $va unchanged by the agent's restart (uid, resourceVersion, node, attached, nbdUri)" "$va_before" "$(va_state "$va")"
check "NbdVolume $volume still published to $node alone" "$published_before" "$(published_to)"

# --- (b) the pod's node fails and is declared out of service
# Timestamps of the VolumeAttachments' and the pod's events, as they come.
# Each watch is kubectl itself in the background, its output stamped by a
# process substitution: $! is then kubectl's pid, which the cleanup stops
# (the stamping ends at its EOF). Piped into a function instead, $! is the
# pipeline's last process, and bash's wait for it waits for the whole
# pipeline, whose kubectl never ends: the suite hung after its summary.
stamp() { while IFS= read -r line; do echo "$EPOCHREALTIME $line"; done; }
"$kubectl" get volumeattachments --watch-only --output-watch-events -o jsonpath='{.type} {.object.metadata.name} node={.object.spec.nodeName} attached={.object.status.attached} deleting={.object.metadata.deletionTimestamp}{"\n"}' \
    > >(stamp >"$work/va-events.txt") 2>&1 &
pids+=($!)
"$kubectl" -n app get pods --watch-only --output-watch-events \
    -o jsonpath='{.type} {.object.metadata.name} uid={.object.metadata.uid} node={.object.spec.nodeName} deleting={.object.metadata.deletionTimestamp}{"\n"}' \
    > >(stamp >"$work/pod-events.txt") 2>&1 &
pids+=($!)
"${probe[@]}" "${node_addr[$node]}" "$uri" --read 0x6f --hold 150 >"$work/held-b.txt" 2>&1 &
holder_pid=$!
wait_until 10 grep -q '^holding' "$work/held-b.txt" || bad "no session held from $node: $(cat "$work/held-b.txt")"
old_pod_uid=$(jp -n app pod app-0 -o jsonpath='{.metadata.uid}')

acting "kubelet of $node: stops with the node (no more heartbeats)"
node_heartbeat_stop "$node"
stopped_at=$EPOCHREALTIME
if wait_until 60 ready "$node" Unknown; then
    ok "the node lifecycle controller marked $node NotReady (Ready Unknown) $(since "$stopped_at") s after its heartbeats stopped"
else
    bad "$node not NotReady within 60 s of its last heartbeat: $(jp node "$node" -o jsonpath='{.status.conditions}')"
fi
acting "an admin: taint $node node.kubernetes.io/out-of-service=nodeshutdown:NoExecute"
taint_at=$EPOCHREALTIME
k taint node "$node" node.kubernetes.io/out-of-service=nodeshutdown:NoExecute >/dev/null
if wait_until 90 gone volumeattachment "$va"; then
    ok "VolumeAttachment $va to $node deleted (the attach/detach controller detached it, csi-attacher unpublished)"
else
    logs kcm.log
    bad "VolumeAttachment $va still there 90 s after the taint: $(jp volumeattachment "$va" -o jsonpath='{.metadata.deletionTimestamp} {.status}')"
fi
wait "$holder_pid"
status=$?
if [ "$status" = 4 ]; then ok "$node's open session closed by the fence: $(tail -n 1 "$work/held-b.txt")"; else bad "$node's held session: exit $status: $(cat "$work/held-b.txt")"; fi
event_regarding() { # KIND NAME NAMESPACE REASON: the note of such an Event
    k get events.events.k8s.io -n "$3" -o json | python3 -c '
import json, sys
kind, name, reason = sys.argv[1:]
for e in json.load(sys.stdin)["items"]:
    r = e.get("regarding") or {}
    if (r.get("kind"), r.get("name"), e.get("reason")) == (kind, name, reason):
        print(e.get("note", "")); sys.exit(0)
sys.exit(1)' "$1" "$2" "$4"
}
if wait_until 30 event_regarding PersistentVolumeClaim "$claim" app VolumeFenced; then
    ok "Event VolumeFenced on PVC app/$claim: $(event_regarding PersistentVolumeClaim "$claim" app VolumeFenced | cut -c1-160)"
else
    bad "no VolumeFenced Event on PVC app/$claim"
fi
if wait_until 30 event_regarding Node "$node" default VolumeFenced; then ok "Event VolumeFenced on Node $node"; else bad "no VolumeFenced Event on Node $node"; fi
moved() { # app-0 is a new pod, on the other worker
    [ "$(jp -n app pod app-0 -o jsonpath='{.metadata.uid} {.spec.nodeName}')" != "$old_pod_uid $node" ] &&
        [ "$(jp -n app pod app-0 -o jsonpath='{.spec.nodeName}')" = "$other" ]
}
if wait_until 120 moved; then
    ok "pod app/app-0 evicted, removed by the pod GC, made again by the StatefulSet controller and placed on $other by kube-scheduler"
else
    logs kcm.log scheduler.log
    bad "pod app/app-0 not moved to $other within 120 s: $(jp -n app pod app-0 -o jsonpath='{.metadata.uid} {.spec.nodeName} {.metadata.deletionTimestamp}')"
fi
if wait_until 90 va_attached_on "$other"; then
    ok "VolumeAttachment $va of $pv to $other made by the attach/detach controller and attached"
    uri=$(uri_of "$va")
    check "NbdVolume $volume published to $other alone" "$other" "$(published_to)"
    probe_is "the export admits $other and serves the data $node wrote" 0 "$other" "$uri" --read 0x6f
    probe_is "the export refuses the fenced $node (${node_addr[$node]})" 2 "$node" "$uri"
else
    logs kcm.log
    bad "no attached VolumeAttachment of $pv to $other within 90 s: $(k get volumeattachments -o jsonpath='{range .items[*]}{.metadata.name} {.spec.nodeName} {.status}{"\n"}{end}')"
fi
# The timeline, in seconds after the taint.
python3 - "$taint_at" "$work/va-events.txt" "$work/pod-events.txt" "$work/held-b.txt" "$node" "$other" "$old_pod_uid" <<'PY'
import re, sys

taint, va_file, pod_file, held_file, node, other, old_uid = sys.argv[1:]


def events(path):
    """(time, type, name, {key: value}) of each stamped watch event."""
    for line in open(path):
        words = line.split()
        if len(words) >= 3:
            yield float(words[0]), words[1], words[2], dict(w.split("=", 1) for w in words[3:] if "=" in w)


marks = []
for t, kind, _, f in events(pod_file):
    if f.get("uid") == old_uid and kind == "MODIFIED" and f.get("deleting"):
        marks.append((t, f"pod app-0 on {node} evicted (taint eviction: deletionTimestamp set)"))
    elif f.get("uid") == old_uid and kind == "DELETED":
        marks.append((t, f"pod app-0 on {node} removed (pod GC)"))
    elif f.get("uid") != old_uid and kind == "ADDED":
        marks.append((t, "new pod app-0 made (StatefulSet controller)"))
    elif f.get("uid") != old_uid and f.get("node") == other:
        marks.append((t, f"new pod app-0 placed on {other} (kube-scheduler)"))
for t, kind, _, f in events(va_file):
    if f.get("node") == node and f.get("deleting") and kind == "MODIFIED":
        marks.append((t, f"VolumeAttachment to {node} marked for deletion (attach/detach controller)"))
    elif f.get("node") == node and kind == "DELETED":
        marks.append((t, f"VolumeAttachment to {node} deleted (csi-attacher, after ControllerUnpublishVolume)"))
    elif f.get("node") == other and kind == "ADDED":
        marks.append((t, f"VolumeAttachment to {other} made (attach/detach controller)"))
    elif f.get("node") == other and f.get("attached") == "true":
        marks.append((t, f"VolumeAttachment to {other} attached (csi-attacher, after ControllerPublishVolume)"))
closed = re.search(r"closed by the server at ([0-9.]+)", open(held_file).read())
if closed:
    marks.append((float(closed.group(1)), f"{node}'s open NBD session closed by the agent"))
seen = set()
print("   fencing timeline, seconds after the out-of-service taint:")
for t, what in sorted(marks):
    if what not in seen:
        seen.add(what)
        print(f"   {t - float(taint):7.2f}  {what}")
PY

# --- (a) the leading replica's node fails during a storm of 20 PVCs
phases() { local p; for p in "$@"; do jp -n app pvc "$p" -o jsonpath='{.status.phase}'; echo; done; }
all_bound() { [ -z "$(phases "$@" | grep -vx Bound)" ]; }
other_replica() { ready_pods | grep -vx "$1" | head -n 1; } # POD: the other Ready replica
leader=$(holder "$provisioner_lease")
[ -n "$(controller_pod_pids "$leader")" ] || { bad "the provisioner's leader '$leader' is none of the pods run: $(ready_pods | paste -sd' ')"; exit 1; }
leader_node=$(pod_node "$leader")
survivor=$(other_replica "$leader")
storm=()
for i in $(seq -w 1 20); do storm+=("storm-$i"); done
# Counted with curl, cheaper than kubectl, to kill as soon as the first is made.
volume_count() {
    curl -sf --cacert "$api_ca" -H "Authorization: Bearer $admin_token" "$api_url/apis/nbd.csi.dev/v1alpha1/nbdvolumes" |
        grep -o '"requestName":' | wc -l
}
before=$(volume_count)
storm_start=$EPOCHREALTIME
for p in "${storm[@]}"; do pvc_yaml "$p" 8Mi; done | k create -f - >/dev/null
for _ in $(seq 1200); do
    [ "$(volume_count)" -gt "$before" ] && break
    sleep 0.05
done
acting "the power of $leader_node: it fails, its kubelet (no more heartbeats) and the containers of pod $leader (SIGKILL) with it"
node_heartbeat_stop "$leader_node"
killed_at=$EPOCHREALTIME
controller_pod_signal "$leader" KILL 0
made=$(($(volume_count) - before))
ok "$leader_node failed with the leading replica $leader (controller, csi-provisioner, csi-attacher killed) with $made of 20 storm volumes made, $(phases "${storm[@]}" | grep -cx Bound) PVCs Bound"
if wait_until 180 all_bound "${storm[@]}"; then
    ok "all 20 storm PVCs Bound $(since "$storm_start") s after they were created, through $survivor (provisioner leader now $(holder "$provisioner_lease"))"
else
    logs "$survivor-csi-provisioner.log" "$survivor-controller.log"
    bad "storm PVCs not all Bound within 180 s: $(phases "${storm[@]}" | sort | uniq -c | paste -sd' ')"
fi
k get pv -o jsonpath='{range .items[*]}{.metadata.name} {.spec.csi.volumeHandle}{"\n"}{end}' | sort >"$work/pvs.txt"
k get nbdvolumes -o jsonpath='{range .items[*]}{.spec.requestName} {.metadata.name}{"\n"}{end}' | sort >"$work/objects.txt"
check "no duplicate volume: one NbdVolume per request name ($(wc -l <"$work/objects.txt") NbdVolumes)" "" \
    "$(cut -d' ' -f1 "$work/objects.txt" | uniq -d | paste -sd' ')"
check "no orphan: every NbdVolume has its PV and every PV its NbdVolume ($(wc -l <"$work/pvs.txt") PVs)" "" \
    "$(diff "$work/pvs.txt" "$work/objects.txt" | grep '^[<>]' | paste -sd' ')"
check "no orphan: every agent record has its NbdVolume on that storage node and every NbdVolume its record" "" "$(records_vs_objects)"
pod_ready() { [ "$(jp -n "$ns" pod "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = "$2" ]; } # POD STATUS
if wait_until 60 ready "$leader_node" Unknown && wait_until 30 pod_ready "$leader" False; then
    ok "the node lifecycle controller marked $leader_node NotReady and its pod $leader not Ready, $(since "$killed_at") s after it failed"
else
    bad "$leader_node or its pod $leader still Ready: $(jp node "$leader_node" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}') $(jp -n "$ns" pod "$leader" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')"
fi
# The budget keeps the last Ready replica: an eviction of it is refused.
evict() { # POD: the HTTP status of its eviction
    curl -s -o "$work/eviction.json" -w '%{http_code}' --cacert "$api_ca" -H "Authorization: Bearer $admin_token" \
        -H 'Content-Type: application/json' -X POST "$api_url/api/v1/namespaces/$ns/pods/$1/eviction" \
        --data "{\"apiVersion\":\"policy/v1\",\"kind\":\"Eviction\",\"metadata\":{\"name\":\"$1\",\"namespace\":\"$ns\"}}"
}
if wait_until 60 pdb_is "1 0"; then
    check "PodDisruptionBudget at 1 healthy, 0 allowed: the eviction of the last Ready replica $survivor refused (HTTP status)" 429 "$(evict "$survivor")"
else
    bad "PodDisruptionBudget status '$(pdb_status)' with $leader not Ready, want 1 healthy and 0 allowed"
fi
acting "an admin: taint $leader_node node.kubernetes.io/out-of-service=nodeshutdown:NoExecute"
k taint node "$leader_node" node.kubernetes.io/out-of-service=nodeshutdown:NoExecute >/dev/null
taint_at=$EPOCHREALTIME
if wait_until 120 two_ready; then
    replacement=$(other_replica "$survivor")
    ok "pod $leader evicted (taint eviction), the ReplicaSet made $replacement, kube-scheduler placed it on $(pod_node "$replacement"), the stand-in runs it: Ready $(since "$taint_at") s after the taint"
    check "$replacement on the spare system node, neither $leader_node nor $survivor's" "yes" \
        "$([ "$(pod_node "$replacement")" != "$leader_node" ] && [ "$(pod_node "$replacement")" != "$(pod_node "$survivor")" ] && echo yes)"
else
    logs kubelet.log kcm.log scheduler.log
    bad "no second Ready controller pod within 120 s of the taint: $(controller_pods | paste -sd' ')"
fi
if wait_until 60 pdb_is "2 1"; then ok "PodDisruptionBudget back at 2 healthy, 1 allowed"; else bad "PodDisruptionBudget status '$(pdb_status)', want 2 healthy and 1 allowed"; fi

# --- kubectl drain of the leading replica's node while a PVC is created every second
leader=$(holder "$provisioner_lease")
[ -n "$(controller_pod_pids "$leader")" ] || { bad "the provisioner's leader '$leader' is none of the pods run: $(ready_pods | paste -sd' ')"; exit 1; }
drained=$(pod_node "$leader")
remaining=$(other_replica "$leader")
remaining_uid=$(jp -n "$ns" pod "$remaining" -o jsonpath='{.metadata.uid}')
pods_before=$(controller_pods | cut -d'|' -f1 | sort)
"$kubectl" get pv --watch-only -o name > >(stamp >"$work/pv-events.txt") 2>&1 &
pids+=($!)
drain=()
for i in $(seq -w 1 24); do drain+=("drain-$i"); done
for p in "${drain[@]}"; do
    pvc_yaml "$p" 8Mi | k create -f - >/dev/null
    if [ "$p" = drain-06 ]; then
        drain_at=$EPOCHREALTIME
        (
            "$kubectl" drain "$drained" --ignore-daemonsets --delete-emptydir-data --timeout=120s >"$work/drain.txt" 2>&1
            echo "$? $EPOCHREALTIME" >"$work/drain-exit.txt"
        ) &
        drainer=$!
    fi
    sleep 1
done
wait "$drainer"
read -r drain_status drain_end <"$work/drain-exit.txt"
drain_secs=$(python3 -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.1f}")' "$drain_at" "$drain_end")
sed 's/^/   kubectl drain: /' "$work/drain.txt"
if [ "$drain_status" = 0 ]; then
    ok "kubectl drain $drained succeeded in $drain_secs s, started after 6 of 24 PVCs created one a second"
else
    logs kubelet.log
    bad "kubectl drain $drained exited $drain_status after $drain_secs s"
fi
check "the drain evicted the leading replica's pod alone" "$leader" \
    "$(sed -n 's|^evicting pod '"$ns"'/||p' "$work/drain.txt" | sort -u | paste -sd' ')"
check "the stand-in stopped its processes and deleted it" "0 gone" \
    "$(controller_pod_running "$leader") $(gone -n "$ns" pod "$leader" && echo gone)"
check "the other replica $remaining untouched (same uid, not being deleted, Ready)" "$remaining_uid||True" \
    "$(jp -n "$ns" pod "$remaining" -o jsonpath='{.metadata.uid}|{.metadata.deletionTimestamp}|{.status.conditions[?(@.type=="Ready")].status}')"
check "$drained cordoned" true "$(jp node "$drained" -o jsonpath='{.spec.unschedulable}')"
new_pod() { comm -13 <(echo "$pods_before") <(controller_pods | cut -d'|' -f1 | sort) | head -n 1; }
replacement=$(new_pod)
scheduled_pod() { [ -n "$(pod_node "$1")" ]; }
if [ -n "$replacement" ] && wait_until 60 scheduled_pod "$replacement"; then
    where=$(pod_node "$replacement")
    check "the ReplicaSet's replacement $replacement placed off the cordoned $drained" yes "$([ "$where" != "$drained" ] && echo yes)"
    if wait_until 60 pod_ready "$replacement" True; then
        if [ "$where" = "$(pod_node "$remaining")" ]; then
            placement="on $where with the other replica $remaining: the anti-affinity is preferred only and no other system node takes pods (cordoned or out of service)"
        else
            placement="on $where, apart from the other replica $remaining (on $(pod_node "$remaining"))"
        fi
        ok "the replacement $replacement placed by kube-scheduler $placement; run and Ready"
    else
        bad "replacement $replacement on $where not Ready within 60 s"
    fi
else
    echo "   replacement ${replacement:-(none)} stays Pending: $(jp -n "$ns" pod "$replacement" -o jsonpath='{.status.conditions[?(@.type=="PodScheduled")].message}')"
    check "the ReplicaSet made a replacement pod" yes "$([ -n "$replacement" ] && echo yes)"
fi
# The drain as the kubelet stand-in and the watches saw it, in seconds after it began.
python3 - "$drain_at" "$work/kubelet.log" "$leader" "${replacement:-none}" <<'PY'
import sys
start, log, leader, replacement = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
print("   drain timeline, seconds after kubectl drain began:")
for line in open(log):
    t, _, what = line.partition(" ")
    try:
        t = float(t)
    except ValueError:
        continue
    if t >= start and (what.startswith(leader) or what.startswith(replacement)):
        print(f"   {t - start:7.2f}  {what.rstrip()}")
PY
echo "   drain: $drain_secs s"
if wait_until 120 all_bound "${drain[@]}"; then
    ok "all 24 PVCs of the drain Bound (provisioner leader now $(holder "$provisioner_lease"))"
else
    logs "$remaining-csi-provisioner.log"
    bad "drain PVCs not all Bound within 120 s: $(phases "${drain[@]}" | sort | uniq -c | paste -sd' ')"
fi
drain_pvs=$(for p in "${drain[@]}"; do jp -n app pvc "$p" -o jsonpath='{.spec.volumeName}'; echo; done | paste -sd' ')
gap=$(python3 - "$drain_at" "$work/pv-events.txt" "$drain_pvs" <<'PY'
import sys
drain, events, names = float(sys.argv[1]), sys.argv[2], set(sys.argv[3].split())
first = {}
for line in open(events):
    t, name = line.split()[:2]
    name = name.removeprefix("persistentvolume/")
    if name in names and name not in first:
        first[name] = float(t)
times = sorted(first.values())
gaps = [(b - a, a) for a, b in zip(times, times[1:])]
longest, at = max(gaps)
# The gaps that end after the drain began: the drain's own.
during = max(g for g, a in gaps if a + g >= drain)
print(f"{longest:.1f} {at - drain:.1f} {len(times)} {during:.1f}")
PY
)
read -r longest longest_at made during <<<"$gap"
echo "   drain: longest gap between two PVs made ${longest} s (it began ${longest_at} s after kubectl drain began), longest ending after the drain began ${during} s; ${made} of 24 PVs seen"
lease_arg() { sed -n "s/^--leader-election-$1=\([0-9]*\)s$/\1/p" "$work/csi-provisioner.args"; }
if grep -qx -- --feature-gates=ReleaseLeaderElectionOnExit=true "$work/csi-provisioner.args"; then
    # The stopped leader gives its Lease back: a standby takes it at its
    # next try (the retry period jittered up to 2.2 times it), plus 5 s.
    # Without the Lease given back the gaps were 21.6 to 26.0 s.
    lease_limit=$(($(lease_arg retry-period) * 22 / 10 + 5)) lease_why="2.2 retry periods + 5 s, the Lease given back"
else
    # A standby tries the expired Lease every retry period, jittered up to
    # 2.2 times it: twice it, and 10 s for the rest.
    lease_limit=$(($(lease_arg lease-duration) + 2 * $(lease_arg retry-period) + 10))
    lease_why="the lease duration + twice the retry period + 10 s"
fi
if awk -v g="$longest" -v l="$lease_limit" 'BEGIN { exit !(g <= l) }'; then
    ok "provisioning went on through the drain: longest gap ${longest} s (at most $lease_why = $lease_limit s)"
else
    bad "the drain stalled provisioning: longest gap ${longest} s, more than $lease_limit s"
fi
k get nbdvolumes -o jsonpath='{range .items[*]}{.spec.requestName}{"\n"}{end}' | sort | uniq -d >"$work/dups.txt"
check "no duplicate volume after the drain" "" "$(paste -sd' ' "$work/dups.txt")"
check "every agent record has its NbdVolume and every NbdVolume its record after the drain" "" "$(records_vs_objects)"
acting "an admin: kubectl uncordon $drained"
k uncordon "$drained" >/dev/null
check "$drained schedulable again" "" "$(jp node "$drained" -o jsonpath='{.spec.unschedulable}')"

# --- every process that should run still does
for a in "${agents[@]}"; do
    if kill -0 "${agent_pid[$a]}" 2>/dev/null; then ok "agent $a still running"; else bad "agent $a exited: $(tail -n 5 "$work/agent-$a.log")"; fi
done
for r in $(ready_pods); do
    check "replica $r's controller, csi-provisioner and csi-attacher still running" 3 "$(controller_pod_running "$r")"
done
check "the Deployment: 2 replicas ready" 2 "$(jp -n "$ns" deployment nbd-csi-controller -o jsonpath='{.status.readyReplicas}')"
if grep -q 'panicked at' "$work"/agent-*.log "$work"/*-controller.log; then
    bad "a panic in a log: $(grep -h 'panicked at' "$work"/agent-*.log "$work"/*-controller.log | head -3)"
else
    ok "no panic in the agents' and the controllers' logs"
fi
echo "controllers: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
