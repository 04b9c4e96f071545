#!/usr/bin/env bash
# End to end against a real kube-apiserver (issue 5, deliverable 5): etcd and
# kube-apiserver on 127.0.0.1, the chart's CSIDriver, StorageClass,
# ServiceAccounts and RBAC applied from `helm template`, then as processes
# (no pods), all three with a token of the chart's controller ServiceAccount
# (so the chart's RBAC is what they get):
#   nbd-csi-controller (debug build) --advertise-address 127.0.0.1
#       --nbd-listen-address 127.0.0.1 --kubeconfig ...
#   csi-provisioner --extra-create-metadata, csi-attacher
# and checks:
#   - a PVC of the chart's StorageClass gets a PV provisioned by our
#     controller (volumeHandle, claimRef, the image in the data dir);
#   - a VolumeAttachment to a Node with InternalIP 127.0.0.2 is attached with
#     nbdUri; the export serves I/O to 127.0.0.2 and closes on 127.0.0.3;
#   - refused attaches (the volume is single-node and attached elsewhere; a
#     Node without addresses) fail with attachError and an AttachRefused
#     Event on the PVC, and change nobody's access;
#   - e2e-node-a tainted out-of-service and its VolumeAttachment deleted: a
#     VolumeFenced Event on the PVC and on the Node;
#   - deleting the VolumeAttachment revokes 127.0.0.2 and, the volume being
#     attached nowhere, stops its server (its port is given back); deleting the PVC
#     deletes the volume and the PV.
# No kubelet or kube-controller-manager runs: the test creates the Nodes and
# CSINodes (kubelet and node-driver-registrar would), sets the
# storage-provisioner annotations and binds the PVC to the PV (the PV
# controller would), marks the PV Released and lifts the pvc/pv-protection
# finalizers (the PV and protection controllers would); each such step is
# printed as "(acting as ...)".
# NBD_CSI_CONTROLLER=path uses that controller binary instead of building one.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/k8s/tools.sh
. tests/k8s/cluster.sh

ensure_helm
ensure_csi_sidecars
controller_bin=$(controller_binary)
probe=(python3 tests/k8s/nbd_probe.py)
driver=nbd.csi.dev

cluster_init nbd-csi-e2e
cluster_start
k() { "$kubectl" "$@"; }

is() { [ "$("$kubectl" get "${@:2}" 2>/dev/null)" = "$1" ]; } # is WANT KIND NAME -o jsonpath=...
# wait_until, jp, gone, check, acting and logs come from tests/k8s/cluster.sh.

# --- the chart's cluster-scoped objects and the controller identity
ns=nbd-csi
k create namespace "$ns" >/dev/null
k create namespace app >/dev/null
"$helm" template nbd-csi charts/nbd-csi --namespace "$ns" \
    --show-only templates/csidriver.yaml --show-only templates/storageclasses.yaml \
    --show-only templates/serviceaccounts.yaml --show-only templates/rbac.yaml >"$work/chart.yaml"
if k apply -f "$work/chart.yaml" >"$work/apply.txt" 2>&1; then
    ok "chart's CSIDriver, StorageClass, ServiceAccounts and RBAC applied ($(wc -l <"$work/apply.txt") objects)"
else
    cat "$work/apply.txt" >&2
    bad "applying the chart's objects"
    exit 1
fi
check "StorageClass nbd: provisioner, reclaim policy, binding mode" "$driver Delete Immediate" \
    "$(jp storageclass nbd -o jsonpath='{.provisioner} {.reclaimPolicy} {.volumeBindingMode}')"
sa_token=$(k -n "$ns" create token nbd-csi-controller --duration 2h)
cluster_kubeconfig "$work/sa.kubeconfig" nbd-csi-controller "$sa_token"

