#!/usr/bin/env bash
# Builds (or reuses) the cluster VM's root file system: Debian bookworm from
# the package mirror (mmdebstrap) with containerd, runc and the CNI plugins,
# the Debian kernel's module tree (the same kernel tests/vm boots: nbd.ko,
# ext4, xfs, overlay, netfilter), and the Kubernetes binaries built by
# tests/k8s/tools.sh. Prints the image's path on its last line.
#
# The image is cached under $NBD_CSI_CLUSTER_CACHE (default
# ~/.cache/nbd-csi/cluster-v1), named after a hash of everything that goes in,
# so a version bump or a change to this script builds a new one. Nothing of
# the project goes into it: our binaries, images, chart and scripts reach the
# VM on a second disk made per run (tests/cluster/run.sh), and the VM boots
# this image with qemu's snapshot mode, so a run never changes it.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/k8s/tools.sh
cache=${NBD_CSI_CLUSTER_CACHE:-$HOME/.cache/nbd-csi/cluster-v1}
vm_cache=${NBD_CSI_VM_CACHE:-$HOME/.cache/nbd-csi/vm-v1}
mkdir -p "$cache"

packages=containerd,runc,containernetworking-plugins,iptables,conntrack,iproute2,kmod,util-linux,mount,e2fsprogs,xfsprogs,procps,curl,ca-certificates
k8s_bins=(etcd kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet kubectl helm)

for pkg in mmdebstrap e2fsprogs kmod; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" && continue
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
done
ensure_helm
ensure_etcd
ensure_kubernetes

# The kernel tests/vm boots; its package holds the module tree.
. tests/vm/kernel.sh
mkdir -p "$vm_cache"
ensure_vm_kernel "$vm_cache" "drivers/block/nbd.ko"
kernel_deb=$(ls "$vm_cache"/kernel/linux-image-*.deb | head -1)

key=$({
    cat "$0"
    echo "$packages $(basename "$kernel_deb") $KUBERNETES_VERSION $ETCD_VERSION $HELM_VERSION"
} | sha256sum | cut -c1-16)
image=$cache/rootfs-$key.img
if [ -f "$image" ]; then
    echo "rootfs: cached"
    echo "$image"
    exit 0
fi

start=$(date +%s)
work=$(mktemp -d "$cache/rootfs-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
mirror=${mirror:-http://deb.debian.org/debian}
mmdebstrap --quiet --variant=minbase --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm "$root" "$mirror"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*

# Kernel modules: everything but hardware the VM does not have, then depmod
# so modprobe (the node plugin's init container, containerd, kube-proxy)
# finds them.
dpkg-deb -x "$kernel_deb" "$work/kernel"
kver=$(ls "$work/kernel/lib/modules")
src=$work/kernel/lib/modules/$kver
dst=$root/lib/modules/$kver
mkdir -p "$dst/kernel/drivers/net"
cp -a "$src"/modules.builtin* "$src"/modules.order "$dst/"
for d in arch block crypto fs lib mm net virt; do cp -a "$src/kernel/$d" "$dst/kernel/"; done
for d in block virtio char md; do cp -a "$src/kernel/drivers/$d" "$dst/kernel/drivers/"; done
for m in dummy.ko veth.ko virtio_net.ko net_failover.ko; do
    [ -f "$src/kernel/drivers/net/$m" ] && cp -a "$src/kernel/drivers/net/$m" "$dst/kernel/drivers/net/"
done
depmod -b "$root" "$kver"

# Kubernetes and helm.
for b in "${k8s_bins[@]}"; do install -m 0755 "$TOOLS_BIN/$b" "$root/usr/local/bin/$b"; done

# containerd as the kubelet expects it (cgroupfs, no systemd), its sandbox
# (pause) image a local one tests/cluster/images.sh builds; CNI: one bridge.
mkdir -p "$root/etc/containerd" "$root/etc/cni/net.d"
cat >"$root/etc/containerd/config.toml" <<'TOML'
version = 2
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:3.10"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
TOML
cat >"$root/etc/cni/net.d/10-bridge.conflist" <<'JSON'
{
  "cniVersion": "1.0.0",
  "name": "pods",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": { "type": "host-local", "ranges": [[{ "subnet": "10.244.0.0/24" }]], "routes": [{ "dst": "0.0.0.0/0" }] }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
JSON
echo "nbd-node" >"$root/etc/hostname"
printf '127.0.0.1 localhost\n10.0.2.15 nbd-node\n' >"$root/etc/hosts"
: >"$root/etc/resolv.conf"
mkdir -p "$root/payload" "$root/var/lib/kubelet" "$root/etc/kubernetes"

# An ext4 image made from the directory (no mount needed), with room for the
# container images, etcd and the volumes' filesystems in the guest.
size_mb=$(( $(du -sm "$root" | cut -f1) + 3072 ))
truncate -s "${size_mb}M" "$work/rootfs.img"
mkfs.ext4 -q -F -L nbd-csi-root -d "$root" "$work/rootfs.img"
rm -f "$cache"/rootfs-*.img
mv "$work/rootfs.img" "$image"
echo "rootfs: built in $(($(date +%s) - start)) s ($(du -sh --apparent-size "$image" | cut -f1) apparent, $(du -sh "$image" | cut -f1) used)"
echo "$image"
