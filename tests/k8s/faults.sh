#!/usr/bin/env bash
# Bad input and faults in cluster mode (issue 12, deliverable 6) on a real
# kube-apiserver and etcd on 127.0.0.1, everything as processes (no pods):
# the chart's CRDs and RBAC for storage.mode=cluster, three
# `nbd-csi-controller agent`s, storage-1..3 on 127.0.1.1..3, each on its
# own tmpfs of 64, 128 and 192 MiB, and the controller in cluster mode with
# a short --storage-timeout, called on its socket as csi-provisioner and
# csi-attacher call it (the `nbd-csi-controller volume` CLI, and Python
# grpcio for a bare ControllerPublishVolume).
# Checks:
#   - the API server unreachable, first stopped (SIGSTOP: connections are
#     accepted and never answered), then killed (connections refused):
#     CreateVolume, DeleteVolume and ControllerPublishVolume each fail with
#     UNAVAILABLE within the storage timeout, and change nothing; the API
#     server back, the retry of the CreateVolume succeeds with the volume id
#     of its name, one NbdVolume, every agent record with its object and
#     every object with its record;
#   - objects edited by hand, the agents serving others meanwhile: a size no
#     storage node can hold (a condition and an Event, the volume served on
#     at its size), a status written by hand (written back), a volume moved
#     to another storage node past the CRD's rule (no empty volume made
#     there, a condition and an Event; moved back, served again), an object
#     naming a storage node no agent runs (left alone; a publish of it
#     UNAVAILABLE, saying so), an object deleted past its agent's finalizer (its image
#     quarantined intact, with an Event);
#   - an agent SIGSTOPped until its Lease expires gets no new volume while
#     the others do, and a publish of a volume on it is UNAVAILABLE naming
#     the expired Lease; continued, it renews the Lease and is chosen again.
# No kubelet runs: the test creates the Nodes and mounts the export key
# where a storage node would ("acting as ..."). Needs root (tmpfs mounts),
# nbdinfo and qemu-io.
# NBD_CSI_CONTROLLER=path uses that controller binary instead of building one.
set -uo pipefail
cd "$(dirname "$0")/../.."
. tests/k8s/tools.sh
. tests/k8s/cluster.sh

ensure_helm
ensure_grpcio || exit 1
controller_bin=$(controller_binary) || exit 1
driver=nbd.csi.dev
ns=nbd-csi
MIB=1048576
# Short, so that every wait of the controller ends within seconds; a call
# must fail within it and a few seconds of slack.
storage_timeout=5
limit_ms=$(((storage_timeout + 5) * 1000))

cluster_init nbd-csi-faults
agent_disks_init nbd-csi-faults
cluster_start
k() { "$kubectl" "$@"; }
cluster_mode_objects || exit 1

agents=(storage-1 storage-2 storage-3)
declare -A agent_addr=([storage-1]=127.0.1.1 [storage-2]=127.0.1.2 [storage-3]=127.0.1.3)
declare -A agent_mib=([storage-1]=64 [storage-2]=128 [storage-3]=192)
declare -A agent_pid
acting "kubelet: Node objects"
for a in "${agents[@]}"; do cluster_node "$a" "${agent_addr[$a]}" ""; done
cluster_node worker-a 127.0.0.1 ""

socket=$work/csi.sock
if start_controller controller.log; then
    ok "nbd-csi-controller --storage-mode cluster --storage-timeout $storage_timeout serving CSI on $socket"
else
    logs controller.log
    bad "nbd-csi-controller did not start"
    exit 1
fi
mount_export_key || exit 1
port_base=$((28000 + RANDOM % 2000))
start_agents || exit 1

# --- CSI calls, as the sidecars make them
csi() { # ARGS...: the controller's CLI on its socket
    "$controller_bin" "$@" --endpoint "unix://$socket" --timeout $((storage_timeout * 4))
}
publish_rpc() { # VOLUME NODE: ControllerPublishVolume alone (block, single-node writer), as csi-attacher sends it
    PYTHONPATH=$GRPCIO_DIR python3 - "$socket" "$1" "$2" $((storage_timeout * 4)) <<'PY'
import sys

import grpc

socket, volume, node, timeout = sys.argv[1:]


def field(number, payload):
    """A length-delimited protobuf field."""
    out, n = bytearray([number << 3 | 2]), len(payload)
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out) + bytes([n]) + payload


