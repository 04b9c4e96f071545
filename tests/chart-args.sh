#!/usr/bin/env bash
# The chart's containers start our binaries with arguments the binaries
# accept. For the default values and each variant values.schema.json allows,
# renders the chart and runs every container that starts nbd-csi-controller
# or nbd-csi-node with its exact command, arguments and environment ($(VAR)
# expanded as Kubernetes does) in the binaries' validation mode
# (NBD_CSI_VALIDATE_ARGS=1: clap parses it as a real start would, the
# start-up checks run, the settings are printed, nothing is touched). A
# flag or subcommand renamed in the code fails here at once. Also checks the
# printed settings: driver name, port range, the node's state directory on
# a hostPath, the CSI socket shared with the sidecars, the storage agent's
# data on a hostPath and its export key from a Secret, every --tls-dir a
# read-only emptyDir mount (tests/chart_args.py).
# Needs helm (built into ~/.cache/nbd-csi/tools-v1 like tests/chart.sh),
# python3 with PyYAML, and a debug build of the two binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/k8s/tools.sh

CHART=${NBD_CSI_CHART:-charts/nbd-csi}
passed=0
failed=0

ensure_helm
helm=$TOOLS_BIN/helm
# PyYAML for whichever python3 is first on PATH (Debian's python3-yaml
# serves only /usr/bin/python3).
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check pyyaml
. tests/cargo.sh
debug_build
bin_dir=$(cargo metadata --format-version 1 --no-deps --offline |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# name|helm arguments|expectations (CONTAINER.KEY=VALUE, space-separated)
variants=(
    "default||nbd-csi-controller.driver_name=nbd.csi.dev nbd-csi-node.driver_name=nbd.csi.dev nbd-csi-controller.nbd_port_range=10900-10999 nbd-csi-controller.advertise_address=10.244.1.7 nbd-csi-controller.metrics_address=0.0.0.0:9810 nbd-csi-node.node_id=node-1 nbd-csi-node.connections=4 nbd-csi-node.state_dir=/var/lib/kubelet/plugins/nbd.csi.dev/state nbd-csi-node.metrics_address=0.0.0.0:9813 nbd-csi-controller.tls_issuer=builtin nbd-csi-controller.tls_secret_prefix=nbd-csi nbd-csi-controller.tls_cert_lifetime=7776000s nbd-csi-controller.namespace=kube-system nbd-csi-node.tls_dir=/run/nbd-csi/tls nbd-csi-node.tls_secret=nbd-csi-node-node-1 nbd-csi-controller.default_tls=required nbd-csi-controller.tls_dir=/run/nbd-csi/tls"
    "tls-cert-manager|--set tls.issuer=cert-manager --set tls.certLifetime=720h|nbd-csi-controller.tls_issuer=cert-manager nbd-csi-controller.tls_cert_manager_issuer=nbd-csi-ca nbd-csi-controller.tls_cert_lifetime=2592000s"
    "tls-off|--set tls.mode=off|nbd-csi-controller.default_tls=off nbd-csi-controller.tls_dir=/run/nbd-csi/tls nbd-csi-node.tls_dir=/run/nbd-csi/tls"
    "tls-allowed-cluster|--set tls.mode=allowed --set storage.mode=cluster|nbd-csi-controller.default_tls=allowed nbd-csi-controller.tls_dir= nbd-csi-node.tls_dir=/run/nbd-csi/tls nbd-csi-agent.tls_dir=/run/nbd-csi/tls"
    "controller-host-network|--set controller.hostNetwork=true|nbd-csi-controller.advertise_address=192.0.2.10"
    "advertise-address|--set controller.advertiseAddress=10.1.2.3|nbd-csi-controller.advertise_address=10.1.2.3"
    "metrics-off|--set controller.metrics.enabled=false|nbd-csi-controller.metrics_address="
    "metrics-port|--set controller.metrics.port=9900|nbd-csi-controller.metrics_address=0.0.0.0:9900"
    "node-metrics-off|--set node.metrics.enabled=false|nbd-csi-node.metrics_address="
    "node-metrics-port|--set node.metrics.port=9900|nbd-csi-node.metrics_address=0.0.0.0:9900"
    "storage-host-path|--set controller.storage.type=hostPath --set controller.storage.hostPath.path=/srv/nbd|nbd-csi-controller.data_dir=/var/lib/nbd-csi"
    "storage-pvc|--set controller.storage.type=persistentVolumeClaim --set controller.storage.persistentVolumeClaim.storageClassName=local|nbd-csi-controller.data_dir=/var/lib/nbd-csi"
    "one-connection|--set node.connections=1|nbd-csi-node.connections=1"
    "sixteen-connections|--set node.connections=16|nbd-csi-node.connections=16"
    "port-range|--set controller.nbd.portRange.first=20000 --set controller.nbd.portRange.last=20999|nbd-csi-controller.nbd_port_range=20000-20999"
    "listen-address|--set controller.nbd.listenAddress=10.0.0.9 --set controller.advertiseAddress=10.0.0.9|nbd-csi-controller.nbd_listen_address=10.0.0.9"
    "driver-and-kubelet-dir|--set driverName=other.csi.example --set kubeletDir=/var/snap/microk8s/common/var/lib/kubelet/|nbd-csi-controller.driver_name=other.csi.example nbd-csi-node.driver_name=other.csi.example nbd-csi-node.state_dir=/var/snap/microk8s/common/var/lib/kubelet/plugins/other.csi.example/state"
    "extra-args|--set node.extraArgs[0]=--check-interval=5 --set controller.extraArgs[0]=--known-nodes=node-a --set node.extraEnv[0].name=NBD_CSI_CONNECTIONS --set node.extraEnv[0].value=3|nbd-csi-node.check_interval=5 nbd-csi-controller.known_nodes=node-a nbd-csi-node.connections=4"
    "no-modprobe-no-optional-sidecars|--set node.modprobe.enabled=false --set sidecars.resizer.enabled=false --set sidecars.snapshotter.enabled=false|nbd-csi-node.connections=4"
    "storage-cluster|--set storage.mode=cluster|nbd-csi-agent.node_name=node-1 nbd-csi-agent.listen_address=192.0.2.10 nbd-csi-agent.namespace=kube-system nbd-csi-agent.data_dir=/var/lib/nbd-csi-storage nbd-csi-agent.export_key_file=/etc/nbd-csi/export-key/key nbd-csi-agent.nbd_port_range=10900-10999 nbd-csi-agent.nbd_max_connections=128 nbd-csi-agent.nbd_max_connections_per_peer=32 nbd-csi-agent.metrics_address=0.0.0.0:9812 nbd-csi-agent.kubeconfig= nbd-csi-agent.tls_dir=/run/nbd-csi/tls nbd-csi-agent.tls_secret=nbd-csi-storage-node-1"
    "storage-cluster-options|--set storage.mode=cluster --set storage.hostPath=/srv/nbd --set storage.nbd.portRange.first=21000 --set storage.nbd.portRange.last=21099 --set storage.nbd.maxConnections=64 --set storage.nbd.maxConnectionsPerPeer=8 --set storage.metrics.enabled=false --set storage.extraArgs[0]=--kubeconfig=/etc/kube/config --set storage.exportKeySecret=other-key|nbd-csi-agent.nbd_port_range=21000-21099 nbd-csi-agent.nbd_max_connections=64 nbd-csi-agent.nbd_max_connections_per_peer=8 nbd-csi-agent.metrics_address= nbd-csi-agent.kubeconfig=/etc/kube/config nbd-csi-agent.data_dir=/var/lib/nbd-csi-storage"
    "everything-on|--set controller.hostNetwork=true --set controller.storage.type=hostPath --set node.modprobe.required=true --set node.modprobe.parameters[0]=nbds_max=64 --set volumeSnapshotClass.create=true --set serviceMonitor.enabled=true --set logLevel=debug|nbd-csi-controller.advertise_address=192.0.2.10"
)

# The controller's cluster-mode flags (--storage-mode, --export-key-secret)
# are checked once the binary has them; until then its container is skipped
# in cluster-mode renders, and said so.
cluster_skip=()
if ! "$bin_dir/nbd-csi-controller" --help | grep -q -- --storage-mode; then
    echo "skip: the controller has no --storage-mode yet: its container is not run in storage.mode=cluster renders"
    cluster_skip=(--skip-container nbd-csi-controller)
fi

for variant in "${variants[@]}"; do
    IFS='|' read -r name set_args expects <<<"$variant"
    expect_args=()
    case $set_args in *storage.mode=cluster*) expect_args+=("${cluster_skip[@]}") ;; esac
    for e in $expects; do expect_args+=(--expect "$e"); done
    # shellcheck disable=SC2086 # the helm arguments are split on purpose
    if ! "$helm" template nbd-csi "$CHART" --namespace kube-system $set_args >"$work/$name.yaml" 2>"$work/err.txt"; then
        cat "$work/err.txt" >&2
        failed=$((failed + 1)); echo "FAILED: $name: helm template $set_args" >&2
        continue
    fi
    if python3 tests/chart_args.py "$work/$name.yaml" --bin-dir "$bin_dir" "${expect_args[@]}" >"$work/out.txt" 2>&1; then
        passed=$((passed + 1)); echo "ok: $name ($(grep -c '^ok:' "$work/out.txt") checks)"
    else
        failed=$((failed + 1))
        sed "s/^/  $name: /" "$work/out.txt" >&2
        echo "FAILED: $name" >&2
    fi
