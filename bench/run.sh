#!/usr/bin/env bash
# Benchmark nbd-csi-controller's NBD server against qemu-nbd, nbdkit and
# nbd-server with fio's nbd engine, and over TLS against qemu-nbd and
# nbdkit with TLS. See bench/README.md.
#
# Environment:
#   BENCH_RUNTIME    seconds per fio run, after the ramp (default 15)
#   BENCH_RAMP       fio ramp_time in seconds (default 3)
#   BENCH_PASSES     run the whole server cycle this many times, in rotating
#                    order; the report shows each cell's median (default 1)
#   NBD_CSI_BIN      use this nbd-csi-controller binary instead of building one
#   BENCH_OUTPUT     where to write the report (default: <repo>/BENCHMARKS.md)
#   BENCH_WORKDIR    scratch dir for the image and raw results (default: mktemp -d)
#   BENCH_SKIP_OURS  =1 skips our server (development only; the report then
#                    goes to the work dir unless BENCH_OUTPUT is set)
#   BENCH_TLS        =0 skips the TLS servers (default 1)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_DIR="$ROOT/bench"

RUNTIME="${BENCH_RUNTIME:-15}"
RAMP="${BENCH_RAMP:-3}"
PASSES="${BENCH_PASSES:-1}"
SKIP_OURS="${BENCH_SKIP_OURS:-0}"
TLS="${BENCH_TLS:-1}"
EXPORT=bench
IMAGE_SIZE=1G
# Upper bound for one fio run: ramp + runtime + connect/teardown slack.
FIO_TIMEOUT=$((RAMP + RUNTIME + 60))
# Upper bound on a server's whole life: 5 rows plus start-up and slack.
SERVER_TIMEOUT=$((5 * FIO_TIMEOUT + 120))

BENCH_NAME=bench
. "$BENCH_DIR/servers.sh"
IMAGE="$WORK/disk.img"
# BENCH_SKIP_OURS's report is not the repository's.
if [[ "$SKIP_OURS" == 1 ]]; then OUTPUT="${BENCH_OUTPUT:-$WORK/BENCHMARKS.md}"; fi

# ---------------------------------------------------------------- fio rows
row_randread_4k_qd64_j1() {
  run_fio "$1" "$2" randread-4k-qd64-j1 \
    --rw=randread --bs=4k --iodepth=64 --numjobs=1 --norandommap --randrepeat=0
}

row_randread_4k_qd64_j4() {
  run_fio "$1" "$2" randread-4k-qd64-j4 \
    --rw=randread --bs=4k --iodepth=64 --numjobs=4 --group_reporting \
    --norandommap --randrepeat=0
}

row_randwrite_4k_qd64_j4() {
  run_fio "$1" "$2" randwrite-4k-qd64-j4 \
    --rw=randwrite --bs=4k --iodepth=64 --numjobs=4 --group_reporting \
    --norandommap --randrepeat=0
}

row_seqread_1m_qd8_j1() {
  run_fio "$1" "$2" seqread-1m-qd8-j1 --rw=read --bs=1M --iodepth=8 --numjobs=1
}

row_seqwrite_1m_qd8_j1() {
  run_fio "$1" "$2" seqwrite-1m-qd8-j1 --rw=write --bs=1M --iodepth=8 --numjobs=1
}

bench_server() {
  local server="$1" port
  port="$(free_port)"
  SCHEME=nbd CLIENT_ENV=(env)
  [[ "$server" == *-tls ]] && SCHEME=nbds CLIENT_ENV=(env LD_PRELOAD="$URI_SHIM")
  warm_cache
  log "starting $server on 127.0.0.1:$port"
  "start_${server//-/_}" "$port"
  wait_ready "$port"
  row_randread_4k_qd64_j1 "$server" "$port"
  row_randread_4k_qd64_j4 "$server" "$port"
  row_randwrite_4k_qd64_j4 "$server" "$port"
  row_seqread_1m_qd8_j1 "$server" "$port"
  row_seqwrite_1m_qd8_j1 "$server" "$port"
  stop_servers
}

# ---------------------------------------------------------------- main
main() {
  prepare_run "runtime ${RUNTIME}s, ramp ${RAMP}s, $PASSES pass(es)"
  make_image
  [[ "$TLS" == 1 ]] && make_pki

  local -a servers=(qemu-nbd nbdkit nbd-server)
  [[ "$SKIP_OURS" == 1 ]] || servers=(nbd-csi "${servers[@]}")
  if [[ "$TLS" == 1 ]]; then
    servers+=(qemu-nbd-tls nbdkit-tls)
    [[ "$SKIP_OURS" == 1 ]] || servers+=(nbd-csi-tls)
  fi
  each_pass bench_server "${servers[@]}"

  python3 "$BENCH_DIR/report.py" --results "$RESULTS" --output "$OUTPUT" \
    --runtime "$RUNTIME" --ramp "$RAMP" --passes "$PASSES" ${OURS_BIN:+--ours-bin "$OURS_BIN"}
  log "report written to $OUTPUT"
  ((FAILED == 0)) || die "some fio runs failed; see $RESULTS"
}

main "$@"
