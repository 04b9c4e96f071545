#!/bin/bash
# Inside the cluster VM, after cluster.sh: `helm install nbd-csi` as a user
# runs it (only the image repositories pointed at the locally built images,
# and the controller's storage on a hostPath with the controller on the
# node's network, as the README says for volumes that must survive a
# controller restart; the VM has no other provisioner), then what a user
# would check; after its uninstall, the
# chart again in cluster mode with this one node as its storage node
# (scenario_cluster_*). Nothing here performs a step
# of a Kubernetes controller or of the kubelet: every object the test makes
# is one a user makes (PVCs, pods, VolumeSnapshots, helm releases, a node
# label).
# One RESULT line per scenario, one SUMMARY line. $SCENARIOS (run.env)
# selects scenarios by name, in order.
set -u
export KUBECONFIG=/etc/kubernetes/admin.conf
. /payload/run.env
driver=nbd.csi.dev
ns=nbd-csi
passed=0
failed=0
uptime_s() { cut -d' ' -f1 /proc/uptime; }
note() { echo "scenario: [$(uptime_s)s] $*"; }
fail() { note "FAILED: $*"; return 1; }
k() { kubectl "$@"; }
# wait_for SECONDS WHAT COMMAND...: polls every 2 s; false after SECONDS.
wait_for() {
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || { note "timed out waiting: $what"; return 1; }
        sleep 2
    done
}
gone() { ! k get "$@" >/dev/null 2>&1; }
# watch_for SECONDS WHAT KUBECTL-WAIT-ARGS...: one `kubectl wait`, which
# watches, where wait_for would start a kubectl every second (each start
# costs the emulated guest about a second of CPU its cluster needs).
watch_for() {
    local seconds=$1 what=$2
    shift 2
    k wait --timeout="${seconds}s" "$@" >/dev/null 2>&1 || { note "timed out waiting: $what"; return 1; }
}

# The images the run built (tests/cluster/images.sh), by the chart's keys.
chart_images=(
    --set image.repository=localhost/nbd-csi --set "image.tag=$VERSION"
    --set sidecars.provisioner.image.repository=localhost/csi-provisioner
    --set sidecars.attacher.image.repository=localhost/csi-attacher
    --set sidecars.resizer.image.repository=localhost/csi-resizer
    --set sidecars.snapshotter.image.repository=localhost/csi-snapshotter
    --set sidecars.livenessProbe.image.repository=localhost/livenessprobe
    --set sidecars.nodeDriverRegistrar.image.repository=localhost/csi-node-driver-registrar
)
helm_install() { # extra helm args...
    helm install nbd-csi /payload/chart/nbd-csi --namespace "$ns" --create-namespace \
        "${chart_images[@]}" --set controller.storage.type=hostPath --set controller.hostNetwork=true \
        --set volumeSnapshotClass.create=true "$@" --wait --timeout 10m
}

# A pod of the busybox image on the volume of CLAIM: mounted at /data
# (Filesystem) or as /dev/xvda (Block); it sleeps, the test execs into it.
workload() { # NAME CLAIM fs|block
    local volume
    if [ "$3" = block ]; then
        volume="volumeDevices: [{ name: v, devicePath: /dev/xvda }]"
    else
        volume="volumeMounts: [{ name: v, mountPath: /data }]"
    fi
    k apply -f - <<YAML
apiVersion: v1
kind: Pod
metadata: { name: $1 }
spec:
  terminationGracePeriodSeconds: 2
  containers:
    - name: w
      image: localhost/busybox:local
      command: [sleep, "3600"]
      $volume
  volumes:
    - name: v
      persistentVolumeClaim: { claimName: $2 }
YAML
    watch_for 240 "pod $1 Ready" --for=condition=Ready "pod/$1"
}
claim() { # NAME SIZE fs|block [extra spec yaml]
    local mode=Filesystem
    [ "$3" = block ] && mode=Block
    k apply -f - <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata: { name: $1 }
spec:
  storageClassName: nbd
  volumeMode: $mode
  accessModes: [ReadWriteOnce]
  resources: { requests: { storage: $2 } }
  ${4:-}
YAML
    watch_for 120 "claim $1 Bound" --for=jsonpath='{.status.phase}'=Bound "pvc/$1"
}
delete_pod() { k delete pod "$1" --wait=false >/dev/null; watch_for 180 "pod $1 gone" --for=delete "pod/$1"; }
in_pod() { local pod=$1; shift; k exec "$pod" -- "$@"; }

