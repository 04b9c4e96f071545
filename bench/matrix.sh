#!/usr/bin/env bash
# The workload matrix: nbd-csi's server against qemu-nbd, nbdkit and
# nbd-server over block size x read/write/70-30 mix x queue depth x
# connections, plus FLUSH-heavy writes, write cells on a clean and on a
# sparse file, and QD1 latency percentiles (with 4k FUA writes from
# bench/fua_latency.py); and each cell against a server that does no I/O
# (nbdkit's null plugin), the client's own ceiling. Same client (fio's nbd engine), one server at a
# time, every server on an identical copy of the file prepared the same way,
# server order rotated between passes. Writes the `matrix` section of
# BENCHMARKS.md (bench/matrix_report.py). See bench/README.md.
#
# Usage: bench/matrix.sh [--quick]
#   --quick          4k/64k/1M, QD1 on 1 connection and QD16 on 4, 3 s runs:
#                    a few minutes, for a change's before/after
#                    (bench/compare.py); without it the whole matrix (about
#                    90 minutes on 2 cores; for a quiet machine)
# Environment: BENCH_RUNTIME, BENCH_RAMP, BENCH_PASSES, NBD_CSI_BIN,
#   BENCH_OUTPUT, BENCH_WORKDIR as for bench/run.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_DIR="$ROOT/bench"

BENCH_NAME=matrix
. "$BENCH_DIR/servers.sh"
parse_quick "$@"

if ((QUICK)); then
  RUNTIME="${BENCH_RUNTIME:-3}" RAMP="${BENCH_RAMP:-1}"
  BLOCK_SIZES=(4k 64k 1M)
  SHAPES=(qd1-c1 qd16-c4)
else
  RUNTIME="${BENCH_RUNTIME:-8}" RAMP="${BENCH_RAMP:-2}"
  BLOCK_SIZES=(4k 16k 64k 256k 1M)
  SHAPES=(qd1-c1 qd16-c1 qd64-c1 qd1-c4 qd16-c4 qd64-c4)
fi
PASSES="${BENCH_PASSES:-1}"
SKIP_OURS=0
EXPORT=bench
IMAGE_SIZE=1G
FUA_WRITES="${BENCH_FUA_WRITES:-2000}"
FIO_TIMEOUT=$((RAMP + RUNTIME + 60))
# A server lives for one file state's cells at most.
SERVER_TIMEOUT=$((3 * ${#BLOCK_SIZES[@]} * ${#SHAPES[@]} * FIO_TIMEOUT + 600))

MASTER="$WORK/random.img" # the data every server's copy starts from
IMAGE="$WORK/disk.img"
. "$BENCH_DIR/section.sh"

# ---------------------------------------------------------------- cells
# A cell: "ID fio-args..." (one line). IDs are RW-BS-qdQ-cC[-flushN], and
# write cells on another file state end in @clean or @sparse.
rw_args() {
  case "$1" in
    randread) echo "--rw=randread" ;;
    randwrite) echo "--rw=randwrite" ;;
    randrw) echo "--rw=randrw --rwmixread=70" ;;
  esac
}