done

# The binary's own default port range is the chart's default, so the
# README's one number holds for both.
chart_range=$(python3 -c 'import sys, yaml; r = yaml.safe_load(open(sys.argv[1]))["controller"]["nbd"]["portRange"]; print("%d-%d" % (r["first"], r["last"]))' "$CHART/values.yaml")
binary_range=$(cd "$work" && env -i NBD_CSI_VALIDATE_ARGS=1 "$bin_dir/nbd-csi-controller" | sed -n 's/^nbd_port_range=//p')
if [ -n "$chart_range" ] && [ "$chart_range" = "$binary_range" ]; then
    passed=$((passed + 1)); echo "ok: default NBD port range $chart_range in the chart and the binary"
else
    failed=$((failed + 1)); echo "FAILED: default NBD port range: chart $chart_range, binary ${binary_range:-none}" >&2
fi

# Likewise for the storage agents.
chart_range=$(python3 -c 'import sys, yaml; r = yaml.safe_load(open(sys.argv[1]))["storage"]["nbd"]["portRange"]; print("%d-%d" % (r["first"], r["last"]))' "$CHART/values.yaml")
binary_range=$(cd "$work" && env -i NBD_CSI_VALIDATE_ARGS=1 "$bin_dir/nbd-csi-controller" agent --node-name=n --data-dir=d \
    --listen-address=192.0.2.1 --export-key-file=k | sed -n 's/^nbd_port_range=//p')