# The snapshot CRDs and snapshot-controller, as a cluster admin installs
# them before a CSI driver that takes snapshots (applying them again
# changes nothing).
snapshot_prerequisites() {
    local crds=/payload/crds
    k apply -f "$crds/" >/dev/null || return 1
    # helm looks its kinds up in discovery once; the chart's
    # VolumeSnapshotClass needs those CRDs served before it starts.
    k wait --for=condition=Established --timeout=120s -f "$crds/" >/dev/null || return 1
    k apply -f /payload/guest/snapshot-controller.yaml >/dev/null
}

scenario_install() {
    snapshot_prerequisites || return 1
    helm_install || return 1
    wait_for 120 "driver in CSINode" sh -c "kubectl get csinode nbd-node -o jsonpath='{.spec.drivers[*].name}' | grep -qw $driver" \
        || return 1
    [ "$(k -n "$ns" get pod "$(component_pod controller)" -o jsonpath='{.spec.hostNetwork}')" = true ] \
        || fail "the controller pod is not on the node's network" || return 1
    pod_certificates_in_use || return 1
    k -n "$ns" get pods -o wide
}

# On this API server (certificates.k8s.io/v1 PodCertificateRequest) the
# chart gives the node plugin a pod certificate: the kubelet made its key
# and asked, the controller signed; no Secret holds a node's key.
pod_certificates_in_use() {
    local pcrs secrets
    pcrs=$(k -n "$ns" get podcertificaterequests -o jsonpath='{range .items[*]}{.spec.signerName}={.status.conditions[0].type}/{.spec.nodeName}{" "}{end}')
    note "PodCertificateRequests: $pcrs"
    case " $pcrs " in
        *" $driver/node=Issued/"*) ;;
        *) fail "no Issued PodCertificateRequest for $driver/node: '$pcrs'"; return 1 ;;
    esac
    secrets=$(k -n "$ns" get secrets -l nbd.csi.dev/certificate=node -o name)
    [ -z "$secrets" ] || fail "node certificate Secrets exist beside pod certificates: $secrets"
}

# The chart's default tls.mode is required: the volume is published as
# nbds:// and the node's connections run on kernel TLS. The node plugin and
# the controller both use the host's network namespace, so the guest's
# /proc/net/tls_stat counts the node's sockets and the server's.
kernel_tls_in_use() {
    local uris; uris=$(k get volumeattachment -o jsonpath='{.items[*].status.attachmentMetadata.nbdUri}')
    case "$uris" in
        nbds://*) ;;
        *) fail "the volume's nbdUri is not nbds:// under the chart's default tls.mode: '$uris'"; return 1 ;;
    esac
    local tx rx errors
    tx=$(awk '$1 == "TlsCurrTxSw" { print $2 }' /proc/net/tls_stat)
    rx=$(awk '$1 == "TlsCurrRxSw" { print $2 }' /proc/net/tls_stat)
    errors=$(awk '$1 == "TlsDecryptError" { print $2 }' /proc/net/tls_stat)
    note "kernel TLS: $uris; sockets with TLS_TX $tx, TLS_RX $rx, decrypt errors $errors"
    [ "${tx:-0}" -ge 1 ] && [ "${rx:-0}" -ge 1 ] || fail "no kernel TLS socket while the volume is mounted" || return 1
    [ "${errors:-1}" -eq 0 ] || fail "$errors kernel TLS decrypt errors"
}

