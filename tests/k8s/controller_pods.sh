# shellcheck shell=bash
# The kubelet's part for the pods of the chart's controller Deployment
# (tests/k8s/controllers.sh; sourced after tests/k8s/cluster.sh). No kubelet
# runs in the suites: this stand-in does exactly two of a kubelet's duties,
# for those pods only, and only on nodes that are alive (named in
# $work/heartbeats, whose heartbeat Leases node_heartbeats_start renews):
#   - a pod bound to the node gets its processes: nbd-csi-controller on the
#     pod's own CSI socket, csi-provisioner and csi-attacher with the
#     arguments the chart renders ($work/SIDECAR.args, $(ADDRESS) that
#     socket), each in a UTS namespace whose hostname is the pod's name (the
#     sidecars' leader identity, the controller's Event reporter); once they
#     are up (the socket served, both sidecars electing) the pod's status
#     says Running and Ready, which is what the ReplicaSet's availability and
#     the PodDisruptionBudget count;
#   - a pod marked for deletion (a deletionTimestamp: an eviction, a delete)
#     gets SIGTERM to its processes, waits for them up to the pod's grace
#     period (SIGKILL after), and its object is then deleted with grace 0
#     and its uid as precondition, as a kubelet finishes a pod; a pod removed
#     from the API while it runs (a forced delete) has its processes stopped
#     the same way.
# Nothing else: no probes, no pods of other workloads, and no restart of a
# process that dies. A node whose heartbeats stopped is dead with its
# kubelet and its containers: nothing is done for its pods (the pod GC
# removes them). Every other step — the ReplicaSet and its pods, placing them
# (kube-scheduler), evicting them (kubectl drain, the taint eviction
# controller) and deciding whether an eviction may happen (the
# PodDisruptionBudget) — is Kubernetes'. The stand-in logs what it does,
# each line stamped with the Unix time, to $work/kubelet.log.
#
# The suite sets $ns, $controller_bin and $driver, and renders the sidecars'
# arguments into $work/csi-provisioner.args and $work/csi-attacher.args.
# Each pod's files are in $work/pods/POD: pids (its processes, one a line),
# up or failed (the start's outcome), stopping, stopped.

controller_pod_selector=app.kubernetes.io/instance=nbd-csi,app.kubernetes.io/component=controller
controller_pod_sidecars=(csi-provisioner csi-attacher)

# The stand-in, in the background: the controller pods' watch (kubectl
# itself, so the cleanup stops it) into a FIFO the stand-in reads; the
# stand-in ends at that watch's end.
controller_pods_start() {
    mkdir -p "$work/pods"
    rm -f "$work/pods.watch"
    mkfifo "$work/pods.watch"
    "$kubectl" -n "$ns" get pods -l "$controller_pod_selector" --watch --output-watch-events \
        -o jsonpath='{.type} {.object.metadata.name} uid={.object.metadata.uid} node={.object.spec.nodeName} deleting={.object.metadata.deletionTimestamp} grace={.object.metadata.deletionGracePeriodSeconds}{"\n"}' \
        >"$work/pods.watch" 2>>"$work/kubelet.log" &
    pids+=($!)
    controller_pods_kubelet <"$work/pods.watch" >>"$work/kubelet.log" 2>&1 &
    pids+=($!)
}

controller_pods_log() { echo "$EPOCHREALTIME $*"; }
controller_pods_node_alive() { [ -n "$1" ] && grep -qx -- "$1" "$work/heartbeats" 2>/dev/null; }