# VolumeCapability: block {}, access_mode {mode: SINGLE_NODE_WRITER}.
capability = field(1, b"") + field(3, b"\x08\x01")
request = field(1, volume.encode()) + field(2, node.encode()) + field(3, capability)
with grpc.insecure_channel(f"unix:{socket}") as channel:
    rpc = channel.unary_unary("/csi.v1.Controller/ControllerPublishVolume")
    try:
        rpc(request, timeout=float(timeout))
    except grpc.RpcError as e:
        sys.exit(f"ControllerPublishVolume failed: {e.code().name}: {e.details()}")
print("ControllerPublishVolume: OK")
PY
}
volume_id_of() { # REQUEST-NAME: the id the controller derives from it
    python3 -c 'import hashlib, sys; print("vol-" + hashlib.sha256(sys.argv[1].encode()).hexdigest()[:32])' "$1"
}
json_field() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
node_of() { jp nbdvolume "$1" -o jsonpath='{.spec.storageNode}'; }
phase_of() { jp nbdvolume "$1" -o jsonpath='{.status.phase}'; }

# timed OUT COMMAND...: runs COMMAND; OUT gets "STATUS MILLISECONDS", OUT.txt its output.
timed() {
    local out=$1 start status
    shift
    start=$(date +%s%N)
    "$@" >"$out.txt" 2>&1
    status=$?
    echo "$status $((($(date +%s%N) - start) / 1000000))" >"$out"
}
# unavailable DESCRIPTION OUT: the call timed into OUT failed with
# UNAVAILABLE within $limit_ms.
unavailable() {
    local status ms said
    read -r status ms <"$2"
    said=$(tr '\n' ' ' <"$2.txt" | cut -c1-240)
    if [ "$status" -ne 0 ] && grep -qE 'failed: (Unavailable|UNAVAILABLE):' "$2.txt" && [ "$ms" -le "$limit_ms" ]; then
        ok "$1: UNAVAILABLE after $ms ms: $said"
    else
        bad "$1: exit $status after $ms ms (want UNAVAILABLE within $limit_ms ms): $said"
    fi
}
# during_outage WHAT: CreateVolume outage-1, DeleteVolume and
# ControllerPublishVolume of $keep, at once (the outage stays short).
during_outage() {
    timed "$work/create" csi volume create outage-1 --size 8M --block &
    local calls=($!)
    timed "$work/delete" csi volume delete "$keep" &
    calls+=($!)
    timed "$work/publish" publish_rpc "$keep" worker-a &
    calls+=($!)
    wait "${calls[@]}"
    unavailable "$1: CreateVolume outage-1" "$work/create"
    unavailable "$1: DeleteVolume $keep" "$work/delete"
    unavailable "$1: ControllerPublishVolume $keep to worker-a" "$work/publish"
}
keep_state() { jp nbdvolume "$keep" -o jsonpath='generation={.metadata.generation} deleting={.metadata.deletionTimestamp} publishedTo={.spec.publishedTo} phase={.status.phase}'; }

# --- the API server unreachable
if csi volume create keep-1 --size 8M --block -o json >"$work/keep.json" 2>&1; then
    keep=$(json_field id <"$work/keep.json")
    ok "before the outage: CreateVolume keep-1 made $keep on $(node_of "$keep")"
else
    bad "CreateVolume keep-1: $(cat "$work/keep.json")"
    exit 1
fi
keep_before=$(keep_state)
outage_id=$(volume_id_of outage-1)
outage_start=$SECONDS

kill -STOP "$apiserver_pid"
during_outage "kube-apiserver stopped (SIGSTOP)"
kill -CONT "$apiserver_pid"
if apiserver_ready 60; then ok "kube-apiserver continued (SIGCONT) and ready"; else bad "kube-apiserver not ready after SIGCONT"; fi

kill -KILL "$apiserver_pid"
wait "$apiserver_pid" 2>/dev/null
during_outage "kube-apiserver killed (connection refused)"
apiserver_start
if apiserver_ready 120; then
    ok "kube-apiserver restarted on the same port and ready ($((SECONDS - outage_start)) s since the outage began)"