scenario_filesystem() {
    claim fs-claim 64Mi fs || return 1
    workload fs-writer fs-claim fs || return 1
    in_pod fs-writer sh -c 'dd if=/dev/urandom of=/data/blob bs=1M count=8 2>/dev/null && sync && sha256sum /data/blob >/data/blob.sha256' \
        || return 1
    local sum; sum=$(in_pod fs-writer cat /data/blob.sha256) || return 1
    note "written: $sum"
    grep -q "/dev/nbd" /proc/mounts || fail "no /dev/nbd mount on the node" || return 1
    kernel_tls_in_use || return 1
    delete_pod fs-writer || return 1
    # The same claim in a new pod on the same node: the data is there.
    workload fs-reader fs-claim fs || return 1
    in_pod fs-reader sha256sum -c /data/blob.sha256 || fail "data changed across pods" || return 1
    in_pod fs-reader df -P /data
}

scenario_block() {
    claim block-claim 64Mi block || return 1
    workload block-user block-claim block || return 1
    local size
    size=$(in_pod block-user blockdev --getsize64 /dev/xvda) || return 1
    [ "$size" = 67108864 ] || fail "block device is $size bytes, want 67108864" || return 1
    in_pod block-user sh -c 'dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 2>/dev/null &&
        dd if=/tmp/pattern of=/dev/xvda bs=1M seek=16 conv=fsync 2>/dev/null &&
        dd if=/dev/xvda of=/tmp/back bs=1M skip=16 count=4 iflag=direct 2>/dev/null &&
        cmp /tmp/pattern /tmp/back' || fail "block write/read back differs" || return 1
    delete_pod block-user
}

scenario_expand() {
    # Online: the filesystem claim grows while fs-reader has it mounted.
    k patch pvc fs-claim -p '{"spec":{"resources":{"requests":{"storage":"128Mi"}}}}' >/dev/null || return 1
    watch_for 180 "fs-claim capacity 128Mi" --for=jsonpath='{.status.capacity.storage}'=128Mi pvc/fs-claim || return 1
    local blocks
    wait_for 120 "df in the pod shows the new size" \
        sh -c '[ "$(kubectl exec fs-reader -- df -P /data | awk "NR==2 {print \$2}")" -gt 100000 ]' || return 1
    blocks=$(in_pod fs-reader df -P /data | awk 'NR==2 {print $2}')
    note "df /data: $blocks 1K-blocks"
    in_pod fs-reader sha256sum -c /data/blob.sha256 || fail "data changed by the expansion" || return 1
    # The node's block device under that mount has the new size too.
    local dev
    dev=$(awk '$1 ~ /^\/dev\/nbd/ && $2 ~ /fs-claim|pvc-/ { print $1; exit }' /proc/mounts)
    [ -n "$dev" ] && note "$dev: $(blockdev --getsize64 "$dev") bytes"
}

scenario_snapshot() {
    k apply -f - <<YAML >/dev/null || return 1
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: { name: fs-snap }
spec:
  volumeSnapshotClassName: nbd
  source: { persistentVolumeClaimName: fs-claim }
YAML
    watch_for 180 "snapshot ready" --for=jsonpath='{.status.readyToUse}'=true volumesnapshot/fs-snap || return 1
    # Written after the snapshot: must not be in the restored claim.
    in_pod fs-reader sh -c 'echo after >/data/after && sync' || return 1
    claim fs-restored 128Mi fs "dataSource: { name: fs-snap, kind: VolumeSnapshot, apiGroup: snapshot.storage.k8s.io }" \
        || return 1
    workload fs-restored-reader fs-restored fs || return 1
    in_pod fs-restored-reader sha256sum -c /data/blob.sha256 || fail "restored data differs" || return 1
    in_pod fs-restored-reader test ! -e /data/after || fail "restored claim has data written after the snapshot" || return 1
    delete_pod fs-restored-reader
}

