#!/usr/bin/env bash
# Cluster mode end to end (issue 12, deliverable 5) on a real kube-apiserver
# and etcd on 127.0.0.1, everything as processes (no pods):
#   - from `helm template --set storage.mode=cluster`: the CRDs, CSIDriver,
#     StorageClass, ServiceAccounts, RBAC and storage policy;
#   - three `nbd-csi-controller agent` processes, storage-1..3, listening on
#     127.0.1.1..3, each on its own tmpfs of 64, 128 and 192 MiB (so their
#     free space differs) with a token of the chart's storage ServiceAccount
#     bound to a pod object on its node, and the export key the controller put in its Secret, as a storage node
#     mounts it; their Node objects carry those addresses;
#   - the controller with --storage-mode cluster and the chart's controller
#     ServiceAccount token, and the real csi-provisioner and csi-attacher;
#   - kube-controller-manager with only the PV binder and the PV/PVC
#     protection controllers, so PVCs bind as in a cluster.
# Checks: 30 PVCs bind and spread over the agents by free space; a PVC no
# agent can hold stays Pending with a ProvisioningFailed Event saying
# ResourceExhausted while a small one binds; a clone lands on its source's
# storage node; a VolumeAttachment to a Node at 127.0.0.1 makes the export
# readable and writable there (nbdinfo, qemu-io), one of the same volume to
# a second Node is refused with an AttachRefused Event on the PVC, and
# deleting the first closes the export;
# SIGKILL of that volume's agent during qemu-io writes, restart: the same
# nbdUri serves again and the data is intact (qemu-img compare with a
# reference image); SIGKILL of the controller during a storm of 20 PVCs,
# restart: every PVC Bound, one NbdVolume per PV, no object without a PV
# and no agent record without an object.
# Certificates (issue 16): the controller runs the built-in issuer with a
# 45 s lifetime: it creates the CA Secret and a server certificate Secret
# per NbdStorageNode and a client certificate Secret per CSINode listing the
# driver; storage-1's agent and a node plugin (`nbd-csi-node serve` for worker-a,
# the node's ServiceAccount) write theirs into their --tls-dir; nbdinfo
# with the node's files reads an export `serve-file --tls required` serves
# with an agent's files; within the lifetime the certificates are renewed
# and the files follow; the CA survives the controller's SIGKILL. Then the
# controller's cert-manager mode against cert-manager's CRDs (from its Go
# module; cert-manager itself is not run): the chart's Issuers and CA
# Certificate apply strictly, and the controller's Certificates carry the
# names, usages and issuer each holder needs.
# TLS: only storage-1 follows its server certificate Secret (the others
# are issued one but are not given --tls-dir) and says so in its NbdStorageNode; a PVC of a StorageClass with
# tls: required lands there though it has the least room, its
# VolumeAttachment's nbdUri is nbds://, libnbd's nbdinfo and nbdsh read and
# write it with worker-a's certificate (tls-certificates=DIR) while a
# plaintext nbdinfo is refused and worker-b's certificate is not admitted.
# No kubelet or attach/detach controller runs: the test creates the Nodes
# and CSINodes and the VolumeAttachment, and restarts the sidecars after the
# controller's SIGKILL (kubelet would restart the pod's containers); each
# such step is printed as "(acting as ...)". Needs root (tmpfs mounts),
# nbdinfo, nbdsh, qemu-io, qemu-img and openssl.
# NBD_CSI_CONTROLLER=path uses that controller binary instead of building one.
set -uo pipefail
cd "$(dirname "$0")/../.."
. tests/k8s/tools.sh
. tests/k8s/cluster.sh
. tests/k8s/certs_case.sh
. tests/k8s/pki.sh

ensure_helm
ensure_csi_sidecars
controller_bin=$(controller_binary) || exit 1
driver=nbd.csi.dev
ns=nbd-csi
MIB=1048576

cluster_init nbd-csi-scale-out
agent_disks_init nbd-csi-scale-out
cluster_start
k() { "$kubectl" "$@"; }

# --- the chart's objects for storage.mode=cluster
cluster_mode_objects || exit 1
k create namespace app >/dev/null

