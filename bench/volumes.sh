#!/usr/bin/env bash
# Many volumes at once: one nbd-csi process serving 16 and 64 files (one
# port each, as the storage role serves its volumes) against as many nbdkit
# and qemu-nbd processes (one per volume, as a user would run them), each
# volume driven by its own fio job (one connection, 4k random 70/30 mix).
# Reports aggregate IOPS and MB/s, the slowest volume against the fastest,
# server memory and CPU per I/O in the `volumes` section of BENCHMARKS.md
# (bench/volumes_report.py). See bench/README.md.
#
# Usage: bench/volumes.sh [--quick]   (--quick: 16 volumes only, 4 s runs)
# Environment: BENCH_RUNTIME, BENCH_RAMP, BENCH_PASSES, NBD_CSI_BIN,
#   BENCH_OUTPUT, BENCH_WORKDIR as for bench/run.sh; BENCH_VOLUME_MIB (64).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_DIR="$ROOT/bench"

BENCH_NAME=volumes
. "$BENCH_DIR/servers.sh"
parse_quick "$@"
if ((QUICK)); then
  RUNTIME="${BENCH_RUNTIME:-4}" RAMP="${BENCH_RAMP:-1}" COUNTS=(16)
else
  RUNTIME="${BENCH_RUNTIME:-10}" RAMP="${BENCH_RAMP:-2}" COUNTS=(16 64)
fi
PASSES="${BENCH_PASSES:-1}"
SKIP_OURS=0
EXPORT=bench
VOLUME_MIB="${BENCH_VOLUME_MIB:-64}"
IMAGE_SIZE="${VOLUME_MIB}M"
QUEUE_DEPTH=8
COUNT=0 # the volume count of the runs under way
FIO_TIMEOUT=$((RAMP + RUNTIME + 120))
SERVER_TIMEOUT=$((FIO_TIMEOUT + 600))

MASTER="$WORK/random.img"
IMAGE="$MASTER"
. "$BENCH_DIR/section.sh"

# free_port_range N: a port P with P..P+N-1 all free on 127.0.0.1 now.
free_port_range() {
  python3 - "$1" <<'PYEOF'
import random, socket, sys
n = int(sys.argv[1])
for _ in range(200):
    base = random.randrange(20000, 60000 - n)
    held = []
    try:
        for port in range(base, base + n):
            s = socket.socket()
            s.bind(("127.0.0.1", port))
            held.append(s)
    except OSError:
        continue
    finally:
        for s in held:
            s.close()
    print(base)
    sys.exit(0)
sys.exit("no free range of %d ports" % n)
PYEOF
}

# The volumes' files: identical copies of the same random data.
prepare_volumes() { # COUNT
  local i
  rm -f "$WORK"/vol-*.img
  for ((i = 0; i < $1; i++)); do
    cp "$MASTER" "$WORK/vol-$i.img"
  done
  sync
  cat "$WORK"/vol-*.img >/dev/null
}

# start_servers CONFIG SERVER COUNT BASE: SERVER for COUNT volumes on ports
# BASE.. (one nbd-csi process, or one peer process per volume).
start_servers() {
  local config=$1 server=$2 count=$3 base=$4 i
  local -a files=()
  for ((i = 0; i < count; i++)); do files+=("$WORK/vol-$i.img"); done
  case "$server" in
    nbd-csi)
      launch "$config" "$OURS_BIN" serve-file "${files[@]}" \
        --listen "127.0.0.1:$base" --export-name "$EXPORT"
      ;;
    qemu-nbd | nbdkit)
      for ((i = 0; i < count; i++)); do
        "${server//-/_}_command" $((base + i)) "${files[i]}"
        launch "$config/v$i" "${CMD[@]}"
      done
      ;;
  esac
  for ((i = 0; i < count; i++)); do
    wait_ready $((base + i)) "${files[i]}"
  done
}

# servers_memory_kib: the peak resident memory (VmHWM) of every server
# process, summed, without the `timeout` wrappers launch puts above them.
servers_memory_kib() {
  local total=0 wrapper pid kib
  for wrapper in "${SERVER_PIDS[@]}"; do
    for pid in $(pgrep -P "$wrapper"); do
      kib="$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)"
      total=$((total + ${kib:-0}))
    done
  done
  echo "$total"
}

# run_volumes CONFIG COUNT BASE: one fio with a job per volume.
run_volumes() {
  local config=$1 count=$2 base=$3 i
  local dir="$RESULTS/$config" jobs="$RESULTS/$config/fio.job"
  mkdir -p "$dir"
  {
    printf '[global]\nioengine=nbd\nrw=randrw\nrwmixread=70\nbs=4k\niodepth=%d\n' "$QUEUE_DEPTH"
    printf 'size=%s\ntime_based\nruntime=%s\nramp_time=%s\nnorandommap\nrandrepeat=0\n' \
      "$IMAGE_SIZE" "$RUNTIME" "$RAMP"
    for ((i = 0; i < count; i++)); do
      printf '\n[v%d]\nuri=nbd://127.0.0.1:%d/%s\n' "$i" $((base + i)) "$EXPORT"
    done
  } >"$jobs"
  local base_out="$dir/volumes.$PASS"
  log "$config: $count volumes (pass $PASS/$PASSES)"
  local ticks_before started
  ticks_before="$(servers_ticks)"
  started="$(date +%s.%N)"
  timeout --kill-after=10 "$FIO_TIMEOUT" fio --output-format=json --output="$base_out.json" "$jobs" \
    2>"$base_out.err" &
  FIO_PID=$!
  if ! wait "$FIO_PID"; then
    log "$config: FAILED (see $base_out.err)"
    touch "$base_out.failed"
    FAILED=1
  fi
  FIO_PID=""
  echo "$(($(servers_ticks) - ticks_before)) $(getconf CLK_TCK) $started $(date +%s.%N)" >"$base_out.cpu"
  servers_memory_kib >"$base_out.memory"
}

# bench_volumes SERVER: SERVER for $COUNT volumes, one fio run.
bench_volumes() {
  local server=$1 base
  base="$(free_port_range "$COUNT")"
  log "starting $server for $COUNT volumes on ports $base-$((base + COUNT - 1))"
  start_servers "$server-x$COUNT" "$server" "$COUNT" "$base"
  run_volumes "$server-x$COUNT" "$COUNT" "$base"
  stop_servers
}

main() {
  prepare_run "${COUNTS[*]} volumes of $VOLUME_MIB MiB, runtime ${RUNTIME}s, $PASSES pass(es)"
  head -c "$IMAGE_SIZE" /dev/urandom >"$MASTER"
  for COUNT in "${COUNTS[@]}"; do
    prepare_volumes "$COUNT"
    each_pass bench_volumes nbd-csi qemu-nbd nbdkit
  done
  rm -f "$WORK"/*.img
  python3 "$BENCH_DIR/volumes_report.py" --results "$RESULTS" --passes "$PASSES" \
    --counts "${COUNTS[*]}" --runtime "$RUNTIME" --ramp "$RAMP" --queue-depth "$QUEUE_DEPTH" \
    --volume-mib "$VOLUME_MIB" --ours-bin "$OURS_BIN" --quick "$QUICK" >"$WORK/volumes.md"
  replace_section "$OUTPUT" "$WORK/volumes.md" "<!-- volumes:begin -->" "<!-- volumes:end -->"
  log "volumes written to $OUTPUT"
  ((FAILED == 0)) || die "some runs failed; see $RESULTS"
}

main "$@"
