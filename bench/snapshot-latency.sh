#!/usr/bin/env bash
# Snapshot benchmark (issue 14): write latency of a 4k randwrite fio load
# (nbd engine, one connection) against a published 4 GiB volume, fully
# written, before and during a snapshot of it; and how long the snapshot
# takes. Once with the data directory on ext4 (no reflink: copy-before-write)
# and once on XFS with reflink=1 (FICLONE), each a loop device over a sparse
# file. Targets: max write latency during the snapshot < 100 ms; the
# snapshot of the written 4 GiB volume on XFS < 1 s.
#
# Needs root (losetup, mkfs, mount). Starts the release controller on the
# loop filesystem, drives it with its own CLI (volume create/publish,
# snapshot create), and writes its section into BENCHMARKS.md between the
# snapshot-bench marker comments, leaving the rest of the file as it is.
#
# Environment:
#   BENCH_FILESYSTEMS  which to run (default "ext4 xfs")
#   BENCH_SIZE         volume size (default 4G)
#   BENCH_BEFORE       seconds of load measured before the snapshot (default 10)
#   BENCH_IODEPTH      fio iodepth (default 16)
#   BENCH_PORTS        NBD port range (default 12900-12909)
#   BENCH_WORKDIR      work directory (default: mktemp -d under $TMPDIR)
#   BENCH_OUTPUT       report file (default: <repo>/BENCHMARKS.md)
#   NBD_CSI_BIN        the nbd-csi-controller binary (default: cargo build --release)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=section.sh
. "$ROOT/bench/section.sh"
FILESYSTEMS="${BENCH_FILESYSTEMS:-ext4 xfs}"
SIZE="${BENCH_SIZE:-4G}"
BEFORE="${BENCH_BEFORE:-10}"
IODEPTH="${BENCH_IODEPTH:-16}"
PORTS="${BENCH_PORTS:-12900-12909}"
OUTPUT="${BENCH_OUTPUT:-$ROOT/BENCHMARKS.md}"
WORK="${BENCH_WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/nbd-csi-snapshot-bench.XXXXXX")}"
BEGIN='<!-- snapshot-bench:begin -->'
END='<!-- snapshot-bench:end -->'

