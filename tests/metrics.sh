#!/usr/bin/env bash
# Both metrics endpoints, as processes, scraped and parsed with Prometheus'
# own text parser (Python prometheus_client; tests/metrics_scrape.py):
#   - the storage role (the controller's embedded agent: the same metrics an
#     `nbd-csi-controller agent` process serves) with two volumes, one
#     written through NBD: allocated bytes, capacities, the store's free
#     bytes against statvfs;
#   - the node plugin: its process figures and an empty volume set. This
#     host has no nbd.ko; a staged volume's metrics are checked on a real
#     kernel by the VM scenario `metrics` (tests/vm/scenarios.sh).
# Needs python3-prometheus-client and python3-libnbd (installed when
# missing; Debian's packages serve /usr/bin/python3).
set -euo pipefail
cd "$(dirname "$0")/.."
py=/usr/bin/python3
missing=()
"$py" -c 'import prometheus_client' 2>/dev/null || missing+=(python3-prometheus-client)
"$py" -c 'import nbd' 2>/dev/null || missing+=(python3-libnbd)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
fi
. tests/cargo.sh
debug_build
bin=${CARGO_TARGET_DIR:-target}/debug
work=$(mktemp -d)
pids=()
cleanup() {
    [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null
    wait 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
passed=0
failed=0

# Both listen on port 0; the address is read from the log.
export NO_COLOR=1 RUST_LOG=info
"$bin/nbd-csi-controller" --data-dir "$work/data" --endpoint "unix://$work/controller.sock" \
    --nbd-port-range 27950-27959 --metrics-address 127.0.0.1:0 >"$work/controller.log" 2>&1 &
pids+=($!)
"$bin/nbd-csi-node" serve --endpoint "unix://$work/node.sock" --node-id metrics-node \
    --state-dir "$work/state" --metrics-address 127.0.0.1:0 >"$work/node.log" 2>&1 &
pids+=($!)
listening() { sed -n 's/.*metrics listening address=\([0-9.:]*\).*/\1/p' "$1" | head -1; }
storage_addr='' node_addr=''
for _ in $(seq 100); do
    storage_addr=$(listening "$work/controller.log") node_addr=$(listening "$work/node.log")
    [ -n "$storage_addr" ] && [ -n "$node_addr" ] && [ -S "$work/controller.sock" ] && break
    sleep 0.1
done
if [ -z "$storage_addr" ] || [ -z "$node_addr" ]; then
    echo "--- controller log"; tail -n 20 "$work/controller.log"
    echo "--- node log"; tail -n 20 "$work/node.log"
    echo "FAILED: the metrics endpoints did not come up within 10 s" >&2
    echo "metrics: 0 passed, 1 failed"
    exit 1
fi

cli() { "$bin/nbd-csi-controller" "$@" --endpoint "unix://$work/controller.sock" -o json; }
id_of() { "$py" -c 'import json, sys; print(json.load(sys.stdin)["id"])'; }
written=$(cli volume create metrics-written --size 64M --block | id_of)
empty=$(cli volume create metrics-empty --size 64M --block | id_of)
uri=$(cli volume publish "$written" --node metrics-node |
    "$py" -c 'import json, sys; print(json.load(sys.stdin)["publish_context"]["nbdUri"])')

status=0
(cd tests && "$py" metrics_scrape.py "$storage_addr" "$node_addr" "$work/data" "$written" "$uri" "$empty") \
    >"$work/out.txt" 2>&1 || status=$?
cat "$work/out.txt"
passed=$(grep -c '^ok:' "$work/out.txt" || true)
failed=$(grep -c '^FAILED:' "$work/out.txt" || true)
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
    failed=1
    echo "--- controller log"; tail -n 20 "$work/controller.log"
    echo "--- node log"; tail -n 20 "$work/node.log"
fi
echo "metrics: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
