#!/usr/bin/env bash
# Where a queue-depth-1 request's time goes: 4k random reads, one
# connection, one request in flight, against nbd-csi's server (as it runs,
# and with one tokio worker thread) and nbdkit's file plugin, the same fio
# nbd-engine client. Per server: fio's IOPS and completion latency; the
# server's CPU time, context switches and CPU migrations over the run
# (perf stat on the whole process); then a second run under `strace -c -f`
# for the system calls per request (strace slows every server several
# times over: its run's IOPS are not comparable, only its counts).
# Prints one block per server; the hand-written analysis in BENCHMARKS.md
# ("Queue depth 1: where a request's time goes") quotes a run.
#
# Usage: bench/qd1_profile.sh
# Environment: NBD_CSI_BIN (default target/release/nbd-csi-controller),
#   BENCH_RUNTIME (8 s per run), BENCH_WORKDIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${NBD_CSI_BIN:-$ROOT/target/release/nbd-csi-controller}"
RUNTIME="${BENCH_RUNTIME:-8}"
WORK="${BENCH_WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/nbd-csi-qd1.XXXXXX")}"
IMAGE="$WORK/image"
for tool in fio perf strace nbdkit python3; do
  command -v "$tool" >/dev/null || { echo "qd1_profile: $tool is missing" >&2; exit 1; }
done
[[ -x "$BIN" ]] || { echo "qd1_profile: no $BIN (cargo build --release)" >&2; exit 1; }

head -c 256M /dev/urandom >"$IMAGE"
cat "$IMAGE" >/dev/null # in the page cache, as for the matrix

# fio_qd1 PORT JSON: one bounded run, 4k random read, QD1, one connection;
# no ramp, so its request count is every request the server saw.
fio_qd1() {
  timeout $((RUNTIME + 60)) fio --name=qd1 --ioengine=nbd --uri="nbd://127.0.0.1:$1/bench" --size=256M \
    --rw=randread --bs=4k --iodepth=1 --numjobs=1 --time_based --runtime="$RUNTIME" \
    --output-format=json --output="$2" >/dev/null 2>&1
}

# summary JSON: IOPS, requests, p50 and p99 completion latency.
summary() {
  python3 - "$1" <<'PYEOF'
import json, sys
read = json.load(open(sys.argv[1]))["jobs"][0]["read"]
p = read["clat_ns"]["percentile"]
print(f'{read["iops"]:.0f} IOPS, {read["total_ios"]} requests, p50 {p["50.000000"] / 1000:.1f} us, '
      f'p99 {p["99.000000"] / 1000:.1f} us')
PYEOF
}

# profile NAME PORT COMMAND...: the server started, measured, stopped.
profile() {
  local name="$1" port="$2" pid perf tracer requests
  shift 2
  "$@" >"$WORK/$name.log" 2>&1 &
  pid=$!
  for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.2
  done
  perf stat -e task-clock,context-switches,cpu-migrations -p "$pid" -o "$WORK/$name.perf" -- sleep $((RUNTIME + 1)) &
  perf=$!
  fio_qd1 "$port" "$WORK/$name.json"
  wait "$perf" || true
  echo "$name: $(summary "$WORK/$name.json")"
  requests=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["read"]["total_ios"])' "$WORK/$name.json")
  awk -v n="$requests" '/task-clock/ { gsub(",", "", $1); printf "  CPU: %.0f ms, %.1f us per request\n", $1, $1 * 1000 / n }
      $2 == "context-switches" || $2 == "cpu-migrations" {
      gsub(",", "", $1); printf "  %s: %s, %.2f per request\n", $2, $1, $1 / n }' "$WORK/$name.perf"
  strace -c -f -p "$pid" -o "$WORK/$name.strace" 2>/dev/null &
  tracer=$!
  sleep 0.5
  fio_qd1 "$port" "$WORK/$name-strace.json"
  kill -INT "$tracer"
  wait "$tracer" 2>/dev/null || true
  requests=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["read"]["total_ios"])' "$WORK/$name-strace.json")
  echo "  system calls per request under strace ($requests requests):"
  awk -v n="$requests" '$NF != "total" && $4 ~ /^[0-9]+$/ && $4 / n >= 0.05 {
      printf "    %-14s %.2f\n", $NF, $4 / n }' "$WORK/$name.strace"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

profile nbd-csi 20811 "$BIN" serve-file "$IMAGE" --listen 127.0.0.1:20811 --export-name bench
profile nbd-csi-1-worker 20812 env TOKIO_WORKER_THREADS=1 "$BIN" serve-file "$IMAGE" \
  --listen 127.0.0.1:20812 --export-name bench
profile nbdkit 20813 nbdkit --foreground --exit-with-parent --threads 16 -i 127.0.0.1 -p 20813 -e bench file "$IMAGE"
echo "raw results in $WORK"