# --- the controller and the sidecars, as processes
socket=$work/csi.sock
data=$work/data
port_base=$((20000 + RANDOM % 9000))
# start_controller LOG / start_sidecars N: the processes of one run (the
# sidecars exit when the controller's socket goes away, as in a pod).
start_controller() {
    NO_COLOR=1 RUST_LOG=${RUST_LOG:-info,nbd_csi_controller=debug} "$controller_bin" \
        --endpoint "unix://$socket" --data-dir "$data" --driver-name "$driver" \
        --advertise-address 127.0.0.1 --nbd-listen-address 127.0.0.1 \
        --nbd-port-range "$port_base-$((port_base + 19))" \
        --kubeconfig "$work/sa.kubeconfig" >"$work/$1" 2>&1 &
    controller_pid=$!
    pids+=("$controller_pid")
    wait_until 60 test -S "$socket" && kill -0 "$controller_pid"
}
sidecar_args=(--kubeconfig "$work/sa.kubeconfig" --csi-address "$socket" --leader-election=false
    --timeout=30s --retry-interval-max=5s --v=4)
start_sidecars() {
    "$TOOLS_BIN/csi-provisioner" "${sidecar_args[@]}" --extra-create-metadata --default-fstype=ext4 \
        >"$work/provisioner$1.log" 2>&1 &
    sidecar_pids=($!)
    "$TOOLS_BIN/csi-attacher" "${sidecar_args[@]}" >"$work/attacher$1.log" 2>&1 &
    sidecar_pids+=($!)
    pids+=("${sidecar_pids[@]}")
    sleep 2
    kill -0 "${sidecar_pids[@]}" 2>/dev/null
}
stop() { # PID...: SIGTERM, then wait (bounded)
    local pid
    for pid in "$@"; do
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}

if start_controller controller.log; then
    ok "nbd-csi-controller serving CSI on $socket with the controller ServiceAccount's kubeconfig"
else
    logs controller.log
    bad "nbd-csi-controller did not start"
    exit 1
fi
start_sidecars "" || { logs provisioner.log attacher.log; bad "a sidecar exited at start"; exit 1; }
ok "csi-provisioner $EXTERNAL_PROVISIONER_VERSION and csi-attacher $EXTERNAL_ATTACHER_VERSION running"

# --- Nodes (and the CSINodes kubelet's plugin registration would create)
acting "kubelet: Node and CSINode objects"
cluster_node e2e-node-a 127.0.0.2 "$driver"
cluster_node e2e-node-b 127.0.0.3 "$driver"
cluster_node e2e-node-noaddr "" "$driver"
check "Nodes: InternalIP of e2e-node-a, e2e-node-b, e2e-node-noaddr" "127.0.0.2,127.0.0.3,-" \
    "$(for n in e2e-node-a e2e-node-b e2e-node-noaddr; do a=$(jp node "$n" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}'); echo "${a:--}"; done | paste -sd,)"

# --- provisioning
acting "PV controller: storage-provisioner annotations on the PVC"
k create -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: data
  namespace: app
  annotations:
    volume.kubernetes.io/storage-provisioner: $driver
    volume.beta.kubernetes.io/storage-provisioner: $driver
spec:
  storageClassName: nbd
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 64Mi}}
EOF
pvc_uid=$(jp -n app pvc data -o jsonpath='{.metadata.uid}')
pv=pvc-$pvc_uid
if wait_until 60 k get pv "$pv"; then
    ok "PV $pv provisioned for PVC app/data"
else
    logs provisioner.log controller.log
    bad "no PV for PVC app/data within 60s"
    exit 1
fi
volume_id=$(jp pv "$pv" -o jsonpath='{.spec.csi.volumeHandle}')
check "PV: CSI driver, claimRef, reclaim policy, capacity, fsType" \
    "$driver app/data/$pvc_uid Delete 64Mi ext4" \
    "$(jp pv "$pv" -o jsonpath='{.spec.csi.driver} {.spec.claimRef.namespace}/{.spec.claimRef.name}/{.spec.claimRef.uid} {.spec.persistentVolumeReclaimPolicy} {.spec.capacity.storage} {.spec.csi.fsType}')"
if [[ $volume_id == vol-* ]] && [ -f "$data/volumes/$volume_id.img" ] && [ -f "$data/volumes/$volume_id.json" ]; then
    ok "volumeHandle $volume_id: image and record in the controller's data dir ($(stat -c %s "$data/volumes/$volume_id.img") bytes)"
else
    bad "volumeHandle '$volume_id' has no image/record in $data/volumes: $(find "$data/volumes" -mindepth 1 -printf '%f ' 2>&1)"