# --- kube-controller-manager: PV binding and the protection finalizers
"$TOOLS_BIN/kube-controller-manager" --kubeconfig "$KUBECONFIG" --leader-elect=false \
    --controllers=persistentvolume-binder-controller,persistentvolume-protection-controller,persistentvolumeclaim-protection-controller \
    --bind-address 127.0.0.1 --secure-port "$(free_port)" --pvclaimbinder-sync-period=2s \
    --authentication-skip-lookup --authorization-always-allow-paths=/healthz >"$work/kcm.log" 2>&1 &
kcm_pid=$!
pids+=("$kcm_pid")

# --- Nodes: three storage nodes and a consumer at 127.0.0.1
acting "kubelet: Node objects (and a CSINode for the consumer)"
agents=(storage-1 storage-2 storage-3)
declare -A agent_addr=([storage-1]=127.0.1.1 [storage-2]=127.0.1.2 [storage-3]=127.0.1.3)
declare -A agent_mib=([storage-1]=64 [storage-2]=128 [storage-3]=192)
declare -A agent_pid
for a in "${agents[@]}"; do cluster_node "$a" "${agent_addr[$a]}" ""; done
cluster_node worker-a 127.0.0.1 "$driver"
apiVersion: storage.k8s.io/v1
kind: CSINode
metadata: {name: worker-a}
spec:
  drivers:
    - {name: $driver, nodeID: worker-a}
EOF

# --- the controller (it creates the export-key Secret and issues the
# certificates) and the sidecars
socket=$work/csi.sock
tls_prefix=nbd-csi
cert_lifetime=45
controller_tls_args=(--tls-issuer builtin --tls-secret-prefix "$tls_prefix" --tls-cert-lifetime "${cert_lifetime}s")
sidecar_args=(--kubeconfig "$work/controller.kubeconfig" --csi-address "$socket" --leader-election=false
    --timeout=60s --retry-interval-max=5s --v=4)
start_sidecars() { # LOG-SUFFIX
    "$TOOLS_BIN/csi-provisioner" "${sidecar_args[@]}" --extra-create-metadata --default-fstype=ext4 \
        >"$work/provisioner$1.log" 2>&1 &
    sidecar_pids=($!)
    "$TOOLS_BIN/csi-attacher" "${sidecar_args[@]}" >"$work/attacher$1.log" 2>&1 &
    sidecar_pids+=($!)
    pids+=("${sidecar_pids[@]}")
    sleep 2
    kill -0 "${sidecar_pids[@]}" 2>/dev/null
}
if start_controller controller.log; then
    ok "nbd-csi-controller --storage-mode cluster serving CSI on $socket"
else
    logs controller.log
    bad "nbd-csi-controller did not start"
    exit 1
fi
start_sidecars "" || { logs provisioner.log attacher.log; bad "a sidecar exited at start"; exit 1; }
ok "csi-provisioner $EXTERNAL_PROVISIONER_VERSION and csi-attacher $EXTERNAL_ATTACHER_VERSION running"
mount_export_key || exit 1

# --- certificates: the controller's issuer makes the CA and every agent's
# server certificate; storage-1 alone follows its Secret into --tls-dir, so
# volumes that require TLS can only go there
agent_tls_sync[storage-1]=1

# --- the agents, each on its own tmpfs
port_base=$((24000 + RANDOM % 4000))
start_agents || exit 1

certs_issued_and_renewed
# Client certificates for worker-a and worker-b (each its node name), signed
# with the issuer's CA (its key read from the CA Secret), in --tls-dir's and
# libnbd's layouts.
pki=$work/pki
mkdir -p "$pki/ca" && cp "$work/ca.crt" "$work/ca.key" "$pki/ca/"
if pki_issue "$pki/ca" "$pki/worker-a" worker-a DNS:worker-a clientAuth &&
    pki_issue "$pki/ca" "$pki/worker-b" worker-b DNS:worker-b clientAuth; then
    ok "openssl signed worker-a's and worker-b's client certificates with the issuer's CA"
else
    bad "openssl could not make the client certificates"
fi

