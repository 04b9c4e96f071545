#!/usr/bin/env bash
# Builds (or reuses from the cache) every Kubernetes-side tool the chart and
# end-to-end tests need: helm, kubeconform, etcd, the Kubernetes commands,
# csi-provisioner, csi-attacher. Versions and cache layout: tests/k8s/tools.sh.
# Prints the versions, the time taken and the cache's disk use.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/k8s/tools.sh

start=$(date +%s)
ensure_helm
ensure_kubeconform
ensure_etcd
ensure_kubernetes
ensure_csi_sidecars
echo "tools ready in $(($(date +%s) - start))s under $NBD_CSI_TOOLS:"
"$TOOLS_BIN/helm" version --short
"$TOOLS_BIN/kubeconform" -v
"$TOOLS_BIN/etcd" --version | sed -n 1p
"$TOOLS_BIN/kube-apiserver" --version
"$TOOLS_BIN/kubectl" version --client 2>/dev/null | sed -n 1p
"$TOOLS_BIN/csi-provisioner" --version 2>&1 | sed -n 1p
"$TOOLS_BIN/csi-attacher" --version 2>&1 | sed -n 1p
echo "build times (cold and warm runs, newest last):"
tail -20 "$NBD_CSI_TOOLS/build-times.txt"
du -sh "$TOOLS_BIN" "$NBD_CSI_TOOLS" "$(go env GOMODCACHE)" "$(go env GOCACHE)" 2>/dev/null || true
