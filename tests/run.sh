#!/usr/bin/env bash
# The project's test command (README "Test"). Installs what it needs when
# missing, then runs formatting, lints, the Rust tests (unit, property,
# session, gRPC, interop with real NBD clients) and the conformance suites.
# Every suite runs even if an earlier one failed; the last line sums them.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p target
results=target/test-results.txt
: >"$results"

# Real NBD peers the interop tests drive, from Debian packages; and the
# filesystems the snapshot-fs suite makes (a fresh machine has no mkfs.xfs).
apt_packages=(qemu-utils nbdkit libnbd-bin python3-libnbd nbd-server fio xfsprogs e2fsprogs)
missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" || exit 1
fi
for component in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
done

# record SUITE PASSED FAILED SKIPPED: with the seconds since the previous
# record (each suite's wall time, its builds included), so that a run's
# output says where its time went (CI has a time limit).
last_record=$SECONDS
record() {
    local took=$((SECONDS - last_record))
    last_record=$SECONDS
    echo "$1 $2 $3 $4 $took" >>"$results"
    echo "== $1: $2 passed, $3 failed, $4 skipped ($took s)"
}
# check SUITE COMMAND...: a suite that is one pass/fail check.
check() {
    local name=$1; shift
    if "$@"; then record "$name" 1 0 0; else record "$name" 0 1 0; fi
}

# suite NAME SCRIPT: a script whose last "NAME: N passed, N failed" line counts.
suite() {
    local name=$1 script=$2 log="target/suite-$1.txt"
    "$script" 2>&1 | tee "$log"
    local status=${PIPESTATUS[0]} p f
    read -r p f < <(grep -Eo '[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1 | awk '{ print $1, $3 }')
    p=${p:-0} f=${f:-0}
    [ "$status" -ne 0 ] && [ "$f" -eq 0 ] && f=1
    record "$name" "$p" "$f" 0
}

check fmt cargo fmt --all -- --check
check clippy cargo clippy --workspace --all-targets --locked -- -D warnings
# The API docs build without warnings (broken intra-doc links, stray HTML).
# The examples too: with them the dependencies have clippy's features, so
# their metadata from the step above serves rustdoc without a new check.
check doc env RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --locked --lib --bins --examples
# Licences, duplicate versions and sources of the locked graph (deny.toml);
# cargo-deny is built once into the tools cache.
suite supply-chain ./tests/supply-chain.sh

cargo test --workspace --locked 2>&1 | tee target/cargo-test.txt
cargo_status=${PIPESTATUS[0]}
read -r p f s < <(awk '/^test result:/ { p += $4; f += $6; s += $8 } END { print p+0, f+0, s+0 }' target/cargo-test.txt)
# A build failure prints no result line: count it as a failure.
[ "$cargo_status" -ne 0 ] && [ "$f" -eq 0 ] && f=1
record cargo-test "$p" "$f" "$s"

# Snapshots under writes with the data directory on ext4 (copy-before-write)
# and on XFS with reflink (FICLONE), loop devices (root).
suite snapshot-fs ./tests/snapshot-fs.sh

# The benchmark reports' logic (tables, cell names, bench/compare.py).
check bench-reports python3 bench/test_report.py
# Unix-socket CSI endpoints called by gRPC C-core (Python grpcio).
suite grpc-clients ./tests/grpc-clients.sh
# Both metrics endpoints (the storage role, the node plugin) as processes,
# parsed with Prometheus' text parser.
suite metrics ./tests/metrics.sh

./tests/csi-sanity.sh
sanity_status=$?
read -r p f s < <(grep -Eo '[0-9]+ Passed \| [0-9]+ Failed \| [0-9]+ Pending \| [0-9]+ Skipped' target/csi-sanity.log 2>/dev/null \
    | awk '{ print $1, $4, $7 + $10 }' | tail -n 1)
p=${p:-0} f=${f:-0} s=${s:-0}
[ "$sanity_status" -ne 0 ] && [ "$f" -eq 0 ] && f=1
record csi-sanity "$p" "$f" "$s"

# The node plugin and the server on a real kernel with nbd.ko, in a qemu VM.
suite vm ./tests/vm/run.sh

# The chart, deploy/ and the Dockerfile; then the chart on a real
# kube-apiserver on 127.0.0.1 (tools are built once into ~/.cache/nbd-csi).
suite chart ./tests/chart.sh
# Every container of the rendered chart that starts our binaries, run with
# its exact arguments and env in the binaries' validation mode.
suite chart-args ./tests/chart-args.sh
suite apiserver ./tests/k8s/apiserver.sh
# Controller, csi-provisioner and csi-attacher as processes against it.
suite e2e ./tests/k8s/e2e.sh
# The nbd.csi.dev CRDs on that API server and the agent's reconciler against them.
suite crds ./tests/k8s/crds.sh
# Cluster mode end to end: three agent processes, the controller, the sidecars.
suite scale-out ./tests/k8s/scale-out.sh
# Cluster mode's bad input and faults: the API server stopped and killed,
# objects edited by hand, an agent whose Lease expires.
suite faults ./tests/k8s/faults.sh
# Cluster mode driven by Kubernetes' own controllers (kube-controller-manager,
# kube-scheduler) with two controller replicas: attach, an agent restart,
# fencing of an out-of-service node, the leader killed, a drain.
suite controllers ./tests/k8s/controllers.sh
# The chart as users run it: helm install on a one-node cluster (kubelet,
# containerd, Kubernetes' own controllers) in the qemu VM, images built here.
# Last, and alone: a build or another VM beside it starves the guest.
suite cluster ./tests/cluster/run.sh

awk '{ printf "%s%s %d s", (NR > 1 ? ", " : "wall time by suite: "), $1, $5 } END { printf " (%d min in all)\n", '"$SECONDS"' / 60 }' "$results"
awk '{ p += $2; f += $3; s += $4 } END { printf "%d passed, %d failed, %d skipped\n", p, f, s; exit (f > 0) }' "$results"