# --- PVCs and their volumes
pvc() { # NAME SIZE [DATASOURCE-PVC [STORAGECLASS]]
    local source=""
    [ -n "${3:-}" ] && source="  dataSource: {kind: PersistentVolumeClaim, name: $3}"
    cat <<EOF
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1, namespace: app}
spec:
  storageClassName: ${4:-nbd}
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: $2}}
$source
EOF
}
phases() { # PVC...: their phases, one word each
    local p
    for p in "$@"; do jp -n app pvc "$p" -o jsonpath='{.status.phase}'; echo; done
}
# (grep without -q: under pipefail an early exit would fail phases with SIGPIPE)
all_bound() { [ -z "$(phases "$@" | grep -vx Bound)" ]; }
# placements: "PVC VOLUME-ID STORAGE-NODE" for every PVC of app ("-" where
# there is none yet), from one list of each kind.
placements() {
    python3 - <(k get -n app pvc -o json) <(k get pv -o json) <(k get nbdvolumes -o json) <<'PY'
import json, sys
pvcs, pvs, volumes = (json.load(open(f))["items"] for f in sys.argv[1:])
handle = {pv["metadata"]["name"]: pv["spec"].get("csi", {}).get("volumeHandle", "-") for pv in pvs}
node = {v["metadata"]["name"]: v["spec"]["storageNode"] for v in volumes}
for pvc in pvcs:
    volume = handle.get(pvc["spec"].get("volumeName", ""), "-")
    print(pvc["metadata"]["name"], volume, node.get(volume, "-"))
PY
}
volume_of() { placements | awk -v p="$1" '$1 == p {print $2}'; }
node_of() { placements | awk -v p="$1" '$1 == p {print $3}'; }
# VolumeAttachments, as the attach/detach controller would make them.
add_va() { # NAME PVC [NODE, default worker-a]
    volume_attachment "$1" "$(jp -n app pvc "$2" -o jsonpath='{.spec.volumeName}')" "${3:-worker-a}"
}
attached() { [ "$(jp volumeattachment "$1" -o jsonpath='{.status.attached}')" = true ]; }
uri_of() { jp volumeattachment "$1" -o jsonpath='{.status.attachmentMetadata.nbdUri}'; }

# 30 PVCs of 8 MiB: room is free space minus what is already placed, so
# the agents fill up in proportion to their free space.
spread_pvcs=()
for i in $(seq -w 1 30); do spread_pvcs+=("spread-$i"); done
for p in "${spread_pvcs[@]}"; do pvc "$p" 8Mi; done | k create -f - >/dev/null
if wait_until 180 all_bound "${spread_pvcs[@]}"; then
    ok "30 PVCs of 8Mi Bound (kube-controller-manager bound them to the PVs csi-provisioner created)"
else
    logs provisioner.log controller.log kcm.log
    bad "not all 30 PVCs Bound within 180s: $(phases "${spread_pvcs[@]}" | sort | uniq -c | paste -sd' ')"
fi
declare -A spread=()
while read -r p _ n; do
    [[ $p == spread-* ]] && spread[$n]=$((${spread[$n]:-0} + 1))
done < <(placements)
spread_line=$(for a in "${agents[@]}"; do printf '%s (%s MiB)=%s ' "$a" "${agent_mib[$a]}" "${spread[$a]:-0}"; done)
echo "   spread of 30 volumes by NbdVolume spec.storageNode: $spread_line"
if [ "${spread[storage-1]:-0}" -lt "${spread[storage-2]:-0}" ] && [ "${spread[storage-2]:-0}" -lt "${spread[storage-3]:-0}" ] &&
    [ "${spread[storage-1]:-0}" -ge 1 ] && [ $((${spread[storage-1]:-0} + ${spread[storage-2]:-0} + ${spread[storage-3]:-0})) = 30 ]; then
    ok "the spread follows free space: $spread_line"
else
    bad "the spread does not follow free space (64 < 128 < 192 MiB): $spread_line ${spread[-]:+none=${spread[-]}: $(placements | grep -E '^spread-.* -' | paste -sd' ')}"
fi

# --- no agent can hold 256 MiB; a small PVC still binds
k create -f - >/dev/null < <(pvc too-big 256Mi; pvc small-after 8Mi)
too_big_event() {
    k get events -n app --field-selector involvedObject.name=too-big,reason=ProvisioningFailed \
        -o jsonpath='{.items[*].message}' | grep -iE 'ResourceExhausted|RESOURCE_EXHAUSTED' >/dev/null
}
if wait_until 60 too_big_event; then
    ok "PVC too-big (256Mi): ProvisioningFailed Event: $(k get events -n app --field-selector involvedObject.name=too-big,reason=ProvisioningFailed -o jsonpath='{.items[0].message}' | cut -c1-220)"