# Synced writes in POD's /data while something restarts: io_start POD MAX
# writes 64 KiB at a time, each fsync'd, its checksum kept, until told to
# stop (at most MAX writes); io_check POD SECONDS, called once the restart
# is over, lets 5 more writes complete after it, stops the loop, waits
# (bounded) and reads every write back. The writes span the whole restart
# however long it takes, and the suite does not wait out a fixed count.
io_after=5
io_start() {
    in_pod "$1" sh -c "rm -f /data/io.*; i=0; after=0; while [ \$i -lt $2 ]; do
            if [ -e /data/io.stop ]; then [ \$after -ge $io_after ] && break; after=\$((after + 1)); fi
            dd if=/dev/urandom of=/data/io.\$i bs=64k count=1 conv=fsync 2>/dev/null || { echo \"write \$i failed\"; exit 1; }
            sha256sum /data/io.\$i >>/data/io.sums; i=\$((i + 1)); sleep 0.5; done
        [ -e /data/io.stop ] || { echo \"$2 writes and never told to stop\"; exit 1; }" >/tmp/io.out 2>&1 &
    io_pid=$!
}
io_check() {
    local deadline=$((SECONDS + $2))
    in_pod "$1" touch /data/io.stop || fail "cannot tell the writes to stop" || return 1
    while kill -0 "$io_pid" 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || { kill "$io_pid"; fail "writes still running after $2 s: $(tail -n 3 /tmp/io.out)"; return 1; }
        sleep 1
    done
    wait "$io_pid" || { cat /tmp/io.out; fail "a write failed"; return 1; }
    in_pod "$1" sha256sum -c -s /data/io.sums || fail "data written during the restart differs" || return 1
    note "$(in_pod "$1" wc -l </dev/null /data/io.sums | awk '{print $1}') synced writes, all read back"
}
component_pod() { k -n "$ns" get pod -l "app.kubernetes.io/component=$1" -o jsonpath='{.items[0].metadata.name}'; }
component_ready() { # COMPONENT OLD_UID: one pod, not OLD_UID, and Ready
    local pods
    pods=$(k -n "$ns" get pod -l "app.kubernetes.io/component=$1" \
        -o jsonpath='{range .items[*]}{.metadata.uid} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}')
    [ "$(wc -l <<<"$pods")" = 1 ] && [ "${pods% *}" != "$2" ] && [ "${pods##* }" = True ]
}

scenario_plugin_restart() {
    # I/O in the workload while the node plugin's pod is deleted and the
    # DaemonSet recreates it: the kernel owns the NBD sockets, so the writes
    # go on.
    io_start fs-reader 300
    sleep 5
    local old uid
    old=$(component_pod node)
    uid=$(k -n "$ns" get pod "$old" -o jsonpath='{.metadata.uid}')
    k -n "$ns" delete pod "$old" --wait=false >/dev/null || return 1
    wait_for 180 "a new node plugin pod Ready" component_ready node "$uid" || return 1
    io_check fs-reader 180
}

# Every workload, snapshot and claim deleted as a user does, and waited for
# until Kubernetes' controllers and the driver have removed what they made.
delete_workloads() {
    k delete volumesnapshot --all --wait=false >/dev/null
    k delete pod --all --wait=false >/dev/null
    wait_for 180 "workload pods gone" sh -c '[ -z "$(kubectl get pods -o name)" ]' || return 1
    k delete pvc --all --wait=false >/dev/null
    wait_for 240 "PersistentVolumes gone" sh -c '[ -z "$(kubectl get pv -o name)" ]' || return 1
    wait_for 120 "VolumeSnapshotContents gone" sh -c '[ -z "$(kubectl get volumesnapshotcontent -o name 2>/dev/null)" ]' || return 1
    wait_for 120 "VolumeAttachments gone" sh -c '[ -z "$(kubectl get volumeattachment -o name)" ]'
}

scenario_uninstall() {
    delete_workloads || return 1
    helm uninstall nbd-csi --namespace "$ns" --wait --timeout 5m || return 1
    wait_for 180 "chart's pods gone" sh -c "[ -z \"\$(kubectl -n $ns get pods -o name)\" ]" || return 1
    local left
    left=$(k get all,csidriver,storageclass,volumesnapshotclass,serviceaccount,clusterrole,clusterrolebinding,role,rolebinding -A \
        -l app.kubernetes.io/instance=nbd-csi -o name 2>/dev/null)
    [ -z "$left" ] || fail "objects left behind: $left" || return 1
    grep -q "/dev/nbd" /proc/mounts && { fail "nbd mounts left: $(grep /dev/nbd /proc/mounts)"; return 1; }
    local d busy=""
    for d in /sys/block/nbd*; do [ -e "$d/pid" ] && busy="$busy ${d##*/}"; done
    [ -z "$busy" ] || fail "nbd devices still connected:$busy" || return 1
    wait_for 60 "driver gone from CSINode" sh -c "! kubectl get csinode nbd-node -o jsonpath='{.spec.drivers[*].name}' | grep -qw $driver"
}


scenario_controller_restart() {
    claim ctl-claim 64Mi fs || return 1
    workload ctl-user ctl-claim fs || return 1
    io_start ctl-user 300
    sleep 5
    local uid
    uid=$(k -n "$ns" get pod "$(component_pod controller)" -o jsonpath='{.metadata.uid}')
    k -n "$ns" delete pod "$(component_pod controller)" --wait=false >/dev/null || return 1
    wait_for 240 "a new controller pod Ready" component_ready controller "$uid" || return 1
    note "controller pod recreated"
    io_check ctl-user 240 || return 1
    # New volumes are provisioned after it returns (the restarted
    # controller serving ctl-user's export again is what io_check showed).
    claim ctl-after 32Mi fs
}

release_version() { helm -n "$ns" status nbd-csi -o json | grep -o '"version":[0-9][0-9]*' | head -n 1 | cut -d: -f2; }
# Every pod of COMPONENT (old ones gone) runs CONTAINER with RUST_LOG=LEVEL.
runs_log_level() { # COMPONENT CONTAINER LEVEL
    local levels
    levels=$(k -n "$ns" get pod -l "app.kubernetes.io/component=$1" \
        -o jsonpath="{range .items[*]}{.spec.containers[?(@.name==\"$2\")].env[?(@.name==\"RUST_LOG\")].value}{\"\\n\"}{end}")
    [ -n "$levels" ] && [ -z "$(grep -vx "$3" <<<"$levels")" ]
}


# --- Cluster mode (storage.mode=cluster) with one storage node, as the
# README's commands install it: volumes live on the storage agent the
# storage DaemonSet runs on the labelled node, not in the controller. Runs
# after `uninstall`; selected alone, cluster_install first removes the
# embedded release the way scenario_uninstall does (switching modes does
# not move volumes).
#
# Installed from the previous chart (its controller a one-replica
# StatefulSet), a volume in use, then upgraded to this chart as the README
# says (CRDs applied, helm upgrade with the same values and one changed,
# logLevel): the controller becomes a Deployment of 2 replicas and every pod
# rolls while the workload's synced writes go on, and the later scenarios
# run on the upgraded release.
storage_label=nbd.csi.dev/storage
scenario_cluster_install() {
    if helm -n "$ns" status nbd-csi >/dev/null 2>&1; then
        note "an embedded release is installed: uninstalling it first"
        scenario_uninstall || return 1
    fi
    snapshot_prerequisites || return 1
    k label node nbd-node "$storage_label=true" --overwrite >/dev/null || return 1
    helm install nbd-csi /payload/previous-chart/nbd-csi --namespace "$ns" --create-namespace \
        "${chart_images[@]}" --set storage.mode=cluster --wait --timeout 10m || return 1
    [ "$(k -n "$ns" get statefulset -l app.kubernetes.io/component=controller -o name | wc -l)" = 1 ] \
        || fail "the previous chart's controller is not a StatefulSet" || return 1
    wait_for 180 "storage agent pod Ready" component_ready storage "" || return 1
    claim upgrade-claim 64Mi fs || return 1
    workload upgrade-user upgrade-claim fs || return 1
    io_start upgrade-user 300
    sleep 3
    local upgraded=$SECONDS
    k apply --server-side -f /payload/chart/nbd-csi/crds/ >/dev/null || return 1
    helm upgrade nbd-csi /payload/chart/nbd-csi --namespace "$ns" \
        "${chart_images[@]}" --set storage.mode=cluster --set logLevel=debug --wait --timeout 10m || return 1
    [ "$(release_version)" = 2 ] || fail "release version $(release_version) after one upgrade" || return 1
    [ -z "$(k -n "$ns" get statefulset -l app.kubernetes.io/component=controller -o name)" ] \
        || fail "the StatefulSet is still there after the upgrade" || return 1
    wait_for 240 "the controller Deployment's 2 replicas ready" sh -c \
        "[ \"\$(kubectl -n $ns get deployment -l app.kubernetes.io/component=controller -o jsonpath='{.items[0].status.readyReplicas}')\" = 2 ]" \
        || return 1
    note "upgraded from the StatefulSet to 2 replicas in $((SECONDS - upgraded)) s"
    wait_for 120 "the controllers run the new value" runs_log_level controller nbd-csi-controller debug || return 1
    wait_for 120 "the node plugin runs the new value" runs_log_level node nbd-csi-node debug || return 1
    io_check upgrade-user 240 || return 1
    # helm's --wait counts a DaemonSet ready with maxUnavailable pods not
    # ready, which for one node is none: wait for the agent itself.
    wait_for 180 "storage agent pod Ready" component_ready storage "" || return 1
    wait_for 120 "NbdStorageNode nbd-node" k get nbdstoragenode nbd-node || return 1
    wait_for 120 "driver in CSINode" sh -c "kubectl get csinode nbd-node -o jsonpath='{.spec.drivers[*].name}' | grep -qw $driver" \
        || return 1
    local mode
    mode=$(k -n "$ns" get pod "$(component_pod controller)" \
        -o jsonpath='{.spec.containers[?(@.name=="nbd-csi-controller")].args}')
    case $mode in *--storage-mode=cluster*) ;; *) fail "controller not in cluster mode: $mode"; return 1 ;; esac
    k -n "$ns" get pods -o wide
    k get nbdstoragenodes
    # Seen twice: the controller pod with one container restarted once
    # (Error) by the time the agent is Ready; the log says which and why.
    local pod c
    for pod in $(k -n "$ns" get pods -o name); do
        for c in $(k -n "$ns" get "$pod" -o jsonpath='{range .status.containerStatuses[?(@.restartCount>0)]}{.name}{" "}{end}'); do
            note "$pod $c restarted; its previous log:"
            # Prefixed, and each line ended: a log (or kubectl's message)
            # without a final newline swallowed the RESULT line after it.
            k -n "$ns" logs "$pod" -c "$c" --previous --tail 15 2>&1 | sed 's/\x1b\[[0-9;]*m//g' \
                | awk '{ print "scenario:   | " $0 }'
        done
    done
}

