#!/usr/bin/env bash
# Controller benchmark: CreateVolume + ControllerPublishVolume latency over
# 1000 volumes in one controller, and its resident memory with 1000 idle
# volumes served, per volume, against a baseline with none. Targets (issue 3):
# p99 < 20 ms for the pair, < 64 KiB per idle volume.
#
# Starts the release controller on a temporary data directory, runs the
# client (controller/examples/bench_controller.rs) against it, and writes its
# section into BENCHMARKS.md between the controller-bench marker comments,
# leaving the rest of the file as it is.
#
# Environment:
#   BENCH_VOLUMES     volumes to create (default 1000)
#   BENCH_PORTS       NBD port range FIRST-LAST, one port per volume plus
#                     slack (default 12000-13099, below the ephemeral range)
#   BENCH_WORKDIR     data directory parent (default: mktemp -d under $TMPDIR)
#   BENCH_OUTPUT      report file (default: <repo>/BENCHMARKS.md)
#   RUST_LOG          the controller's log level (default info, as deployed)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=section.sh
. "$ROOT/bench/section.sh"
VOLUMES="${BENCH_VOLUMES:-1000}"
PORTS="${BENCH_PORTS:-12000-13099}"
OUTPUT="${BENCH_OUTPUT:-$ROOT/BENCHMARKS.md}"
WORK="${BENCH_WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/nbd-csi-controller-bench.XXXXXX")}"
BEGIN='<!-- controller-bench:begin -->'
END='<!-- controller-bench:end -->'

log() { printf '[controller-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

first="${PORTS%-*}"
last="${PORTS#*-}"
(( last - first + 1 >= VOLUMES + 30 )) || die "BENCH_PORTS $PORTS has fewer than $VOLUMES + 30 ports"

# Each volume holds two descriptors (its listening socket, its image).
need=$((2 * VOLUMES + 256))
if (( $(ulimit -n) < need )); then
    ulimit -n "$need" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    (( $(ulimit -n) >= need )) || die "open files limit $(ulimit -n) < $need and cannot be raised (ulimit -Hn $(ulimit -Hn))"
fi

log "building the release controller and the bench client"
(cd "$ROOT" && cargo build --release --locked -p nbd-csi-controller --bin nbd-csi-controller --example bench_controller)
BIN="$ROOT/target/release/nbd-csi-controller"
CLIENT="$ROOT/target/release/examples/bench_controller"

mkdir -p "$WORK"
DATA="$WORK/data"
SOCKET="$WORK/csi.sock"
rm -rf "$DATA"
CONTROLLER_PID=""
cleanup() {
    if [[ -n "$CONTROLLER_PID" ]]; then
        kill -TERM "$CONTROLLER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$CONTROLLER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$CONTROLLER_PID" 2>/dev/null || true
        wait "$CONTROLLER_PID" 2>/dev/null || true
    fi
    [[ -n "${BENCH_WORKDIR:-}" ]] || rm -rf "$WORK"
}
trap cleanup EXIT

log "starting the controller: data in $DATA, NBD ports $PORTS, open files limit $(ulimit -n)"
RUST_LOG="${RUST_LOG:-info}" NO_COLOR=1 "$BIN" \
    --data-dir "$DATA" \
    --endpoint "unix://$SOCKET" \
    --nbd-listen-address 127.0.0.1 \
    --nbd-port-range "$PORTS" \
    >"$WORK/controller.log" 2>&1 &
CONTROLLER_PID=$!
for _ in $(seq 1 100); do
    [[ -S "$SOCKET" ]] && break
    kill -0 "$CONTROLLER_PID" 2>/dev/null || { cat "$WORK/controller.log"; die "controller exited"; }
    sleep 0.1
done
[[ -S "$SOCKET" ]] || die "controller did not create $SOCKET"

log "creating and publishing $VOLUMES volumes"
section="$WORK/section.md"
timeout 1800 "$CLIENT" --socket "$SOCKET" --pid "$CONTROLLER_PID" --volumes "$VOLUMES" \
    --probe-dir "$WORK/probe" >"$section.body"

cpu="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
mem="$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
fs="$(df -PT "$DATA" | awk 'NR == 2 { print $2 }')"
{
    echo "$BEGIN"
    echo "## Controller: CreateVolume + ControllerPublishVolume, idle volumes"
    echo
    echo "Written by \`bench/controller.sh\` on $(date -u +%Y-%m-%d). Machine: ${cpu:-unknown CPU}, $(nproc) CPUs, $mem RAM,"
    echo "Linux $(uname -r); data directory on $fs; load average before the run $(cut -d' ' -f1-3 /proc/loadavg)."
    echo "Release build, controller log level ${RUST_LOG:-info}, every record write fsynced (file and directory)."
    echo
    cat "$section.body"
    echo "$END"
} >"$section"

replace_section "$OUTPUT" "$section" "$BEGIN" "$END"
cat "$section"
log "wrote the section into $OUTPUT"
