# shellcheck shell=bash
# The benchmark scripts' servers and client runs, sourced by bench/run.sh,
# bench/matrix.sh and bench/volumes.sh so that every table is measured with
# the same server command lines, the same fio invocation and the same CPU
# accounting.
#
# The sourcing script sets BENCH_NAME (its log prefix and work directory's
# name), ROOT, BENCH_DIR, IMAGE_SIZE, EXPORT, RUNTIME, RAMP, PASSES,
# FIO_TIMEOUT, SERVER_TIMEOUT and SKIP_OURS first, and IMAGE (the file the
# next server serves) once WORK is set here.

log() { printf '[%s %(%H:%M:%S)T] %s\n' "$BENCH_NAME" -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

WORK="${BENCH_WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/nbd-csi-$BENCH_NAME.XXXXXX")}"
mkdir -p "$WORK"
RESULTS="$WORK/results" # kept at exit: the raw results
OUTPUT="${BENCH_OUTPUT:-$ROOT/BENCHMARKS.md}"
# Certificates for the TLS servers and the client (make_pki, with openssl,
# valid 2 days). fio's nbd engine passes libnbd only the URI, and libnbd
# refuses its tls-certificates= parameter unless the program allows local
# files: a preloaded shim (bench/libnbd_uri_certificates.c, built into
# URI_SHIM) allows them before each nbd_connect_uri.
PKI="$WORK/pki"
URI_SHIM="$WORK/libnbd_uri_certificates.so"
PASS=0             # current pass, 1..PASSES
READY_TRIES=50 # x 0.2 s
SERVER_PIDS=()     # the running servers (their `timeout` wrappers)
SCHEME=nbd         # the URI scheme of the running servers: nbd, or nbds (TLS)
CLIENT_ENV=(env)   # libnbd's environment (fio, nbdinfo): the shim for TLS
SERVER_PIDFILE=""  # set for daemonising servers (nbd-server)
SERVER_LOG=""      # the last started server's log
FIO_PID=""         # pid of the running fio's `timeout` wrapper
FAILED=0

# ---------------------------------------------------------------- cleanup
pid_alive() {
  # A daemon re-parented to a non-reaping pid 1 lingers as a zombie.
  local st
  st="$(ps -o stat= -p "$1" 2>/dev/null || true)"
  [[ -n "$st" && "$st" != Z* ]]
}

# The pids to signal: the daemon's (from its pid file) or our children's.
server_pids() {
  if [[ -n "$SERVER_PIDFILE" && -s "$SERVER_PIDFILE" ]]; then
    cat "$SERVER_PIDFILE"
  else
    printf '%s\n' "${SERVER_PIDS[@]}"
  fi
}

