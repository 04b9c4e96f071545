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
READY_TRIES=50 # x 0.2 s

WORK="${BENCH_WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/nbd-csi-bench.XXXXXX")}"
mkdir -p "$WORK"
IMAGE="$WORK/disk.img"
RESULTS="$WORK/results"
# Certificates for the TLS servers and the client (made with openssl,
# valid 2 days). fio's nbd engine passes libnbd only the URI, and libnbd
# refuses its tls-certificates= parameter unless the program allows local
# files: a preloaded shim (bench/libnbd_uri_certificates.c, built here)
# allows them before each nbd_connect_uri.
PKI="$WORK/pki"
URI_SHIM="$WORK/libnbd_uri_certificates.so"
if [[ "$SKIP_OURS" == 1 ]]; then
  OUTPUT="${BENCH_OUTPUT:-$WORK/BENCHMARKS.md}"
else
  OUTPUT="${BENCH_OUTPUT:-$ROOT/BENCHMARKS.md}"
fi

SERVER_PID=""      # pid of the running server (or of its `timeout` wrapper)
SCHEME=nbd         # the URI scheme of the running server: nbd, or nbds (TLS)
CLIENT_ENV=(env)   # libnbd's environment (fio, nbdinfo): the shim for TLS
SERVER_PIDFILE=""  # set for daemonising servers (nbd-server)
PASS=0             # current pass, 1..PASSES
FIO_PID=""         # pid of the running fio's `timeout` wrapper
FAILED=0

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- cleanup
pid_alive() {
  # A daemon re-parented to a non-reaping pid 1 lingers as a zombie.
  local st
  st="$(ps -o stat= -p "$1" 2>/dev/null || true)"
  [[ -n "$st" && "$st" != Z* ]]
}

# The pid to signal: the daemon's (from its pid file) or our child's.
server_pid() {
  if [[ -n "$SERVER_PIDFILE" && -s "$SERVER_PIDFILE" ]]; then
    cat "$SERVER_PIDFILE"
  else
    echo "$SERVER_PID"
  fi
}

stop_server() {
  local pid
  pid="$(server_pid)"
  if [[ -n "$pid" ]] && pid_alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 50; i++)); do
      pid_alive "$pid" || break
      sleep 0.1
    done
    if pid_alive "$pid"; then
      log "server $pid ignored SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  if [[ -n "$SERVER_PID" ]]; then
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
  SERVER_PIDFILE=""
}