else
    bad "PVC too-big: no ProvisioningFailed Event naming ResourceExhausted: $(k get events -n app --field-selector involvedObject.name=too-big -o jsonpath='{.items[*].message}' | cut -c1-300)"
fi
if wait_until 60 all_bound small-after; then
    ok "PVC small-after (8Mi) Bound meanwhile, on $(node_of small-after)"
else
    bad "PVC small-after: $(phases small-after)"
fi
check "PVC too-big stays Pending" Pending "$(phases too-big)"
k -n app delete pvc too-big --wait=false >/dev/null

# --- a clone lands on its source's storage node (pick a source not on the
# node with the most room, so that placement alone would not put it there)
source_pvc=
source_pvc=$(placements | awk '$1 ~ /^spread-/ && $3 == "storage-1" {print $1; exit}')
source_pvc=${source_pvc:-spread-01}
k create -f - >/dev/null < <(pvc clone-1 8Mi "$source_pvc")
if wait_until 60 all_bound clone-1; then
    check "clone of $source_pvc lands on its source's storage node" "$(node_of "$source_pvc")" "$(node_of clone-1)"
    check "the clone's NbdVolume names its source" "$(volume_of "$source_pvc")" "$(jp nbdvolume "$(volume_of clone-1)" -o jsonpath='{.spec.source.volume}')"
else
    logs provisioner.log controller.log
    bad "clone-1 of $source_pvc: $(phases clone-1)"
fi

# --- TLS: a StorageClass with tls: required; only storage-1 can serve it
check "only storage-1 reports it serves TLS (NbdStorageNode status.servesTls)" "true false false" \
    "$(for a in "${agents[@]}"; do jp nbdstoragenode "$a" -o jsonpath='{.status.servesTls}'; echo; done | paste -sd' ')"
