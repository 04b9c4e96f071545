#!/usr/bin/env bash
# Control-plane benchmark (issue 12, deliverable 7): CreateVolume +
# ControllerPublishVolume latency for N volumes (default 300) through the
# API server with three storage agents, against the embedded default in the
# same run, and resident memory per idle volume of the agents and the
# controllers. Targets: p99 < 100 ms per pair through the API server,
# < 64 KiB per idle volume. See bench/README.md.
#
# 1. Embedded default: the release controller with no storage flags on its
#    own tmpfs; the client (controller/examples/bench_control_plane.rs)
#    runs its phases against it; the controller is stopped.
# 2. Cluster mode: etcd and kube-apiserver on 127.0.0.1 (tests/k8s/cluster.sh),
#    the chart's CRDs, ServiceAccounts and RBAC for storage.mode=cluster,
#    Node objects for storage-1..3 (127.0.1.1..3) and the consumer node
#    (127.0.0.1), the controller with --storage-mode cluster, three
#    `nbd-csi-controller agent` processes on 127.0.1.1..3, each on its own
#    tmpfs; the same client phases against it, with the API server's
#    request metrics read before and after.
# 3. bench/control_plane_report.py renders both into BENCHMARKS.md between
#    the control-plane-bench marker comments, leaving the rest of the file
#    as it is.
# Every process is stopped and every tmpfs unmounted at exit, on failure or
# Ctrl-C too. Needs root (tmpfs mounts) and the Kubernetes tools of
# tests/k8s/tools.sh (built there when missing).
#
# Usage: bench/control-plane.sh [--quick]
#   --quick           10 volumes, 2 warm-up, 1 s settle; the report goes to
#                     the work directory unless BENCH_OUTPUT is set
# Environment:
#   BENCH_VOLUMES     volumes per phase (default 300)
#   BENCH_CONCURRENCY pairs in flight in the concurrent phase (default 8)
#   BENCH_SIZE_MIB    size of each volume, sparse (default 16)
#   BENCH_OUTPUT      report file (default: <repo>/BENCHMARKS.md)
#   NBD_CSI_BIN       a release nbd-csi-controller binary: skips the build
#                     (then NBD_CSI_BENCH_CLIENT must name the client too)
#   RUST_LOG          the controllers' and agents' log level (default info)
#   KEEP_WORK=1       keep the work directory (logs, JSON) for a look
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=../tests/k8s/tools.sh
. tests/k8s/tools.sh
# shellcheck source=../tests/k8s/cluster.sh
. tests/k8s/cluster.sh
# shellcheck source=section.sh
. bench/section.sh

QUICK=0
case "${1:-}" in
    "") ;;
    --quick) QUICK=1 ;;
    *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
esac
if ((QUICK)); then
    VOLUMES="${BENCH_VOLUMES:-10}" WARMUP=2 SETTLE=1
else
    VOLUMES="${BENCH_VOLUMES:-300}" WARMUP=10 SETTLE=3
fi
CONCURRENCY="${BENCH_CONCURRENCY:-8}"
SIZE_MIB="${BENCH_SIZE_MIB:-16}"
export RUST_LOG="${RUST_LOG:-info}"
[[ "$VOLUMES" =~ ^[0-9]+$ ]] && ((VOLUMES >= 1 && VOLUMES <= 2000)) || { echo "BENCH_VOLUMES must be 1..2000" >&2; exit 2; }
[[ "$SIZE_MIB" =~ ^[0-9]+$ ]] && ((SIZE_MIB >= 1)) || { echo "BENCH_SIZE_MIB must be a positive integer" >&2; exit 2; }
BEGIN='<!-- control-plane-bench:begin -->'
END='<!-- control-plane-bench:end -->'
NS=nbd-csi
CONSUMER=bench-worker
AGENTS=(storage-1 storage-2 storage-3)
declare -A AGENT_ADDR=([storage-1]=127.0.1.1 [storage-2]=127.0.1.2 [storage-3]=127.0.1.3)
# Sparse images: a tmpfs only needs room for the apparent sizes placement
# counts (every volume of a phase on one agent, at worst) plus slack.
TMPFS_MIB=$((VOLUMES * SIZE_MIB * 2 + 256))
# Ports below the ephemeral range (32768-): per process a block of
# 2 x VOLUMES + 30 (an agent may hold every volume of a phase), metrics
# at the block's end.
BLOCK=$((2 * VOLUMES + 40))
PORT_BASE=$((20000 + RANDOM % 200))
((PORT_BASE + 4 * BLOCK < 32768)) || { echo "BENCH_VOLUMES too large for the port blocks" >&2; exit 2; }
ports_of() { echo "$((PORT_BASE + $1 * BLOCK))-$((PORT_BASE + $1 * BLOCK + BLOCK - 10))"; }