if [ -n "$chart_range" ] && [ "$chart_range" = "$binary_range" ]; then
    passed=$((passed + 1)); echo "ok: default storage agent NBD port range $chart_range in the chart and the binary"
else
    failed=$((failed + 1)); echo "FAILED: default storage agent NBD port range: chart $chart_range, binary ${binary_range:-none}" >&2
fi

# The check itself must catch a command line the binary refuses, or the
# loop above proves nothing: drop the node's subcommand and rename a flag.
sed -e '/^            - serve$/d' "$work/default.yaml" >"$work/broken-node.yaml"
sed -e 's/--nbd-port-range=/--nbd-ports=/' "$work/default.yaml" >"$work/broken-controller.yaml"
sed -e 's/--export-key-file=/--export-key=/' "$work/storage-cluster.yaml" >"$work/broken-agent.yaml"
for broken in node:DaemonSet/nbd-csi-node controller:StatefulSet agent:DaemonSet/nbd-csi-storage; do
    workload=${broken#*:} broken=broken-${broken%%:*}
    skip=()
    [ "$broken" = broken-agent ] && skip=("${cluster_skip[@]}")
    if python3 tests/chart_args.py "$work/$broken.yaml" --bin-dir "$bin_dir" "${skip[@]}" >"$work/out.txt" 2>&1; then
        failed=$((failed + 1)); echo "FAILED: $broken: a refused command line went unnoticed" >&2
    elif grep -q "$workload/.*refuses its command line" "$work/out.txt"; then
        passed=$((passed + 1)); echo "ok: $broken is caught: $(grep "$workload/" "$work/out.txt" | grep -m1 -o 'error: [^(]*' | cut -c1-100)"
    else
        cat "$work/out.txt" >&2
        failed=$((failed + 1)); echo "FAILED: $broken failed for another reason" >&2
    fi
done

echo "chart-args: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