fi
record_pvc=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["name"])' "$data/volumes/$volume_id.json" 2>/dev/null || true)
check "CreateVolume name is the PV name (Events find the PV by it)" "$pv" "$record_pvc"
# Observed, not asserted: without the PV controller nobody binds.
echo "   csi-provisioner alone: PV phase '$(jp pv "$pv" -o jsonpath='{.status.phase}')', PVC phase '$(jp -n app pvc data -o jsonpath='{.status.phase}')'"
acting "PV controller: bind PVC app/data to $pv"
k -n app patch pvc data --type=merge -p "{\"metadata\":{\"annotations\":{\"pv.kubernetes.io/bind-completed\":\"yes\",\"pv.kubernetes.io/bound-by-controller\":\"yes\"}},\"spec\":{\"volumeName\":\"$pv\"}}" >/dev/null
k patch pv "$pv" --subresource=status --type=merge -p '{"status":{"phase":"Bound"}}' >/dev/null
k -n app patch pvc data --subresource=status --type=merge \
    -p '{"status":{"phase":"Bound","accessModes":["ReadWriteOnce"],"capacity":{"storage":"64Mi"}}}' >/dev/null
check "PVC app/data Bound to $pv" "Bound $pv" "$(jp -n app pvc data -o jsonpath='{.status.phase} {.spec.volumeName}')"

# --- attach to e2e-node-a (127.0.0.2)
add_va() { volume_attachment "$1" "$pv" "$2"; } # NAME NODE
add_va e2e-va-a e2e-node-a
if wait_until 60 is true volumeattachment e2e-va-a -o jsonpath='{.status.attached}'; then
    ok "VolumeAttachment e2e-va-a attached by csi-attacher"
else
    logs attacher.log controller.log
    bad "VolumeAttachment e2e-va-a not attached within 60s: $(jp volumeattachment e2e-va-a -o jsonpath='{.status}')"
