#!/usr/bin/env bash
# Both binaries' Unix-socket endpoints answer gRPC clients other than Go's:
# Python grpcio (gRPC C-core), which sends the socket path as :authority.
# grpcio is installed once into the tool cache (PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/k8s/tools.sh
ensure_grpcio
pydir=$GRPCIO_DIR
. tests/cargo.sh
debug_build
bin=${CARGO_TARGET_DIR:-target}/debug
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

"$bin/nbd-csi-controller" --data-dir "$work/data" --endpoint "unix://$work/controller.sock" \
    --nbd-port-range 27900-27909 >"$work/controller.log" 2>&1 &
pids+=($!)
"$bin/nbd-csi-node" serve --endpoint "unix://$work/node.sock" --node-id grpc-clients-node \
    --state-dir "$work/state" >"$work/node.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    [ -S "$work/controller.sock" ] && [ -S "$work/node.sock" ] && break
    sleep 0.1
done
status=0
PYTHONPATH=$pydir python3 tests/grpc_clients.py "$work/controller.sock" "$work/node.sock" nbd.csi.dev grpc-clients-node \
    || status=$?
if [ "$status" -ne 0 ]; then
    echo "--- controller log"; tail -n 20 "$work/controller.log"
    echo "--- node log"; tail -n 20 "$work/node.log"
fi
exit "$status"