log() { printf '[control-plane-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Descriptors: per volume the image and, while published, its listener.
need=$((4 * VOLUMES + 512))
if (($(ulimit -n) < need)); then
    ulimit -n "$need" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    (($(ulimit -n) >= need)) || die "open files limit $(ulimit -n) < $need and cannot be raised"
fi

if [[ -n "${NBD_CSI_BIN:-}" ]]; then
    BIN="$(realpath "$NBD_CSI_BIN")"
    CLIENT="$(realpath "${NBD_CSI_BENCH_CLIENT:?NBD_CSI_BENCH_CLIENT must name the bench_control_plane client with NBD_CSI_BIN}")"
else
    log "building the release controller and the bench client"
    cargo build --release --locked -p nbd-csi-controller --bin nbd-csi-controller --example bench_control_plane
    target="$(cargo metadata --format-version 1 --no-deps --offline |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
    BIN="$target/release/nbd-csi-controller"
    CLIENT="$target/release/examples/bench_control_plane"
fi
[[ -x "$BIN" && -x "$CLIENT" ]] || die "no executable at $BIN or $CLIENT"
ensure_helm

# The tmpfs mounts live outside $work: unmounted after every process has
# stopped (cluster_cleanup), before the work directory goes.
disks=$(mktemp -d /tmp/nbd-csi-bench-disks.XXXXXX)
bench_cleanup() {
    cluster_cleanup
    local d
    for d in "$disks"/*; do
        [[ -d "$d" ]] || continue
        umount "$d" 2>/dev/null || umount -l "$d" 2>/dev/null || true
    done
    rm -rf "$disks"
}
cluster_init nbd-csi-bench-control-plane
trap bench_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if ((QUICK)); then OUTPUT="${BENCH_OUTPUT:-$work/BENCHMARKS.md}"; else OUTPUT="${BENCH_OUTPUT:-$ROOT/BENCHMARKS.md}"; fi

tmpfs_disk() { # NAME: a fresh tmpfs at $disks/NAME
    mkdir -p "$disks/$1"
    mount -t tmpfs -o "size=${TMPFS_MIB}m,mode=0755" nbd-csi-bench "$disks/$1" || die "mounting a tmpfs (needs root)"
}
started() { # PID SOCKET: the process runs and has made its socket
    kill -0 "$1" && [[ -S "$2" ]]
}
stop() { # PID: SIGTERM, 15 s, SIGKILL
    kill -TERM "$1" 2>/dev/null || return 0
    wait_until 15 bash -c "! kill -0 $1" || kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
client() { # JSON-OUT NODE WATCH...: the client's phases, within an hour
    local out=$1 node=$2
    shift 2
    timeout 3600 "$CLIENT" --socket "$socket" --node "$node" --volumes "$VOLUMES" \
        --concurrency "$CONCURRENCY" --size $((SIZE_MIB << 20)) --warmup "$WARMUP" --settle "$SETTLE" \
        "$@" >"$out" 2>"$out.err" || { cat "$out.err" >&2; return 1; }
}
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------- embedded
tmpfs_disk embedded
socket=$work/embedded.sock
log "embedded: controller on a tmpfs, NBD ports $(ports_of 3)"
NO_COLOR=1 "$BIN" --data-dir "$disks/embedded/data" --endpoint "unix://$socket" \
    --nbd-listen-address 127.0.0.1 --nbd-port-range "$(ports_of 3)" >"$work/embedded.log" 2>&1 &
embedded_pid=$!
pids+=("$embedded_pid")
wait_until 60 started "$embedded_pid" "$socket" || { tail -n 30 "$work/embedded.log" >&2; die "the embedded controller did not start"; }
log "embedded: $VOLUMES volumes one at a time, then $CONCURRENCY in flight"
client "$work/embedded.json" "$CONSUMER" --watch "controller=$embedded_pid" ||
    { tail -n 30 "$work/embedded.log" >&2; die "the client failed against the embedded controller"; }
stop "$embedded_pid"

# ---------------------------------------------------------------- cluster
cluster_start
k() { "$kubectl" "$@"; }
# What tests/k8s/cluster.sh's cluster-mode helpers read.
ns=$NS driver=nbd.csi.dev controller_bin=$BIN port_base=$PORT_BASE agent_port_block=$BLOCK storage_timeout=30
agents=("${AGENTS[@]}")
declare -A agent_addr agent_pid
for a in "${AGENTS[@]}"; do agent_addr[$a]=${AGENT_ADDR[$a]}; done
cluster_mode_objects >"$work/objects.txt" || die "applying the chart's CRDs, RBAC and storage policy"
for a in "${AGENTS[@]}"; do cluster_node "$a" "${AGENT_ADDR[$a]}" ""; done
cluster_node "$CONSUMER" 127.0.0.1 ""

socket=$work/cluster.sock
log "cluster: controller --storage-mode cluster"
start_controller cluster-controller.log || { tail -n 30 "$work/cluster-controller.log" >&2; die "the cluster-mode controller did not start"; }
mount_export_key >>"$work/objects.txt" || die "the controller made no export-key Secret"
for a in "${AGENTS[@]}"; do
    tmpfs_disk "$a"
    start_agent "$a"
done
for a in "${AGENTS[@]}"; do
    wait_until 60 announced "$a" || { tail -n 30 "$work/agent-$a.log" >&2; die "agent $a did not announce itself"; }
done
log "cluster: 3 agents announced; $VOLUMES volumes one at a time, then $CONCURRENCY in flight"

metrics() { # FILE: the API server's Prometheus metrics
    curl -sf --max-time 30 --cacert "$api_ca" -H "Authorization: Bearer $admin_token" "$api_url/metrics" >"$1"
}
metrics "$work/apiserver-metrics.before" || die "reading the API server's metrics"
watch=(--watch "controller=$controller_pid")
for a in "${AGENTS[@]}"; do watch+=(--watch "$a=${agent_pid[$a]}"); done
client "$work/cluster.json" "$CONSUMER" "${watch[@]}" ||
    { tail -n 30 "$work/cluster-controller.log" "$work"/agent-*.log >&2; die "the client failed against the cluster"; }
metrics "$work/apiserver-metrics.after" || die "reading the API server's metrics"
LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------- report
section="$work/section.md"
python3 bench/control_plane_report.py \
    --embedded "$work/embedded.json" --cluster "$work/cluster.json" \
    --apiserver-before "$work/apiserver-metrics.before" --apiserver-after "$work/apiserver-metrics.after" \
    --binary "$BIN" --load-before "$LOAD_BEFORE" --load-after "$LOAD_AFTER" \
    --etcd-fs "$(df -PT "$work" | awk 'NR == 2 { print $2 }')" --quick "$QUICK" \
    $(for a in "${AGENTS[@]}"; do echo --agent "$a=${AGENT_ADDR[$a]}"; done) \
    --begin "$BEGIN" --end "$END" >"$section"

replace_section "$OUTPUT" "$section" "$BEGIN" "$END"
cat "$section"
log "wrote the section into $OUTPUT"