log() { printf '[snapshot-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "needs root for loop devices and mounts"
for tool in fio losetup mkfs.ext4 mkfs.xfs filefrag python3; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done

if [[ -n "${NBD_CSI_BIN:-}" ]]; then
    BIN="$NBD_CSI_BIN"
else
    log "building the release controller"
    (. "$ROOT/tests/cargo.sh" && release_build)
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/nbd-csi-controller"
fi

mkdir -p "$WORK"
CONTROLLER_PID=""
LOOP=""
MNT=""
stop_controller() {
    if [[ -n "$CONTROLLER_PID" ]]; then
        kill -TERM "$CONTROLLER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$CONTROLLER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$CONTROLLER_PID" 2>/dev/null || true
        wait "$CONTROLLER_PID" 2>/dev/null || true
        CONTROLLER_PID=""
    fi
}
release_fs() {
    if [[ -n "$MNT" ]]; then umount "$MNT" 2>/dev/null || true; MNT=""; fi
    if [[ -n "$LOOP" ]]; then losetup -d "$LOOP" 2>/dev/null || true; LOOP=""; fi
}
cleanup() {
    stop_controller
    release_fs
    [[ -n "${BENCH_WORKDIR:-}" ]] || rm -rf "$WORK"
}
trap cleanup EXIT

# ms since the epoch, as fio's --log_unix_epoch logs completions.
now_ms() { date +%s%3N; }

run_fs() {
    local fs=$1 dir="$WORK/$1"
    mkdir -p "$dir/mnt"
    # Twice the volume plus room: the copy on ext4 takes as much again.
    truncate -s 12G "$dir/disk.img"
    LOOP=$(losetup -f --show "$dir/disk.img")
    case "$fs" in
        ext4) mkfs.ext4 -q -F "$LOOP" ;;
        xfs) mkfs.xfs -q -f -m reflink=1 "$LOOP" ;;
        *) die "unknown filesystem $fs" ;;
    esac
    mount "$LOOP" "$dir/mnt"
    MNT="$dir/mnt"
    local data="$dir/mnt/data" socket="$dir/csi.sock"
    log "$fs: starting the controller on $LOOP"
    RUST_LOG="${RUST_LOG:-info}" NO_COLOR=1 "$BIN" --data-dir "$data" --endpoint "unix://$socket" \
        --nbd-listen-address 127.0.0.1 --nbd-port-range "$PORTS" >"$dir/controller.log" 2>&1 &
    CONTROLLER_PID=$!
    for _ in $(seq 1 100); do
        [[ -S "$socket" ]] && break
        kill -0 "$CONTROLLER_PID" 2>/dev/null || { cat "$dir/controller.log"; die "controller exited"; }
        sleep 0.1
    done
    # The client's flags go after its subcommand.
    ctl() { "$BIN" "$@" --endpoint "unix://$socket" -o json; }
    local id uri
    id=$(ctl volume create bench --size "$SIZE" --block | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
    uri=$(ctl volume publish "$id" --node bench-node \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["publish_context"]["nbdUri"])')
    log "$fs: writing all of $SIZE through $uri"
    fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 --size="$SIZE" \
        --output="$dir/fill.txt" >/dev/null
    sync

    log "$fs: 4k randwrite load, snapshot after ${BEFORE}s"
    fio --name=load --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth="$IODEPTH" --size="$SIZE" \
        --time_based --runtime=600 --write_lat_log="$dir/load" --log_avg_msec=0 --log_unix_epoch=1 \
        --output-format=json --output="$dir/load.json" &
    local fio_pid=$!
    sleep "$BEFORE"
    local t0 t1
    t0=$(now_ms)
    ctl snapshot create bench-snap --volume "$id" >"$dir/snapshot.json"
    t1=$(now_ms)
    sleep 2
    kill -INT "$fio_pid"
    wait "$fio_pid" || true
    local snap shared=no
    snap=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$dir/snapshot.json")
    # Not grep -q: with pipefail, filefrag's SIGPIPE would fail the pipeline.
    filefrag -v "$data/snapshots/$snap.img" >"$dir/filefrag.txt"
    grep -q shared "$dir/filefrag.txt" && shared=yes
    python3 "$ROOT/bench/snapshot_report.py" row "$fs" "$dir/load_lat.1.log" "$t0" "$t1" "$BEFORE" "$shared" \
        >>"$WORK/rows.txt"
    stop_controller
    release_fs
    rm -f "$dir/disk.img"
}

: >"$WORK/rows.txt"
for fs in $FILESYSTEMS; do run_fs "$fs"; done

section="$WORK/section.md"
cpu="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
mem="$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
{
    echo "$BEGIN"
    echo "## Snapshots under a write load"
    echo
    echo "Written by \`bench/snapshot-latency.sh\` on $(date -u +%Y-%m-%d). Machine: ${cpu:-unknown CPU}, $(nproc) CPUs, $mem RAM,"
    echo "Linux $(uname -r); load average before the run $(cut -d' ' -f1-3 /proc/loadavg). Release build."
    echo "A $SIZE block volume, fully written (fio 1 MiB sequential), published; fio \`--ioengine=nbd --rw=randwrite"
    echo "--bs=4k --iodepth=$IODEPTH\` (one connection) on it; after ${BEFORE} s, \`nbd-csi-controller snapshot create\`."
    echo "Latency is fio's per-write total latency (\`--write_lat_log\`, every write): \"before\" the ${BEFORE} s"
    echo "before the call, \"during\" from the call until it returned. The data directory is a loop device over a"
    echo "sparse file on the host's disk. Targets: max during < 100 ms; the XFS snapshot < 1 s."
    echo
    python3 "$ROOT/bench/snapshot_report.py" table "$WORK/rows.txt"
    echo "$END"
} >"$section"

replace_section "$OUTPUT" "$section" "$BEGIN" "$END"
cat "$section"
log "wrote the section into $OUTPUT"