# The stand-in's loop, one line of the watch at a time. Starting and
# stopping a pod take seconds, so each runs in the background and the next
# event is handled meanwhile; a pod's files say what is under way.
controller_pods_kubelet() {
    local type name fields field uid node deleting grace dir
    while read -r type name fields; do
        uid="" node="" deleting="" grace=30
        for field in $fields; do
            case $field in
                uid=*) uid=${field#uid=} ;;
                node=*) node=${field#node=} ;;
                deleting=*) deleting=${field#deleting=} ;;
                grace=?*) grace=${field#grace=} ;;
            esac
        done
        [ -n "$node" ] || continue # not scheduled yet: not this kubelet's
        dir=$work/pods/$name
        if ! controller_pods_node_alive "$node"; then
            [ -e "$dir/dead-node" ] || controller_pods_log "$name on $node ($type): the node is down, its kubelet with it: nothing done"
            mkdir -p "$dir" && touch "$dir/dead-node"
            continue
        fi
        mkdir -p "$dir"
        if [ "$type" = DELETED ] || [ -n "$deleting" ]; then
            [ -e "$dir/stopping" ] && continue
            touch "$dir/stopping"
            if [ -n "$deleting" ]; then
                controller_pods_log "$name on $node: marked for deletion at $deleting (grace $grace s)"
            else
                controller_pods_log "$name on $node: removed from the API"
            fi
            controller_pod_terminate "$name" "$uid" "$grace" "$([ "$type" = DELETED ] || echo delete)" </dev/null &
        elif [ ! -e "$dir/starting" ]; then
            touch "$dir/starting"
            controller_pods_log "$name bound to $node: starting its processes"
            controller_pod_run "$name" "$node" </dev/null &
        fi
    done
    controller_pods_log "the pods' watch ended"
}

# controller_pod_run POD NODE: the pod's processes, then its status Running
# and Ready; stays until they have all exited (it reaps them).
controller_pod_run() {
    local pod=$1 node=$2 dir=$work/pods/$1 sidecar args socket
    socket=$dir/csi.sock
    if start_controller "$pod-controller.log" "$pod"; then
        echo "$controller_pid" >>"$dir/pids"
        for sidecar in "${controller_pod_sidecars[@]}"; do
            mapfile -t args < <(sed "s|\$(ADDRESS)|$socket|" "$work/$sidecar.args")
            POD_NAMESPACE=$ns unshare --uts sh -c 'hostname "$0" && exec "$@"' "$pod" \
                "$TOOLS_BIN/$sidecar" --kubeconfig "$work/controller.kubeconfig" "${args[@]}" \
                >"$work/$pod-$sidecar.log" 2>&1 &
            echo "$!" >>"$dir/pids"
        done
        for sidecar in "${controller_pod_sidecars[@]}"; do
            wait_until 30 grep -qi "attempting to acquire leader lease" "$work/$pod-$sidecar.log" ||
                { controller_pods_log "$pod: $sidecar is not electing: $(tail -n 3 "$work/$pod-$sidecar.log")"; touch "$dir/failed"; }
        done
    else
        [ -n "${controller_pid:-}" ] && echo "$controller_pid" >>"$dir/pids"
        controller_pods_log "$pod: nbd-csi-controller did not serve its socket: $(tail -n 3 "$work/$pod-controller.log")"
        touch "$dir/failed"
    fi
    if [ ! -e "$dir/failed" ]; then
        touch "$dir/up"
        if controller_pod_report_ready "$pod" "$node"; then
            controller_pods_log "$pod on $node: processes $(paste -sd' ' "$dir/pids") up, status Running and Ready"
        else
            controller_pods_log "$pod on $node: processes up, but its status could not be written"
        fi
    fi
    wait
    controller_pods_log "$pod: every process has exited"
}

controller_pods_api() { # METHOD PATH CONTENT-TYPE BODY: the API server as the admin, the reply on stdout
    curl -sfS --max-time 10 --cacert "$api_ca" -H "Authorization: Bearer $admin_token" \
        -X "$1" -H "Content-Type: $3" --data "$4" "$api_url$2"
}