else
    tail -n 20 "$work/kube-apiserver.log" >&2
    bad "kube-apiserver did not come back"
    exit 1
fi

# Placement counts only agents whose Lease is current: wait for each
# agent's first renewal after the restart (every 10 s), as the sidecars'
# retries would.
renewed_since() { # NAME EPOCH-SECONDS: its Lease was renewed after EPOCH-SECONDS
    local at
    at=$(jp lease -n "$ns" "$1" -o jsonpath='{.spec.renewTime}')
    [ -n "$at" ] && [ "$(date -d "$at" +%s)" -gt "$2" ]
}
back=$(date +%s)
for a in "${agents[@]}"; do
    wait_until 30 renewed_since "$a" "$back" || bad "agent $a did not renew its Lease within 30 s of the API server's return"
done
if csi volume create outage-1 --size 8M --block -o json >"$work/retry.json" 2>&1; then
    check "the retry of CreateVolume outage-1 succeeds with the id of its name" "$outage_id" "$(json_field id <"$work/retry.json")"
else
    bad "the retry of CreateVolume outage-1: $(cat "$work/retry.json")"
fi
check "one NbdVolume for request outage-1" 1 \
    "$(k get nbdvolumes -o jsonpath='{range .items[*]}{.spec.requestName}{"\n"}{end}' | grep -cx outage-1)"
check "volume $keep unchanged by the calls during the outage" "$keep_before" "$(keep_state)"
check "every agent record has its NbdVolume on that storage node and every NbdVolume its record" "" "$(records_vs_objects)"
check "every NbdVolume Available" "" \
    "$(k get nbdvolumes -o jsonpath='{range .items[*]}{.metadata.name}={.status.phase}{"\n"}{end}' | grep -v '=Available$' | paste -sd' ')"
if uri=$(csi volume publish "$keep" --node worker-a 2>"$work/publish.txt") && [ "$(nbdinfo --size "$uri" 2>&1)" = $((8 * MIB)) ]; then
    ok "after the outage ControllerPublishVolume $keep works: nbdinfo reads its 8 MiB through the nbdUri"
else
    bad "ControllerPublishVolume $keep after the outage: $(cat "$work/publish.txt")"
fi
keep_node=$(node_of "$keep")
if csi volume unpublish "$keep" --node worker-a >"$work/unpublish.txt" 2>&1 && csi volume delete "$keep" >>"$work/unpublish.txt" 2>&1 &&
    gone nbdvolume "$keep" && [ ! -e "$disks/$keep_node/data/volumes/$keep.img" ]; then
    ok "after the outage $keep unpublished and deleted, its image with it"
else
    bad "unpublishing and deleting $keep after the outage: $(cat "$work/unpublish.txt")"
fi

# --- objects edited by hand; storage-3's agent stopped meanwhile, until its Lease expires
nbdvolume() { # ID STORAGE-NODE SIZE: an NbdVolume made with kubectl
    k create -f - >/dev/null <<VOLUME
apiVersion: nbd.csi.dev/v1alpha1
kind: NbdVolume
metadata: {name: $1}
spec: {storageNode: $2, requestName: by-hand-$1, sizeBytes: $3, accessType: Block}
VOLUME
}
available() { [ "$(phase_of "$1")" = Available ]; }
image() { echo "$disks/$2/data/volumes/$1.img"; } # ID NODE
event_about() { # NAME REASON: the note of the last Event of REASON about object NAME (namespace default)
    k get events -n default --field-selector "involvedObject.name=$1,reason=$2" -o jsonpath='{.items[-1:].message}' 2>/dev/null
}
condition() { # ID TYPE: "STATUS REASON: MESSAGE" of that condition
    jp nbdvolume "$1" -o jsonpath="{.status.conditions[?(@.type==\"$2\")].status} {.status.conditions[?(@.type==\"$2\")].reason}: {.status.conditions[?(@.type==\"$2\")].message}"
}