fi
uri=$(jp volumeattachment e2e-va-a -o jsonpath='{.status.attachmentMetadata.nbdUri}')
if [[ $uri =~ ^nbd://127\.0\.0\.1:([0-9]+)/[0-9a-f]{64}$ ]] && [ "${BASH_REMATCH[1]}" -ge "$port_base" ] &&
    [ "${BASH_REMATCH[1]}" -le $((port_base + 19)) ]; then
    ok "attachmentMetadata.nbdUri nbd://127.0.0.1:${BASH_REMATCH[1]}/<64 hex> (readOnly=$(jp volumeattachment e2e-va-a -o jsonpath='{.status.attachmentMetadata.readOnly}'))"
else
    bad "attachmentMetadata.nbdUri is '$uri'"
fi
uri=${uri:-nbd://127.0.0.1:1/none}

probe_is() { # DESCRIPTION STATUS SOURCE [--io]: the probe from SOURCE must exit with STATUS
    local out status=0
    out=$("${probe[@]}" "$3" "$uri" "${@:4}" 2>&1) || status=$?
    if [ "$status" = "$2" ]; then ok "$1: $out"; else bad "$1: exit $status, want $2: $out"; fi
}
probe_is "export admits e2e-node-a's 127.0.0.2 (NBD_OPT_GO acked, I/O)" 0 127.0.0.2 --io
probe_is "export closes on 127.0.0.3 before the greeting" 2 127.0.0.3

# Events as the API server has them (both APIs show the same objects):
# "EVENTS SERIES": how many Events for the PVC app/data have REASON and a note
# matching NOTE_PATTERN, and the highest occurrence count among them.
events_on_pvc() { # REASON NOTE_PATTERN
    k get events.events.k8s.io -n app -o json 2>/dev/null | python3 -c '
import json, re, sys
reason, pattern = sys.argv[1], sys.argv[2]
n, most = 0, 0
for e in json.load(sys.stdin)["items"]:
    r = e.get("regarding") or {}
    if (r.get("kind"), r.get("name"), r.get("uid")) == ("PersistentVolumeClaim", "data", sys.argv[3]) \
            and e.get("reason") == reason and e.get("type") == "Warning" \
            and e.get("reportingController") == "nbd.csi.dev/controller" and re.search(pattern, e.get("note", "")):
        n += 1
        most = max(most, (e.get("series") or {}).get("count", 1))
print(n, most)' "$1" "$2" "$pvc_uid"
}
has_event() { local n _; read -r n _ < <(events_on_pvc "$@"); [ "${n:-0}" -ge 1 ]; }

# --- a second node while the single-node volume is attached to the first
add_va e2e-va-b e2e-node-b
if wait_until 60 bash -c "'$kubectl' get volumeattachment e2e-va-b -o jsonpath='{.status.attachError.message}' | grep -q 'single-node and already published to e2e-node-a'"; then
    ok "VolumeAttachment e2e-va-b refused: $(jp volumeattachment e2e-va-b -o jsonpath='{.status.attached} {.status.attachError.message}' | cut -c1-160)"
else
    bad "VolumeAttachment e2e-va-b: $(jp volumeattachment e2e-va-b -o jsonpath='{.status}')"
fi
if wait_until 30 has_event AttachRefused 'node "e2e-node-b".*single-node'; then
    ok "Event AttachRefused on PVC app/data for e2e-node-b: $(k get events -n app --field-selector reason=AttachRefused -o jsonpath='{.items[0].message}' | cut -c1-160)"
else
    logs controller.log
    bad "no AttachRefused Event on PVC app/data for e2e-node-b"
fi
probe_is "refused attach leaves 127.0.0.3 shut out" 2 127.0.0.3
k delete volumeattachment e2e-va-b --wait=false >/dev/null
if wait_until 60 gone volumeattachment e2e-va-b; then ok "VolumeAttachment e2e-va-b deleted (csi-attacher detached it)"; else bad "VolumeAttachment e2e-va-b still there"; fi
probe_is "detaching the refused node leaves 127.0.0.2 admitted" 0 127.0.0.2

# --- a volume server that cannot start: restart the controller while
# something else holds the volume's port
nbd_port=${uri#nbd://127.0.0.1:}
nbd_port=${nbd_port%%/*}
stop "${sidecar_pids[@]}" "$controller_pid"
python3 -c 'import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1); print("held", flush=True); time.sleep(120)' "$nbd_port" >"$work/holder.log" 2>&1 &
holder_pid=$!
pids+=("$holder_pid")
wait_until 10 grep -q held "$work/holder.log" || bad "could not hold port $nbd_port"
if start_controller controller-2.log && start_sidecars -2; then
    ok "controller and sidecars restarted with port $nbd_port taken"
else
    logs controller-2.log
    bad "restart with port $nbd_port taken"
fi
if wait_until 30 has_event VolumeServerDown "$volume_id.*not running"; then
    ok "Event VolumeServerDown on PVC app/data: $(k get events -n app --field-selector reason=VolumeServerDown -o jsonpath='{.items[0].message}' | cut -c1-160)"
else
    logs controller-2.log
    bad "no VolumeServerDown Event on PVC app/data"
fi
stop "$holder_pid"
# The controller retries every 30 s; the publication to e2e-node-a survived.
if wait_until 45 "${probe[@]}" 127.0.0.2 "$uri"; then
    probe_is "server back after the port is free; 127.0.0.2 still admitted" 0 127.0.0.2
else
    bad "volume server not back within 45s: $("${probe[@]}" 127.0.0.2 "$uri")"
fi
probe_is "and 127.0.0.3 still refused after the restart" 2 127.0.0.3

# --- e2e-node-a is declared gone (non-graceful node shutdown): detached, it is fenced
acting "an admin: taint e2e-node-a node.kubernetes.io/out-of-service; attach/detach controller: delete its VolumeAttachment"
k taint node e2e-node-a node.kubernetes.io/out-of-service=nodeshutdown:NoExecute >/dev/null
k delete volumeattachment e2e-va-a --wait=false >/dev/null
if wait_until 60 gone volumeattachment e2e-va-a; then
    ok "VolumeAttachment e2e-va-a deleted (csi-attacher called ControllerUnpublishVolume)"
else
    logs attacher-2.log
    bad "VolumeAttachment e2e-va-a still there: $(jp volumeattachment e2e-va-a -o jsonpath='{.metadata.finalizers} {.status}')"
fi
# Attached nowhere: its server is stopped and its port given back.
probe_is "after detach, no server listens for the volume (its port given back)" 3 127.0.0.2
if wait_until 30 has_event VolumeFenced 'detached from out-of-service node "e2e-node-a"'; then
    ok "Event VolumeFenced on PVC app/data: $(k get events.events.k8s.io -n app -o jsonpath='{.items[?(@.reason=="VolumeFenced")].note}' | cut -c1-160)"
else
    bad "no VolumeFenced Event on PVC app/data"
fi
node_fenced() { # a VolumeFenced Warning regarding Node e2e-node-a, with its uid
    [ "$(k get events.events.k8s.io -n default -o jsonpath='{range .items[?(@.reason=="VolumeFenced")]}{.regarding.kind}/{.regarding.name}/{.regarding.uid}{"\n"}{end}')" = \
        "Node/e2e-node-a/$(jp node e2e-node-a -o jsonpath='{.metadata.uid}')" ]
}
if wait_until 30 node_fenced; then ok "Event VolumeFenced on Node e2e-node-a"; else bad "no VolumeFenced Event on Node e2e-node-a"; fi

# --- a Node without addresses: no export could admit it
add_va e2e-va-noaddr e2e-node-noaddr
if wait_until 60 bash -c "'$kubectl' get volumeattachment e2e-va-noaddr -o jsonpath='{.status.attachError.message}' | grep -q 'has no IP address'"; then
    ok "VolumeAttachment to a Node without addresses refused: $(jp volumeattachment e2e-va-noaddr -o jsonpath='{.status.attachError.message}' | cut -c1-160)"
else
    bad "VolumeAttachment e2e-va-noaddr: $(jp volumeattachment e2e-va-noaddr -o jsonpath='{.status}')"
fi
if wait_until 30 has_event AttachRefused 'e2e-node-noaddr.*no IP address'; then
    ok "Event AttachRefused on PVC app/data for e2e-node-noaddr"
else
    bad "no AttachRefused Event on PVC app/data for e2e-node-noaddr"
fi
# csi-attacher retries with backoff; the controller counts repeats in one
# Event's series instead of creating more.
series_repeated() { local n c; read -r n c < <(events_on_pvc AttachRefused 'e2e-node-noaddr'); [ "$n" = 1 ] && [ "$c" -ge 2 ]; }
if wait_until 30 series_repeated; then
    ok "repeated refusals for one node are one Event with series.count $(events_on_pvc AttachRefused 'e2e-node-noaddr' | cut -d' ' -f2)"
else
    bad "repeated refusals for one node: want one Event with series.count >= 2, got (events, count) $(events_on_pvc AttachRefused 'e2e-node-noaddr')"
fi
k delete volumeattachment e2e-va-noaddr --wait=false >/dev/null
wait_until 60 gone volumeattachment e2e-va-noaddr || bad "VolumeAttachment e2e-va-noaddr still there"

# --- delete the PVC: the volume and the PV go
k -n app delete pvc data --wait=false >/dev/null
acting "pvc-protection controller: no pod uses app/data, lift its finalizer"
k -n app patch pvc data --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null
if wait_until 30 gone -n app pvc data; then ok "PVC app/data deleted"; else bad "PVC app/data still there"; fi
acting "PV controller: $pv is Released"
k patch pv "$pv" --subresource=status --type=merge -p '{"status":{"phase":"Released"}}' >/dev/null
if wait_until 60 bash -c "[ ! -e '$data/volumes/$volume_id.img' ] && [ ! -e '$data/volumes/$volume_id.json' ]"; then
    ok "csi-provisioner deleted volume $volume_id (gone from the data dir)"
else
    logs provisioner-2.log controller-2.log
    bad "volume $volume_id still in $data/volumes"
fi
if wait_until 30 bash -c "[ -n \"\$('$kubectl' get pv '$pv' -o jsonpath='{.metadata.deletionTimestamp}' 2>/dev/null)\" ] || ! '$kubectl' get pv '$pv'"; then
    acting "pv-protection controller: lift $pv's finalizer"
    k patch pv "$pv" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || true
fi
if wait_until 30 gone pv "$pv"; then ok "PV $pv deleted (csi-provisioner deleted it after DeleteVolume; the test lifted pv-protection)"; else bad "PV $pv still there: $(jp pv "$pv" -o jsonpath='{.metadata.finalizers} {.status.phase}')"; fi
probe_is "nothing serves the deleted volume's port" 3 127.0.0.2
if kill -0 "$controller_pid" 2>/dev/null; then ok "nbd-csi-controller still running"; else bad "nbd-csi-controller exited"; fi

echo "e2e: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