shape_args() { # qdQ-cC
  local qd=${1%-c*} conns=${1#*-c}
  echo "--iodepth=${qd#qd} --numjobs=$conns"
}

# The cells run on the file as every other table has it: written, synced
# and fully cached.
cached_cells() {
  local rw bs shape
  for rw in randread randwrite randrw; do
    for bs in "${BLOCK_SIZES[@]}"; do
      for shape in "${SHAPES[@]}"; do
        echo "$rw-$bs-$shape $(rw_args "$rw") --bs=$bs $(shape_args "$shape")"
      done
    done
  done
  # FLUSH after every write (what a sync=1 or O_SYNC writer sends: fio's
  # nbd engine has no FUA), and a FLUSH every 32 writes per connection.
  echo "randwrite-4k-qd1-c1-flush1 --rw=randwrite --bs=4k --iodepth=1 --numjobs=1 --fsync=1"
  echo "randwrite-4k-qd16-c4-flush32 --rw=randwrite --bs=4k --iodepth=16 --numjobs=4 --fsync=32"
}

# Write cells on a file whose pages are written back and not cached
# ("clean") and on a new sparse file ("sparse").
state_cells() {
  local state=$1 bs
  for bs in 4k 64k; do
    echo "randwrite-$bs-qd16-c4@$state --rw=randwrite --bs=$bs --iodepth=16 --numjobs=4"
  done
  ((QUICK)) || echo "randwrite-1M-qd16-c1@$state --rw=randwrite --bs=1M --iodepth=16 --numjobs=1"
}

# ---------------------------------------------------------------- files
# prepare_image STATE: $IMAGE as STATE, the same way for every server.
prepare_image() {
  rm -f "$IMAGE"
  case "$1" in
    cached)
      cp "$MASTER" "$IMAGE"
      sync "$IMAGE"
      cat "$IMAGE" >/dev/null
      ;;
    clean)
      cp "$MASTER" "$IMAGE"
      sync "$IMAGE"
      python3 -c 'import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' "$IMAGE"
      ;;
    sparse)
      truncate -s "$IMAGE_SIZE" "$IMAGE"
      ;;
  esac
}

# ---------------------------------------------------------------- runs
run_cells() { # SERVER PORT CELL-LISTING-COMMAND...
  local server=$1 port=$2 id rest
  shift 2
  local -a args
  while read -r id rest; do
    read -ra args <<<"$rest"
    run_fio "$server" "$port" "$id" "${args[@]}" --group_reporting \
      --norandommap --randrepeat=0 --percentile_list=50:99:99.9 </dev/null
  done < <("$@")
}

fua_latency() { # SERVER PORT
  local base="$RESULTS/$1/fua-4k-qd1.$PASS"
  log "$1: 4k FUA writes at QD1 (pass $PASS/$PASSES)"
  if ! timeout 300 /usr/bin/python3 "$BENCH_DIR/fua_latency.py" --uri "$(uri "$2")" \
    --writes "$FUA_WRITES" >"$base.json" 2>"$base.err"; then
    log "$1: FUA latency FAILED (see $base.err)"
    touch "$base.failed"
    FAILED=1
  fi
}

bench_server() {
  local server="$1" state port
  local -a states=(cached clean sparse)
  [[ "$server" == null ]] && states=(cached)
  for state in "${states[@]}"; do
    prepare_image "$state"
    port="$(free_port)"
    log "starting $server on 127.0.0.1:$port ($state file)"
    "start_${server//-/_}" "$port"
    wait_ready "$port"
    if [[ "$state" == cached ]]; then
      run_cells "$server" "$port" cached_cells
      [[ "$server" == null ]] || fua_latency "$server" "$port"
    else
      run_cells "$server" "$port" state_cells "$state"
    fi
    stop_servers
  done
}

main() {
  prepare_run "$( ((QUICK)) && echo quick || echo full ) matrix, runtime ${RUNTIME}s, ramp ${RAMP}s, $PASSES pass(es)"
  log "writing $IMAGE_SIZE of random data to $MASTER"
  head -c "$IMAGE_SIZE" /dev/urandom >"$MASTER"
  # null: the client's ceiling (bench/servers.sh), on the cached cells.
  each_pass bench_server nbd-csi qemu-nbd nbdkit nbd-server null
  rm -f "$MASTER" "$IMAGE"
  python3 "$BENCH_DIR/matrix_report.py" --results "$RESULTS" --passes "$PASSES" \
    --runtime "$RUNTIME" --ramp "$RAMP" --scope "$( ((QUICK)) && echo quick || echo full )" \
    --ours-bin "$OURS_BIN" --fua-writes "$FUA_WRITES" >"$WORK/matrix.md"
  replace_section "$OUTPUT" "$WORK/matrix.md" "<!-- matrix:begin -->" "<!-- matrix:end -->"
  log "matrix written to $OUTPUT"
  ((FAILED == 0)) || die "some runs failed; see $RESULTS"
}

main "$@"