healthy=vol-000000000000000000000000000fa001
big=vol-000000000000000000000000000fa002
orphan=vol-000000000000000000000000000fa003
elsewhere=vol-000000000000000000000000000fa004
nbdvolume "$healthy" storage-1 $((4 * MIB))
nbdvolume "$big" storage-1 $((4 * MIB))
nbdvolume "$orphan" storage-3 $((4 * MIB))
for v in "$healthy" "$big" "$orphan"; do
    wait_until 30 available "$v" || bad "$v (made with kubectl on $(node_of "$v")) not Available: $(jp nbdvolume "$v" -o jsonpath='{.status}')"
done
if uri=$(csi volume publish "$healthy" --node worker-a 2>"$work/publish.txt") &&
    out=$(qemu-io -f raw "$uri" -c "write -P 0x5e 0 1M" -c "flush" 2>&1) && ! grep -qiE 'fail|error' <<<"$out"; then
    healthy_uri=$uri
    ok "$healthy on storage-1 published to worker-a, 1 MiB of 0x5e written through its nbdUri"
else
    bad "publishing and writing $healthy: $(cat "$work/publish.txt") $out"
fi
orphan_sum=$(sha256sum <"$(image "$orphan" storage-3)")

stopped=storage-3
kill -STOP "${agent_pid[$stopped]}"
ok "agent $stopped stopped (SIGSTOP): its Lease is no longer renewed"
# Its object deleted past its finalizer (the agent cannot act on it now):
# the object is gone and the agent never saw the deletion.
if k patch nbdvolume "$orphan" --type merge -p '{"metadata":{"finalizers":null}}' >/dev/null &&
    k delete nbdvolume "$orphan" --wait=false >/dev/null && wait_until 10 gone nbdvolume "$orphan"; then
    ok "$orphan on $stopped: its finalizer removed by hand and the object deleted"
else
    bad "deleting $orphan past its finalizer"
fi

# A size no storage node can hold: the agent refuses to grow it, says why
# in a condition and an Event, and keeps serving it at its size.
k patch nbdvolume "$big" --type merge -p "{\"spec\":{\"sizeBytes\":$((1 << 40))}}" >/dev/null || bad "growing $big by hand"
refused_growth() { condition "$big" Ready | grep -q '^False ResourceExhausted: '; }
if wait_until 30 refused_growth; then
    ok "$big grown by hand to 1 TiB: Ready $(condition "$big" Ready | cut -c1-160)"
else
    bad "$big grown to 1 TiB: conditions $(jp nbdvolume "$big" -o jsonpath='{.status}')"
fi
if wait_until 30 test -n "$(event_about "$big" ReconcileFailed)"; then
    ok "an Event on $big: $(event_about "$big" ReconcileFailed | cut -c1-160)"
else
    bad "no ReconcileFailed Event on $big: $(k get events -n default --field-selector "involvedObject.name=$big" -o jsonpath='{.items[*].reason}')"
fi
check "$big's image keeps its 4 MiB" $((4 * MIB)) "$(stat -c %s "$(image "$big" storage-1)" 2>&1)"
check "$big's status still says its served size" $((4 * MIB)) "$(jp nbdvolume "$big" -o jsonpath='{.status.sizeBytes}')"

# A status written by hand: the agent writes back what it serves.
healthy_port=$(jp nbdvolume "$healthy" -o jsonpath='{.status.port}')
k patch nbdvolume "$healthy" --subresource status --type merge \
    -p '{"status":{"phase":"Unavailable","port":1,"sizeBytes":1,"conditions":[{"type":"Ready","status":"False","reason":"ByHand","message":"written by hand","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}' \
    >/dev/null || bad "writing $healthy's status by hand"
rewritten() { [ "$(jp nbdvolume "$healthy" -o jsonpath='{.status.phase} {.status.port} {.status.sizeBytes} {.status.conditions[?(@.type=="Ready")].reason}')" = "Available $healthy_port $((4 * MIB)) Serving" ]; }
if wait_until 30 rewritten; then
    ok "$healthy's status written by hand (Unavailable, port 1): its agent wrote back Available on port $healthy_port, Ready Serving"
else
    bad "$healthy's status after a hand-written one: $(jp nbdvolume "$healthy" -o jsonpath='{.status}')"
fi