cleanup() {
  local rc=$?
  if [[ -n "$FIO_PID" ]]; then
    kill -TERM "$FIO_PID" 2>/dev/null || true
    wait "$FIO_PID" 2>/dev/null || true
  fi
  stop_server
  rm -f "$IMAGE"
  [[ -d "$RESULTS" ]] && log "raw results kept in $RESULTS"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- setup
install_deps() {
  local -a missing=()
  local pair cmd pkg
  for pair in fio:fio qemu-nbd:qemu-utils nbdkit:nbdkit nbd-server:nbd-server \
    nbdinfo:libnbd-bin python3:python3 timeout:coreutils openssl:openssl cc:gcc; do
    cmd="${pair%%:*}" pkg="${pair#*:}"
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  done
  # fio's nbd engine ships inside Debian's fio package.
  if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    local sudo=""
    ((EUID == 0)) || sudo=sudo
    # Wait up to 10 minutes for a dpkg lock held by another installer.
    if ! $sudo apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${missing[@]}"; then
      $sudo apt-get -o DPkg::Lock::Timeout=600 update
      $sudo apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${missing[@]}"
    fi
  fi
  fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd ioengine"
}

build_ours() {
  if [[ "$SKIP_OURS" == 1 ]]; then
    log "BENCH_SKIP_OURS=1: not benchmarking nbd-csi (development only)"
    OURS_BIN=""
    return
  fi
  if [[ -n "${NBD_CSI_BIN:-}" ]]; then
    OURS_BIN="$NBD_CSI_BIN"
  else
    log "building nbd-csi-controller (release)"
    (. "$ROOT/tests/cargo.sh" && release_build)
    OURS_BIN="$ROOT/target/release/nbd-csi-controller"
  fi
  [[ -x "$OURS_BIN" ]] || die "no executable at $OURS_BIN"
}

make_image() {
  log "writing $IMAGE_SIZE of random data to $IMAGE"
  head -c "$IMAGE_SIZE" /dev/urandom >"$IMAGE"
  sync "$IMAGE"
}

# A CA, a server certificate for 127.0.0.1 in our server's layout and in
# the one qemu-nbd and nbdkit share, and a client certificate for libnbd.
make_pki() {
  local ca="$PKI/ca"
  mkdir -p "$ca" "$PKI/nbd-csi" "$PKI/x509" "$PKI/client"
  local -a ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
  openssl req -x509 "${ec[@]}" -keyout "$ca/ca.key" -out "$ca/ca.crt" -days 2 -subj /CN=nbd-csi-bench-ca \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
  local name usage
  for name in server client; do
    usage=serverAuth
    [[ "$name" == client ]] && usage=clientAuth
    openssl req "${ec[@]}" -keyout "$ca/$name.key" -out "$ca/$name.csr" -subj "/CN=bench-$name" 2>/dev/null
    printf 'subjectAltName=%s\nextendedKeyUsage=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n' \
      "$([[ "$name" == server ]] && echo IP:127.0.0.1 || echo DNS:bench-client)" "$usage" >"$ca/$name.ext"
    openssl x509 -req -in "$ca/$name.csr" -CA "$ca/ca.crt" -CAkey "$ca/ca.key" -CAcreateserial -days 2 \
      -extfile "$ca/$name.ext" -out "$ca/$name.crt" 2>/dev/null
  done
  cp "$ca/ca.crt" "$PKI/nbd-csi/ca.crt"
  cp "$ca/server.crt" "$PKI/nbd-csi/tls.crt"
  cp "$ca/server.key" "$PKI/nbd-csi/tls.key"
  cp "$ca/ca.crt" "$PKI/x509/ca-cert.pem"
  cp "$ca/server.crt" "$PKI/x509/server-cert.pem"
  cp "$ca/server.key" "$PKI/x509/server-key.pem"
  cp "$ca/ca.crt" "$PKI/client/ca-cert.pem"
  cp "$ca/client.crt" "$PKI/client/client-cert.pem"
  cp "$ca/client.key" "$PKI/client/client-key.pem"
  cc -shared -fPIC -O2 -o "$URI_SHIM" "$BENCH_DIR/libnbd_uri_certificates.c" -ldl
}

# The running server's URI (with the client's certificates under TLS).
uri() {
  if [[ "$SCHEME" == nbds ]]; then
    echo "nbds://127.0.0.1:$1/$EXPORT?tls-certificates=$PKI/client"
  else
    echo "nbd://127.0.0.1:$1/$EXPORT"
  fi
}

# Same page-cache state for every server: image clean and fully cached.
warm_cache() {
  sync "$IMAGE"
  cat "$IMAGE" >/dev/null
}

# Other load on the machine skews everything; say so (the report records it).
check_quiet() {
  local load
  read -r load _ </proc/loadavg
  cp /proc/loadavg "$RESULTS/loadavg.start"
  if python3 -c 'import os, sys; sys.exit(float(sys.argv[1]) < 0.5 * len(os.sched_getaffinity(0)))' "$load"; then
    log "warning: load average is $load before the runs; results will be noisy"
  fi
}

free_port() {
  python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# Wait until the export answers on 127.0.0.1:$1 with the right size.
wait_ready() {
  local port="$1" i size
  for ((i = 0; i < READY_TRIES; i++)); do
    if ! pid_alive "$(server_pid)"; then
      die "server exited during start-up (see $SERVER_LOG)"
    fi
    size="$("${CLIENT_ENV[@]}" timeout 5 nbdinfo --size "$(uri "$port")" 2>/dev/null || true)"
    if [[ "$size" == "$(stat -c %s "$IMAGE")" ]]; then
      return 0
    fi
    sleep 0.2
  done
  die "server on port $port not ready after $READY_TRIES tries (see $SERVER_LOG)"
}

# Run a server in the background under `timeout`, recording its command line.
launch() {
  local name="$1"
  shift
  mkdir -p "$RESULTS/$name"
  SERVER_LOG="$RESULTS/$name/server.log"
  printf '%q ' "$@" | sed 's/ $//' >"$RESULTS/$name/server.cmd"
  timeout --signal=TERM --kill-after=10 "$SERVER_TIMEOUT" "$@" >"$SERVER_LOG" 2>&1 &
  SERVER_PID=$!
}

# ---------------------------------------------------------------- servers
# Each takes the port; each serves $IMAGE read-write as export "bench".

start_nbd_csi() {
  launch nbd-csi "$OURS_BIN" serve-file "$IMAGE" \
    --listen "127.0.0.1:$1" --export-name "$EXPORT"
}

# QEMU's block layer in writeback (page cache) mode like the others; up to 8
# clients (>= numjobs) on the one export; worker-thread AIO.
start_qemu_nbd() {
  launch qemu-nbd qemu-nbd --persistent --shared=8 --cache=writeback \
    --aio=threads -f raw \
    --bind 127.0.0.1 --port "$1" --export-name "$EXPORT" "$IMAGE"
}

# nbdkit's file plugin (parallel thread model) with 16 worker threads per
# connection; page-cache access (cache=default).
start_nbdkit() {
  launch nbdkit nbdkit --foreground --exit-with-parent --threads 16 \
    -i 127.0.0.1 -p "$1" -e "$EXPORT" file "$IMAGE"
}

# The TLS servers: each as above, TLS required (TLS 1.3 where the client
# offers it; every server verifies the client's certificate against the CA).
start_nbd_csi_tls() {
  launch nbd-csi-tls "$OURS_BIN" serve-file "$IMAGE" \
    --listen "127.0.0.1:$1" --export-name "$EXPORT" --tls required --tls-dir "$PKI/nbd-csi"
}

start_qemu_nbd_tls() {
  launch qemu-nbd-tls qemu-nbd --persistent --shared=8 --cache=writeback \
    --aio=threads -f raw \
    --object "tls-creds-x509,id=tls0,dir=$PKI/x509,endpoint=server,verify-peer=on" --tls-creds tls0 \
    --bind 127.0.0.1 --port "$1" --export-name "$EXPORT" "$IMAGE"
}

start_nbdkit_tls() {
  launch nbdkit-tls nbdkit --foreground --exit-with-parent --threads 16 \
    --tls=require --tls-certificates "$PKI/x509" --tls-verify-peer \
    -i 127.0.0.1 -p "$1" -e "$EXPORT" file "$IMAGE"
}

# The reference server. Its -d (no fork) mode serves one connection and
# exits, so it runs as the usual daemon (one process per connection) with a
# pid file, and the TERM we send makes it kill its per-client children.
start_nbd_server() {
  local port="$1" dir="$RESULTS/nbd-server"
  mkdir -p "$dir"
  SERVER_LOG="$dir/server.log"
  cat >"$dir/config" <<EOF
[generic]
listenaddr = 127.0.0.1
port = $port
max_threads = 8

[$EXPORT]
exportname = $IMAGE
flush = true
fua = true
trim = true
EOF
  SERVER_PIDFILE="$dir/nbd-server.pid"
  rm -f "$SERVER_PIDFILE"
  local -a cmd=(nbd-server -C "$dir/config" -p "$SERVER_PIDFILE")
  printf '%q ' "${cmd[@]}" | sed 's/ $//' >"$dir/server.cmd"
  timeout 30 "${cmd[@]}" >"$SERVER_LOG" 2>&1 || die "nbd-server failed to start (see $SERVER_LOG)"
  local i
  for ((i = 0; i < READY_TRIES; i++)); do
    [[ -s "$SERVER_PIDFILE" ]] && break
    sleep 0.2
  done
  [[ -s "$SERVER_PIDFILE" ]] || die "nbd-server wrote no pid file"
}

# ---------------------------------------------------------------- fio rows
# run_fio SERVER PORT ROW fio-args...: one bounded fio run, JSON to results.
run_fio() {
  local server="$1" port="$2" row="$3"
  shift 3
  local base="$RESULTS/$server/$row.$PASS"
  local -a cmd=(fio --name="$row" --ioengine=nbd
    --uri="$(uri "$port")" --size="$IMAGE_SIZE"
    --time_based --runtime="$RUNTIME" --ramp_time="$RAMP"
    "$@" --output-format=json --output="$base.json")
  local env=""
  [[ "$SCHEME" == nbds ]] && env="LD_PRELOAD=\$WORK/libnbd_uri_certificates.so "
  { printf '%s' "$env"; printf '%q ' "${cmd[@]}" | sed 's/ $//'; } >"$RESULTS/$server/$row.cmd"
  log "$server: $row (pass $PASS/$PASSES)"
  local root ticks_before started
  root="$(server_pid)"
  ticks_before="$(tree_ticks "$root")"
  started="$(date +%s.%N)"
  # In the background so that a signal to this script is handled at once.
  "${CLIENT_ENV[@]}" timeout --kill-after=10 "$FIO_TIMEOUT" "${cmd[@]}" 2>"$base.err" &
  FIO_PID=$!
  if ! wait "$FIO_PID"; then
    log "$server: $row FAILED (see $base.err)"
    touch "$base.failed"
    FAILED=1
  fi
  FIO_PID=""
  # Let forking servers reap their per-connection children first.
  sleep 0.5
  echo "$(($(tree_ticks "$root") - ticks_before)) $(getconf CLK_TCK) $started $(date +%s.%N)" >"$base.cpu"
}

# tree_ticks PID: CPU ticks (user+system, with reaped children) of PID and
# every live descendant, to compare servers' CPU cost per I/O.
tree_ticks() {
  local pid="$1" total child
  total="$(awk '{ print $14 + $15 + $16 + $17 }' "/proc/$pid/stat" 2>/dev/null || echo 0)"
  for child in $(pgrep -P "$pid" 2>/dev/null); do
    total=$((total + $(tree_ticks "$child")))
  done
  echo "$total"
}

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
  stop_server
}

# ---------------------------------------------------------------- main
main() {
  install_deps
  build_ours
  mkdir -p "$RESULTS"
  check_quiet
  log "work dir: $WORK (runtime ${RUNTIME}s, ramp ${RAMP}s, $PASSES pass(es))"
  make_image
  [[ "$TLS" == 1 ]] && make_pki

  local -a servers=(qemu-nbd nbdkit nbd-server)
  [[ "$SKIP_OURS" == 1 ]] || servers=(nbd-csi "${servers[@]}")
  if [[ "$TLS" == 1 ]]; then
    servers+=(qemu-nbd-tls nbdkit-tls)
    [[ "$SKIP_OURS" == 1 ]] || servers+=(nbd-csi-tls)
  fi
  local n=${#servers[@]} i
  # Each pass runs every server once; the order rotates between passes so
  # that drifting background load is spread over all servers.
  for ((PASS = 1; PASS <= PASSES; PASS++)); do
    for ((i = 0; i < n; i++)); do
      bench_server "${servers[(i + PASS - 1) % n]}"
    done
  done

  python3 "$BENCH_DIR/report.py" --results "$RESULTS" --output "$OUTPUT" \
    --runtime "$RUNTIME" --ramp "$RAMP" --passes "$PASSES" ${OURS_BIN:+--ours-bin "$OURS_BIN"}
  log "report written to $OUTPUT"
  ((FAILED == 0)) || die "some fio runs failed; see $RESULTS"
}

main "$@"