k apply -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: nbd-tls}
provisioner: $driver
parameters: {tls: required}
EOF
k create -f - >/dev/null < <(pvc tls-1 8Mi "" nbd-tls)
if wait_until 60 all_bound tls-1; then
    check "the tls: required PVC lands on storage-1, the one agent with certificates (least room)" storage-1 "$(node_of tls-1)"
    check "its NbdVolume records the mode" required "$(jp nbdvolume "$(volume_of tls-1)" -o jsonpath='{.spec.tls}')"
    acting "attach/detach controller: VolumeAttachment of tls-1 to worker-a"
    add_va va-tls tls-1
    if wait_until 60 attached va-tls; then
        uri=$(uri_of va-tls)
        if [[ $uri =~ ^nbds://${agent_addr[storage-1]//./\\.}:[0-9]+/[0-9a-f]{64}$ ]]; then
            ok "VolumeAttachment va-tls attached: nbdUri nbds://${agent_addr[storage-1]}:<port>/<64 hex>"
        else
            bad "VolumeAttachment va-tls: nbdUri '$uri', want nbds:// on storage-1"
        fi
        refused_client() { # WHO URI: nbdinfo with URI must learn nothing, not even the size
            local out
            if out=$(nbdinfo --size "$2" 2>&1); then
                bad "$1 read the size of a TLS-required export: $out"
            else
                ok "$1 is refused: $(tr '\n' ' ' <<<"$out" | cut -c1-160)"
            fi
        }
        # Plaintext (the same export as nbd://): refused, nothing learnt.
        refused_client "a plaintext nbdinfo" "${uri/#nbds:/nbd:}"
        with_a="$uri?tls-certificates=$pki/worker-a"
        check "nbdinfo over TLS with worker-a's certificate reads the size" $((8 * MIB)) "$(nbdinfo --size "$with_a" 2>&1)"
        # libnbd wants a URI naming local files (tls-certificates) allowed
        # through its API; Debian's python3 has the nbd module, and the
        # repository's nbd/ directory must not shadow it (hence $work).
        if out=$(cd "$work" && URI=$with_a PATH=/usr/bin:$PATH nbdsh -c '
import os
h.set_uri_allow_local_file(True)
h.connect_uri(os.environ["URI"])
data = bytes([0x6b]) * 65536
h.pwrite(data, 1 << 20)
h.flush()
assert h.pread(65536, 1 << 20) == data
print("wrote and read back 64 KiB")' 2>&1); then
            ok "nbdsh over TLS with worker-a's certificate: $out"
        else
            bad "nbdsh over TLS with worker-a's certificate: $out"
        fi
        refused_client "nbdinfo with worker-b's certificate (same CA, another node)" "$uri?tls-certificates=$pki/worker-b"
    else
        logs attacher.log controller.log agent-storage-1.log
        bad "VolumeAttachment va-tls not attached within 60s: $(jp volumeattachment va-tls -o jsonpath='{.status}')"
    fi
    k delete volumeattachment va-tls --wait=false >/dev/null
    wait_until 60 gone volumeattachment va-tls || bad "VolumeAttachment va-tls still there"
else
    logs provisioner.log controller.log
    bad "PVC tls-1: $(phases tls-1): $(k get events -n app --field-selector involvedObject.name=tls-1 -o jsonpath='{.items[*].message}' | cut -c1-300)"
fi

# --- attach to worker-a (127.0.0.1): served, then closed on detach
acting "attach/detach controller: VolumeAttachment of a PV to worker-a"
attach() { # VA PVC: attached, with an nbdUri of the volume's storage node
    local node uri
    add_va "$1" "$2"
    if ! wait_until 60 attached "$1"; then
        logs attacher.log controller.log
        bad "VolumeAttachment $1 not attached within 60s: $(jp volumeattachment "$1" -o jsonpath='{.status}')"
        return 1
    fi
    node=$(node_of "$2")
    uri=$(uri_of "$1")
    if [[ $uri =~ ^nbd://${agent_addr[$node]//./\\.}:[0-9]+/[0-9a-f]{64}$ ]]; then
        ok "VolumeAttachment $1 attached: nbdUri nbd://${agent_addr[$node]}:<port>/<64 hex> of $2's storage node $node"
    else
        bad "VolumeAttachment $1: nbdUri '$uri', want one on $node (${agent_addr[$node]})"
        return 1
    fi
}
io_pvc=spread-02
if attach va-io "$io_pvc"; then
    uri=$(uri_of va-io)
    size=$(nbdinfo --size "$uri" 2>&1)
    check "nbdinfo from 127.0.0.1 reads the export's size" $((8 * MIB)) "$size"
    if out=$(qemu-io -f raw "$uri" -c "write -P 0x3c 0 1M" -c "flush" -c "read -P 0x3c 0 1M" 2>&1) && ! grep -qiE 'fail|error' <<<"$out"; then
        ok "qemu-io from 127.0.0.1 writes and reads back 1 MiB"
    else
        bad "qemu-io on $io_pvc: $out"
    fi
    # A second node while the single-node volume is attached to worker-a:
    # refused, and the refusal is an Event on the PVC.
    acting "kubelet and attach/detach controller: Node worker-b, its CSINode, a VolumeAttachment of $io_pvc to it"
    cluster_node worker-b 127.0.0.5 "$driver"
    add_va va-refused "$io_pvc" worker-b
    refusal() { # the AttachRefused Warning on the PVC, naming worker-b
        k get events.events.k8s.io -n app -o json | python3 -c '
import json, re, sys
for e in json.load(sys.stdin)["items"]:
    r = e.get("regarding") or {}
    if (r.get("kind"), r.get("name")) == ("PersistentVolumeClaim", sys.argv[1]) and e.get("reason") == "AttachRefused" \
            and e.get("type") == "Warning" and re.search("worker-b.*single-node", e.get("note", "")):
        print(e["note"]); sys.exit(0)
sys.exit(1)' "$io_pvc"
    }
    if wait_until 60 refusal; then
        ok "a VolumeAttachment of $io_pvc to worker-b is refused: Event AttachRefused on the PVC: $(refusal | cut -c1-140)"
    else
        logs attacher.log controller.log
        bad "no AttachRefused Event on $io_pvc for worker-b: $(jp volumeattachment va-refused -o jsonpath='{.status}')"
    fi
    k delete volumeattachment va-refused --wait=false >/dev/null
    k delete volumeattachment va-io --wait=false >/dev/null
    if wait_until 60 gone volumeattachment va-io; then ok "VolumeAttachment va-io deleted (csi-attacher unpublished)"; else bad "VolumeAttachment va-io still there"; fi
    out=$(python3 tests/k8s/nbd_probe.py 127.0.0.1 "$uri" 2>&1)
    status=$?
    if [ "$status" = 2 ] || [ "$status" = 3 ]; then ok "after detach the export is closed to 127.0.0.1: $out"; else bad "after detach: exit $status: $out"; fi
fi

# --- SIGKILL of an agent during qemu-io writes, restart
kill_pvc=clone-1
kill_node=$(node_of "$kill_pvc")
if [ -n "$kill_node" ] && attach va-kill "$kill_pvc"; then
    uri=$(uri_of va-kill)
    if out=$(qemu-io -f raw "$uri" -c "write -P 0xa5 0 2M" -c "flush" 2>&1) && ! grep -qiE 'fail|error' <<<"$out"; then
        ok "qemu-io wrote 2 MiB of 0xa5 to $kill_pvc on $kill_node"
    else
        bad "qemu-io first write: $out"
    fi
    # 96 writes of 64 KiB after it, 30 ms apart, each reported when done.
    cmds=()
    for i in $(seq 0 95); do cmds+=(-c "write -P 0x5a $((2 * MIB + i * 65536)) 64k" -c "sleep 30"); done
    stdbuf -oL qemu-io -f raw "$uri" "${cmds[@]}" >"$work/writes.txt" 2>&1 &
    writer=$!
    wait_until 30 bash -c "[ \$(grep -c '^wrote' '$work/writes.txt') -ge 20 ]" || bad "qemu-io wrote fewer than 20 blocks in 30 s"
    kill -KILL "${agent_pid[$kill_node]}"
    wait "${agent_pid[$kill_node]}" 2>/dev/null
    done_writes=$(grep -c '^wrote' "$work/writes.txt")
    for _ in $(seq 100); do kill -0 "$writer" 2>/dev/null || break; sleep 0.1; done
    kill "$writer" 2>/dev/null
    wait "$writer" 2>/dev/null
    if grep -qiE 'fail|error' "$work/writes.txt"; then
        ok "SIGKILL of agent $kill_node after $done_writes of 96 writes: qemu-io's next write failed ($(grep -ciE 'fail|error' "$work/writes.txt") failed)"
    else
        bad "SIGKILL of agent $kill_node: qemu-io saw no failure: $(tail -n 3 "$work/writes.txt")"
    fi
    start_agent "$kill_node"
    if wait_until 60 nbdinfo --size "$uri"; then
        ok "agent $kill_node restarted: the same nbdUri serves again"
    else
        logs "agent-$kill_node.log"
        bad "the nbdUri is not served within 60s of the restart: $(nbdinfo --size "$uri" 2>&1)"
    fi
    # The reference: 0xa5 over 2 MiB, then every block qemu-io reported
    # written; the one write in flight at the kill may or may not have
    # landed, so the reference takes that block from the export.
    qemu-img convert -f raw -O raw "$uri" "$work/after.raw" 2>"$work/convert.txt" || bad "qemu-img convert: $(cat "$work/convert.txt")"
    python3 - "$work/writes.txt" "$work/after.raw" "$work/reference.raw" <<'PY'
import re, sys
writes, after, reference = sys.argv[1:]
MIB = 1 << 20
image = bytearray(8 * MIB)
image[0:2 * MIB] = b"\xa5" * (2 * MIB)
done = [int(m.group(1)) for m in re.finditer(r"^wrote 65536/65536 bytes at offset (\d+)", open(writes).read(), re.M)]
for offset in done:
    image[offset:offset + 65536] = b"\x5a" * 65536
in_flight = 2 * MIB + len(done) * 65536
if in_flight < 8 * MIB:
    image[in_flight:in_flight + 65536] = open(after, "rb").read()[in_flight:in_flight + 65536]
open(reference, "wb").write(image)
PY
    if out=$(qemu-img compare -f raw -F raw "$work/reference.raw" "$uri" 2>&1); then
        ok "qemu-img compare: the export equals the reference (2 MiB of 0xa5 and the $done_writes acknowledged writes): $out"
    else
        bad "qemu-img compare after the agent's restart: $out"
    fi
    check "the NbdVolume is Available again after the restart" Available "$(jp nbdvolume "$(volume_of "$kill_pvc")" -o jsonpath='{.status.phase}')"
    k delete volumeattachment va-kill --wait=false >/dev/null
    wait_until 60 gone volumeattachment va-kill || bad "VolumeAttachment va-kill still there"
else
    bad "no storage node for $kill_pvc to kill"
fi

# --- SIGKILL of the controller during a storm of 20 CreateVolume
storm_pvcs=()
for i in $(seq -w 1 20); do storm_pvcs+=("storm-$i"); done
storm_volumes() { k get nbdvolumes -o jsonpath='{range .items[*]}{.spec.requestName}{"\n"}{end}' | grep -c .; }
before=$(storm_volumes)
for p in "${storm_pvcs[@]}"; do pvc "$p" 8Mi; done | k create -f - >/dev/null
# Kill as soon as the storm is under way: the first of its NbdVolumes made,
# the other calls in flight (polled every 0.1 s, at most 60 s).
for _ in $(seq 600); do
    [ "$(k get nbdvolumes -o name | wc -l)" -gt "$before" ] && break
    sleep 0.1
done
kill -KILL "$controller_pid"
wait "$controller_pid" 2>/dev/null
made=$(($(storm_volumes) - before))
ok "SIGKILL of the controller with $made of 20 storm volumes made ($(phases "${storm_pvcs[@]}" | grep -cx Bound) of those PVCs Bound)"
# csi-provisioner and csi-attacher exit when they lose the socket; kubelet
# would restart the pod's containers.
for pid in "${sidecar_pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
done
acting "kubelet: restart the controller pod's containers"
if start_controller controller-2.log && start_sidecars -2; then
    ok "controller and sidecars restarted"
else
    logs controller-2.log provisioner-2.log
    bad "restart after SIGKILL"
fi
if wait_until 180 all_bound "${storm_pvcs[@]}"; then
    ok "all 20 storm PVCs Bound after the restart"
else
    logs provisioner-2.log controller-2.log
    bad "storm PVCs not all Bound within 180s: $(phases "${storm_pvcs[@]}" | sort | uniq -c | paste -sd' ')"
fi
# No duplicate: one NbdVolume per PV (by its CSI request name, the PV name),
# no NbdVolume without a PV, no agent record without an NbdVolume.
k get pv -o jsonpath='{range .items[*]}{.metadata.name} {.spec.csi.volumeHandle}{"\n"}{end}' | sort >"$work/pvs.txt"
k get nbdvolumes -o jsonpath='{range .items[*]}{.spec.requestName} {.metadata.name}{"\n"}{end}' | sort >"$work/objects.txt"
mismatch=$(records_vs_objects)
echo "   $(wc -l <"$work/pvs.txt") PVs, $(wc -l <"$work/objects.txt") NbdVolumes, agent records: $(for a in "${agents[@]}"; do printf '%s=%s ' "$a" "$(grep -c "@$a$" "$work/agent-records.txt")"; done)"
dups=$(cut -d' ' -f1 "$work/objects.txt" | uniq -d | paste -sd' ')
check "no duplicate: one NbdVolume per request name" "" "$dups"
check "every PV has its NbdVolume and every NbdVolume its PV (same names and handles)" "" \
    "$(diff "$work/pvs.txt" "$work/objects.txt" | grep '^[<>]' | paste -sd' ')"
check "every agent record has its NbdVolume on that storage node and every NbdVolume its record (each agent's data dir listed)" "" \
    "$mismatch"
check "every NbdVolume Available" "" "$(k get nbdvolumes -o jsonpath='{range .items[*]}{.metadata.name}={.status.phase}{"\n"}{end}' | grep -v '=Available$' | paste -sd' ')"
quarantined=$(find "$disks" -path '*quarantine*' -type f 2>/dev/null | wc -l)
check "nothing quarantined by the agents" 0 "$quarantined"

certs_ca_kept
certs_cert_manager
certs_pod_certificates

for a in "${agents[@]}"; do
    if kill -0 "${agent_pid[$a]}" 2>/dev/null; then ok "agent $a still running"; else bad "agent $a exited: $(tail -n 5 "$work/agent-$a.log")"; fi
done
if kill -0 "$node_pid" 2>/dev/null; then ok "the node plugin still running"; else bad "the node plugin exited: $(tail -n 5 "$work/node.log")"; fi
if kill -0 "$controller_pid" 2>/dev/null; then ok "nbd-csi-controller still running"; else bad "nbd-csi-controller exited"; fi
echo "scale-out: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