# A volume moved to another storage node past the schema's rule (as an
# object written before the rule existed could be): the CRD's rule lifted
# for the edit, then applied again. The new node's agent must not make an
# empty volume under the old data's name; the old node keeps the data.
moved=vol-000000000000000000000000000fa005
nbdvolume "$moved" storage-1 $((4 * MIB))
wait_until 30 available "$moved" || bad "$moved not Available on storage-1"
moved_port=$(jp nbdvolume "$moved" -o jsonpath='{.status.port}')
moved_sum=$(sha256sum <"$(image "$moved" storage-1)")
move() { # ID NODE: spec.storageNode changed with the CRD's rule lifted
    local status
    k patch crd nbdvolumes.nbd.csi.dev --type json -p \
        '[{"op":"remove","path":"/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/storageNode/x-kubernetes-validations"}]' \
        >/dev/null || return 1
    # The API server takes the new schema within moments.
    wait_until 30 k patch nbdvolume "$1" --type merge -p "{\"spec\":{\"storageNode\":\"$2\"}}"
    status=$?
    k apply --server-side --force-conflicts -f charts/nbd-csi/crds/nbd.csi.dev.yaml >/dev/null || return 1
    return "$status"
}
if move "$moved" storage-2; then ok "$moved moved by hand from storage-1 to storage-2 (the CRD's rule lifted meanwhile)"; else bad "moving $moved"; fi
refused_move() { condition "$moved" Ready | grep -q '^False FailedPrecondition: '; }
if wait_until 30 refused_move; then
    ok "$moved on storage-2, which stores no such volume: Ready $(condition "$moved" Ready | cut -c1-200)"
else
    bad "$moved moved to storage-2: status $(jp nbdvolume "$moved" -o jsonpath='{.status}')"
fi
if wait_until 30 test -n "$(event_about "$moved" ReconcileFailed)"; then
    ok "an Event on $moved: $(event_about "$moved" ReconcileFailed | cut -c1-120)"
else
    bad "no ReconcileFailed Event on $moved"
fi
check "storage-2 made no empty volume in its place" "" "$(ls "$disks/storage-2/data/volumes/" | grep "$moved")"
check "storage-1 keeps its image, intact (sha256)" "$moved_sum" "$(sha256sum <"$(image "$moved" storage-1)")"
timed "$work/move-again" k patch nbdvolume "$moved" --type merge -p '{"spec":{"storageNode":"storage-3"}}'
if [ "$(cut -d' ' -f1 "$work/move-again")" != 0 ] && grep -q "a volume stays on its storage node" "$work/move-again.txt"; then
    ok "the CRD's rule is back: another move is refused by the API server"
else
    bad "the CRD's rule after the move: $(cat "$work/move-again.txt")"
fi
if move "$moved" storage-1 && wait_until 30 available "$moved"; then
    check "moved back to storage-1, $moved is Available on its port there again" "$moved_port" "$(jp nbdvolume "$moved" -o jsonpath='{.status.port}')"
else
    bad "$moved moved back to storage-1: $(jp nbdvolume "$moved" -o jsonpath='{.status}')"
fi

# A storage node no agent runs: no agent acts on the object, and a publish
# of it is UNAVAILABLE, bounded, naming the wait.
nbdvolume "$elsewhere" storage-9 $((4 * MIB))
timed "$work/elsewhere" publish_rpc "$elsewhere" worker-a
unavailable "ControllerPublishVolume of $elsewhere on storage-9, a storage node no agent runs" "$work/elsewhere"
if grep -q "storage node storage-9 has no NbdStorageNode: no agent runs there" "$work/elsewhere.txt"; then
    ok "its message says that no agent runs on storage-9"
else
    bad "the message of the publish of $elsewhere does not say that no agent runs on storage-9"
fi
check "no agent took $elsewhere on (no finalizer, no status)" " " "$(jp nbdvolume "$elsewhere" -o jsonpath='{.metadata.finalizers} {.status}')"

# --- the stopped agent's Lease expires: it gets no new volume, the others do
lease_expired() { # NAME: renewTime + leaseDurationSeconds has passed
    local at duration
    read -r at duration < <(jp lease -n "$ns" "$1" -o jsonpath='{.spec.renewTime} {.spec.leaseDurationSeconds}')
    [ -n "$at" ] && [ $(($(date -d "$at" +%s) + duration)) -lt "$(date +%s)" ]
}
if wait_until 60 lease_expired "$stopped"; then
    ok "agent $stopped's Lease expired (renewed last at $(jp lease -n "$ns" "$stopped" -o jsonpath='{.spec.renewTime}'), $(jp lease -n "$ns" "$stopped" -o jsonpath='{.spec.leaseDurationSeconds}') s)"