stop_servers() {
  local pid i
  for pid in $(server_pids); do
    pid_alive "$pid" && kill -TERM "$pid" 2>/dev/null
  done
  for pid in $(server_pids); do
    for ((i = 0; i < 50; i++)); do
      pid_alive "$pid" || break
      sleep 0.1
    done
    if pid_alive "$pid"; then
      log "server $pid ignored SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for pid in "${SERVER_PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  SERVER_PIDS=()
  SERVER_PIDFILE=""
}

cleanup() {
  local rc=$?
  if [[ -n "$FIO_PID" ]]; then
    kill -TERM "$FIO_PID" 2>/dev/null || true
    wait "$FIO_PID" 2>/dev/null || true
  fi
  stop_servers
  rm -f "$WORK"/*.img
  [[ -d "$RESULTS" ]] && log "raw results kept in $RESULTS"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# parse_quick ARGS...: QUICK=1 for `--quick`, 0 for nothing, usage otherwise.
parse_quick() {
  case "${1:-}" in
    --quick) QUICK=1 ;;
    "") QUICK=0 ;;
    *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
  esac
}

# prepare_run DESCRIPTION: the tools, our binary, the results directory
# and a note of the machine's load, before any server starts.
prepare_run() {
  install_deps
  build_ours
  mkdir -p "$RESULTS"
  check_quiet
  log "work dir: $WORK ($1)"
}

# ---------------------------------------------------------------- setup
install_deps() {
  local -a missing=()
  local pair cmd pkg
  for pair in fio:fio qemu-nbd:qemu-utils nbdkit:nbdkit nbd-server:nbd-server \
    nbdinfo:libnbd-bin python3:python3 timeout:coreutils openssl:openssl cc:gcc; do
    cmd="${pair%%:*}" pkg="${pair#*:}"
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  done
  # libnbd's Python binding (bench/fua_latency.py) serves Debian's python3;
  # `nbd.NBD` because the repository's nbd/ directory imports as a package.
  /usr/bin/python3 -c 'import nbd; nbd.NBD' 2>/dev/null || missing+=(python3-libnbd)
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

# wait_ready PORT [FILE]: until the export answers on 127.0.0.1:PORT with
# FILE's size (default $IMAGE).
wait_ready() {
  local port="$1" file="${2:-$IMAGE}" i size pid
  for ((i = 0; i < READY_TRIES; i++)); do
    for pid in $(server_pids); do
      pid_alive "$pid" || die "server exited during start-up (see $SERVER_LOG)"
    done
    size="$("${CLIENT_ENV[@]}" timeout 5 nbdinfo --size "$(uri "$port")" 2>/dev/null || true)"
    if [[ "$size" == "$(stat -c %s "$file")" ]]; then
      return 0
    fi
    sleep 0.2
  done
  die "server on port $port not ready after $READY_TRIES tries (see $SERVER_LOG)"
}

# launch NAME COMMAND...: a server in the background under `timeout`,
# recording its command line; several may run at once (bench/volumes.sh).
launch() {
  local name="$1"
  shift
  mkdir -p "$RESULTS/$name"
  SERVER_LOG="$RESULTS/$name/server.log"
  printf '%q ' "$@" | sed 's/ $//' >"$RESULTS/$name/server.cmd"
  timeout --signal=TERM --kill-after=10 "$SERVER_TIMEOUT" "$@" >"$SERVER_LOG" 2>&1 &
  SERVER_PIDS+=($!)
}

# ---------------------------------------------------------------- servers
# Each start_SERVER takes the port and serves $IMAGE read-write as export
# $EXPORT. The peers' command lines come from one function each
# (peer_command PORT FILE sets CMD), so that bench/volumes.sh runs one
# process per volume with exactly the line the other tables use.

start_nbd_csi() {
  launch nbd-csi "$OURS_BIN" serve-file "$IMAGE" \
    --listen "127.0.0.1:$1" --export-name "$EXPORT"
}

# QEMU's block layer in writeback (page cache) mode like the others; up to 8
# clients (>= numjobs) on the one export; worker-thread AIO.
qemu_nbd_command() {
  CMD=(qemu-nbd --persistent --shared=8 --cache=writeback --aio=threads -f raw
    --bind 127.0.0.1 --port "$1" --export-name "$EXPORT" "$2")
}
start_qemu_nbd() {
  qemu_nbd_command "$1" "$IMAGE"
  launch qemu-nbd "${CMD[@]}"
}

# nbdkit's file plugin (parallel thread model) with 16 worker threads per
# connection; page-cache access (cache=default).
nbdkit_command() {
  CMD=(nbdkit --foreground --exit-with-parent --threads 16
    -i 127.0.0.1 -p "$1" -e "$EXPORT" file "$2")
}
start_nbdkit() {
  nbdkit_command "$1" "$IMAGE"
  launch nbdkit "${CMD[@]}"
}

# The client's ceiling, not a peer: nbdkit's null plugin (reads return
# zeros, writes are dropped, no file at all) with the threads above. What
# fio reaches against it is what the client can drive on this machine.
start_null() {
  launch null nbdkit --foreground --exit-with-parent --threads 16 \
    -i 127.0.0.1 -p "$1" -e "$EXPORT" null "size=$(stat -c %s "$IMAGE")"
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

# each_pass FUNCTION SERVER...: every pass runs FUNCTION once per server,
# the order rotated between passes so that drifting background load is
# spread over all servers.
each_pass() {
  local function=$1
  shift
  local -a servers=("$@")
  local n=${#servers[@]} i
  for ((PASS = 1; PASS <= PASSES; PASS++)); do
    for ((i = 0; i < n; i++)); do
      "$function" "${servers[(i + PASS - 1) % n]}"
    done
  done
}

# ---------------------------------------------------------------- fio
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
  local ticks_before started
  ticks_before="$(servers_ticks)"
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
  echo "$(($(servers_ticks) - ticks_before)) $(getconf CLK_TCK) $started $(date +%s.%N)" >"$base.cpu"
}

# servers_ticks: CPU ticks of every running server and its descendants.
servers_ticks() {
  local total=0 pid
  for pid in $(server_pids); do
    total=$((total + $(tree_ticks "$pid")))
  done
  echo "$total"
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