# The node plugin's log, colours removed (tracing writes ANSI escapes when
# it thinks it writes to a terminal).
node_log() { k -n "$ns" logs "$1" -c nbd-csi-node "${@:2}" 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g'; }
# Restarts of POD's node plugin container (its liveness probe restarts it
# on a starved node): two logs read are one container's while it holds.
node_restarts() { k -n "$ns" get pod "$1" -o jsonpath='{.status.containerStatuses[?(@.name=="nbd-csi-node")].restartCount}'; }
# How many times LOG says MESSAGE for VOLUME (`staged`, `reconnected`).
log_count() { grep -c ": $2 volume=$3 " <<<"$1"; }
# Connections the storage agent serves for VOLUME now (its metrics port on
# the node's address; 0 when it does not list the volume).
agent_connections() {
    curl -sf -m 5 "http://10.0.2.15:9812/metrics" |
        awk -v v="nbd_csi_volume_connections{volume_id=\"$1\"}" '$1 == v { n = $2 } END { print n + 0 }'
}
agent_serves() { [ "$(agent_connections "$1")" -ge 1 ]; }
# The device mounted at POD's volume of PV on this node.
pod_volume_device() { # POD_UID PV
    awk -v t="/var/lib/kubelet/pods/$1/volumes/kubernetes.io~csi/$2/mount" '$2 == t { print $1 }' /proc/mounts
}

scenario_cluster_agent_restart() {
    claim agent-claim 64Mi fs || return 1
    workload agent-user agent-claim fs || return 1
    local pv vol placed pod_uid dev node_pod restarts log staged reconnected
    pv=$(k get pvc agent-claim -o jsonpath='{.spec.volumeName}')
    vol=$(k get pv "$pv" -o jsonpath='{.spec.csi.volumeHandle}')
    placed=$(k get nbdvolume "$vol" -o jsonpath='{.spec.storageNode}')
    [ "$placed" = nbd-node ] || fail "NbdVolume $vol placed on '$placed', want nbd-node" || return 1
    # 32 MiB of random data, synced, and its checksum, before the restart.
    in_pod agent-user sh -c 'dd if=/dev/urandom of=/data/blob bs=1M count=32 conv=fsync 2>/dev/null &&
        sha256sum /data/blob >/data/blob.sha256 && sync' || return 1
    note "written before: $(in_pod agent-user cat /data/blob.sha256)"
    pod_uid=$(k get pod agent-user -o jsonpath='{.metadata.uid}')
    dev=$(pod_volume_device "$pod_uid" "$pv")
    case $dev in /dev/nbd*) ;; *) fail "the pod's volume is on '$dev', not an nbd device"; return 1 ;; esac
    # The backend identifier names the volume and the node plugin's node.
    [ "$(cat "/sys/block/${dev#/dev/}/backend" 2>/dev/null)" = "$vol@nbd-node" ] \
        || fail "$dev's backend is not $vol@nbd-node" || return 1
    node_pod=$(component_pod node)
    restarts=$(node_restarts "$node_pod")
    log=$(node_log "$node_pod")
    staged=$(log_count "$log" staged "$vol")
    reconnected=$(log_count "$log" reconnected "$vol")
    # The line counted below is there (in the previous container's log if
    # the probe restarted the plugin since): the count means something.
    [ "$((staged + $(log_count "$(node_log "$node_pod" --previous)" staged "$vol")))" -ge 1 ] \
        || fail "no 'staged' for $vol in the node plugin's log" || return 1
    wait_for 60 "the agent counts the node's connections" agent_serves "$vol" || return 1
    note "$vol on $dev, $(agent_connections "$vol") connections to the agent"

    # The agent pod deleted while the workload writes; the DaemonSet makes
    # a new one, which serves the volume on the same address and port.
    io_start agent-user 300
    sleep 5
    local old uid deleted
    old=$(component_pod storage)
    uid=$(k -n "$ns" get pod "$old" -o jsonpath='{.metadata.uid}')
    deleted=$SECONDS
    k -n "$ns" delete pod "$old" --wait=false >/dev/null || return 1
    wait_for 240 "a new storage agent pod Ready" component_ready storage "$uid" || return 1
    note "new agent pod Ready $((SECONDS - deleted)) s after the deletion"
    wait_for 180 "the node reconnected to the new agent" agent_serves "$vol" || return 1
    note "the new agent serves $(agent_connections "$vol") connections, $((SECONDS - deleted)) s after the deletion"
    io_check agent-user 240 || return 1

    # The same pod, never restarted, on the same device: nothing re-staged.
    [ "$(k get pod agent-user -o jsonpath='{.metadata.uid} {.status.containerStatuses[0].restartCount}')" = "$pod_uid 0" ] \
        || fail "the workload pod was recreated or restarted" || return 1
    [ "$(pod_volume_device "$pod_uid" "$pv")" = "$dev" ] || fail "the pod's volume is no longer on $dev" || return 1
    [ -e "/sys/block/${dev#/dev/}/pid" ] || fail "$dev is no longer connected" || return 1
    [ "$(component_pod node)" = "$node_pod" ] || fail "the node plugin pod changed: its log cannot tell" || return 1
    log=$(node_log "$node_pod")
    if [ "$(node_restarts "$node_pod")" = "$restarts" ]; then
        [ "$(log_count "$log" staged "$vol")" = "$staged" ] || fail "the node plugin staged $vol again" || return 1
        [ "$(log_count "$log" reconnected "$vol")" -gt "$reconnected" ] \
            || fail "no new 'reconnected' for $vol in the node plugin's log" || return 1
    else
        # Restarted meanwhile: its healing may be in a log that is gone,
        # but a staging in this container's would be one after the restart.
        note "the node plugin's container restarted during the agent's restart"
        [ "$(log_count "$log" staged "$vol")" = 0 ] || fail "the node plugin staged $vol again" || return 1
    fi
    note "node plugin: $(grep -E ": (kernel reports a dead link|reconnected) .*volume=$vol" <<<"$log" | tail -n 3 | cut -c1-200)"

    # Read back from the volume, not the page cache (O_DIRECT), then new
    # writes, synced and read back the same way.
    local sum
    sum=$(in_pod agent-user sh -c 'dd if=/data/blob bs=1M iflag=direct 2>/dev/null | sha256sum' | awk '{print $1}')
    [ "$sum" = "$(in_pod agent-user cat /data/blob.sha256 | awk '{print $1}')" ] \
        || fail "32 MiB read back with O_DIRECT: sha256 $sum differs" || return 1
    in_pod agent-user sh -c 'dd if=/dev/urandom of=/tmp/after bs=1M count=4 2>/dev/null &&
        dd if=/tmp/after of=/data/after bs=1M conv=fsync 2>/dev/null && sync &&
        dd if=/data/after of=/tmp/back bs=1M iflag=direct 2>/dev/null && cmp /tmp/after /tmp/back' \
        || fail "writing after the restart failed or reads back differently" || return 1
    note "32 MiB read back with O_DIRECT ($sum), 4 MiB written and read back after the restart"
}

# Workloads, then the release, then what the agent made outside it (its
# NbdStorageNode; the export-key Secret and the agent's Lease go with the
# namespace) and the node's label: nothing of cluster mode stays.
scenario_cluster_uninstall() {
    delete_workloads || return 1
    # Each volume's object goes once its agent has removed its data.
    wait_for 120 "NbdVolumes gone" sh -c '[ -z "$(kubectl get nbdvolumes,nbdsnapshots -o name)" ]' || return 1
    scenario_uninstall || return 1
    k delete nbdstoragenode nbd-node --ignore-not-found >/dev/null || return 1
    k delete namespace "$ns" --wait=false >/dev/null || return 1
    wait_for 180 "namespace $ns gone" gone namespace "$ns" || return 1
    k label node nbd-node "$storage_label-" >/dev/null || return 1
    local left
    left=$(k get nbdvolumes,nbdsnapshots,nbdstoragenodes -o name 2>&1)
    [ -z "$left" ] || fail "cluster-mode objects left: $left"
}

all="install filesystem block expand snapshot plugin_restart controller_restart uninstall
    cluster_install cluster_agent_restart cluster_uninstall"
for name in ${SCENARIOS:-$all}; do
    started=$(uptime_s)
    note "=== $name"
    if "scenario_$name"; then
        status=ok; passed=$((passed + 1))
    else
        status=FAIL; failed=$((failed + 1))
        k get pods -A -o wide
        k get pvc,pv,volumeattachment 2>&1 | head -30
        k get events -A --sort-by=.lastTimestamp 2>&1 | tail -25
        for pod in $(k get pods -A -o jsonpath='{range .items[*]}{.metadata.namespace}/{.metadata.name}{"\n"}{end}'); do
            for c in $(k -n "${pod%/*}" get pod "${pod#*/}" -o jsonpath='{.spec.containers[*].name}'); do
                echo "----- logs $pod $c"
                k -n "${pod%/*}" logs "${pod#*/}" -c "$c" --tail 15 2>&1
            done
        done
    fi
    echo "RESULT $name $status $(awk -v a="$started" -v b="$(uptime_s)" 'BEGIN { printf "%.0fs", b - a }')"
done
# Where the guest's CPU went (the suite is CPU-bound under emulation): in
# all, by this script's own children (kubectl, helm, the writes' execs), and
# by the processes still running.
note "cpu: $(awk '/^cpu / { printf "user %d s, system %d s, idle %d s", $2 / 100, $4 / 100, $5 / 100 }' /proc/stat)"
note "cpu: this script's children $(awk '{ printf "%d s", ($16 + $17) / 100 }' /proc/$$/stat)"
ps -eo time,comm --sort=-time | head -n 12 | while read -r line; do note "cpu: $line"; done
echo "SUMMARY passed=$passed failed=$failed"
[ "$failed" -eq 0 ]