else
    bad "agent $stopped's Lease did not expire within 60 s"
fi
placed=()
for i in 1 2 3 4; do
    if csi volume create "lease-$i" --size 8M --block -o json >"$work/lease.json" 2>&1; then
        placed+=("$(node_of "$(json_field id <"$work/lease.json")")")
    else
        bad "CreateVolume lease-$i with $stopped's Lease expired: $(cat "$work/lease.json")"
    fi
done
# A volume already on it cannot be published meanwhile, and the message says why.
on_stopped=$(jp nbdvolumes --field-selector "spec.storageNode=$stopped" -o jsonpath='{.items[0].metadata.name}')
timed "$work/dead" publish_rpc "$on_stopped" worker-a
unavailable "ControllerPublishVolume of $on_stopped on $stopped, whose Lease expired" "$work/dead"
if grep -q "the Lease of storage node $stopped's agent expired" "$work/dead.txt"; then
    ok "its message says that $stopped's agent's Lease expired"
else
    bad "the message of the publish of $on_stopped does not name $stopped's expired Lease"
fi
# storage-3 has the most room: only its Lease keeps the volumes away.
check "4 new volumes with $stopped's Lease expired, none on it (it has the most room)" "4 0" \
    "${#placed[@]} $(printf '%s\n' "${placed[@]}" | grep -cx "$stopped")"
echo "   placed on: ${placed[*]}"

kill -CONT "${agent_pid[$stopped]}"
continued=$(date +%s)
if wait_until 30 renewed_since "$stopped" "$continued"; then ok "agent $stopped continued (SIGCONT): its Lease renewed"; else bad "agent $stopped did not renew its Lease"; fi
if csi volume create lease-back --size 8M --block -o json >"$work/lease.json" 2>&1; then
    check "a new volume goes to $stopped again, the node with the most room" "$stopped" "$(node_of "$(json_field id <"$work/lease.json")")"
else
    bad "CreateVolume lease-back: $(cat "$work/lease.json")"
fi

# The deleted object's image: quarantined by the agent's sweep, intact, with an Event.
quarantined="$disks/$stopped/data/quarantine/$orphan/$orphan.img"
if wait_until 60 test -f "$quarantined"; then
    check "$orphan's image quarantined on $stopped, intact (sha256)" "$orphan_sum" "$(sha256sum <"$quarantined")"
else
    bad "$orphan not quarantined on $stopped within 60 s: $(find "$disks/$stopped/data" -name "$orphan*" | paste -sd' ')"
fi
if wait_until 30 test -n "$(event_about "$stopped" VolumeQuarantined)"; then
    ok "a VolumeQuarantined Event on NbdStorageNode $stopped: $(event_about "$stopped" VolumeQuarantined | cut -c1-200)"
else
    bad "no VolumeQuarantined Event on $stopped"
fi

# --- the agents serve on
if out=$(qemu-io -f raw "$healthy_uri" -c "read -P 0x5e 0 1M" 2>&1) && ! grep -qiE 'fail|error' <<<"$out"; then
    ok "$healthy still serves its data through the same nbdUri"
else
    bad "$healthy after the hand edits: $out"
fi
k delete nbdvolume "$elsewhere" >/dev/null
check "every agent record has its NbdVolume on that storage node and every NbdVolume its record" "" "$(records_vs_objects)"
for a in "${agents[@]}"; do
    if kill -0 "${agent_pid[$a]}" 2>/dev/null; then ok "agent $a still running"; else bad "agent $a exited: $(tail -n 5 "$work/agent-$a.log")"; fi
done
if kill -0 "$controller_pid" 2>/dev/null; then ok "nbd-csi-controller still running"; else bad "nbd-csi-controller exited"; fi
if grep -qE 'panicked' "$work"/agent-*.log "$work/controller.log"; then
    bad "a panic in a log: $(grep -h panicked "$work"/agent-*.log "$work/controller.log" | head -3)"
else
    ok "no panic in the agents' and the controller's logs"
fi
echo "faults: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