# The status a kubelet writes once a pod's containers run: phase Running,
# the node's address, the conditions, and a running state for each
# container that has a process here (the liveness-probe container has none:
# nothing probes here).
controller_pod_report_ready() { # POD NODE
    local patch
    patch=$("$kubectl" -n "$ns" get pod "$1" -o json | python3 -c '
import datetime, json, sys

pod, node_ip, run = json.load(sys.stdin), sys.argv[1], sys.argv[2].split()
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
conditions = ["PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready"]
print(json.dumps({"status": {
    "phase": "Running",
    "hostIP": node_ip,
    "hostIPs": [{"ip": node_ip}],
    "startTime": now,
    "conditions": [{"type": c, "status": "True", "lastTransitionTime": now} for c in conditions],
    "containerStatuses": [
        {"name": c["name"], "image": c["image"], "imageID": "", "ready": True, "started": True,
         "restartCount": 0, "state": {"running": {"startedAt": now}}}
        for c in pod["spec"]["containers"] if c["name"] in run
    ],
}}))' "$("$kubectl" get node "$2" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')" \
        "nbd-csi-controller ${controller_pod_sidecars[*]}") || return 1
    controller_pods_api PATCH "/api/v1/namespaces/$ns/pods/$1/status" application/strategic-merge-patch+json "$patch" >/dev/null
}

# controller_pod_terminate POD UID GRACE [delete]: SIGTERM to the pod's
# processes (once its start is over), SIGKILL to those left after GRACE
# seconds; then, with "delete", the pod object deleted with grace 0.
controller_pod_terminate() {
    local pod=$1 uid=$2 grace=$3 dir=$work/pods/$1 started stopped_in
    if [ -e "$dir/starting" ]; then
        wait_until 120 test -e "$dir/up" -o -e "$dir/failed" ||
            controller_pods_log "$pod: its start still not over after 120 s, stopping what runs"
    fi
    started=$EPOCHREALTIME
    controller_pod_signal "$pod" TERM "$grace"
    stopped_in=$(python3 -c 'import sys, time; print(f"{time.time() - float(sys.argv[1]):.1f}")' "$started")
    touch "$dir/stopped"
    controller_pods_log "$pod: processes stopped $stopped_in s after SIGTERM"
    [ "${4:-}" = delete ] || return 0
    if controller_pods_api DELETE "/api/v1/namespaces/$ns/pods/$pod" application/json \
        "{\"apiVersion\":\"v1\",\"kind\":\"DeleteOptions\",\"gracePeriodSeconds\":0,\"preconditions\":{\"uid\":\"$uid\"}}" >/dev/null; then
        controller_pods_log "$pod: deleted with grace 0"
    else
        controller_pods_log "$pod: deleting it with grace 0 failed"
    fi
}

controller_pod_pids() { cat "$work/pods/$1/pids" 2>/dev/null; } # POD

controller_pod_running() { # POD: how many of its processes run
    local pid n=0
    for pid in $(controller_pod_pids "$1"); do kill -0 "$pid" 2>/dev/null && n=$((n + 1)); done
    echo "$n"
}

# controller_pod_signal POD SIGNAL SECONDS: SIGNAL to every process of POD
# at once, as the kubelet stops a pod's containers; SIGKILL to those still
# running after SECONDS. Their parent (controller_pod_run) reaps them.
controller_pod_signal() {
    local pid deadline
    for pid in $(controller_pod_pids "$1"); do kill -"$2" "$pid" 2>/dev/null; done
    deadline=$((SECONDS + $3))
    until controller_pod_stopped "$1" || [ $SECONDS -ge "$deadline" ]; do sleep 0.1; done
    for pid in $(controller_pod_pids "$1"); do kill -KILL "$pid" 2>/dev/null; done
    wait_until 10 controller_pod_stopped "$1"
}
controller_pod_stopped() { [ "$(controller_pod_running "$1")" = 0 ]; } # POD

# At the suite's exit, before cluster_cleanup stops the API server: every
# pod's processes stopped (SIGTERM, SIGKILL after 15 s), so the sidecars
# can still give their Leases back and their parents reap them.
controller_pods_cleanup() {
    local dir stoppers=()
    [ -d "$work/pods" ] || return 0
    for dir in "$work"/pods/*/; do
        [ -e "$dir/pids" ] || continue
        controller_pod_signal "$(basename "$dir")" TERM 15 &
        stoppers+=($!)
    done
    [ ${#stoppers[@]} -eq 0 ] || wait "${stoppers[@]}"
}
