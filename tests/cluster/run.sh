#!/usr/bin/env bash
# The cluster suite (issue 11): the chart as users run it. On the host:
# builds (or reuses) the VM's root file system (tests/cluster/rootfs.sh),
# the images (tests/cluster/images.sh) and a payload disk holding them, the
# chart, the snapshot CRDs, fresh keys and tokens and the guest scripts;
# everything is built before the VM boots (a build on the host starves the
# guest). Then boots the Debian kernel tests/vm uses under qemu with both
# disks; inside, tests/cluster/guest/cluster.sh starts a one-node cluster
# and scenarios.sh installs the chart with helm and checks what a user sees.
# Prints one line per scenario and "cluster: N passed, M failed".
# NBD_CSI_CLUSTER_SCENARIOS="install filesystem" runs only those.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
. tests/k8s/tools.sh
cache=${NBD_CSI_CLUSTER_CACHE:-$HOME/.cache/nbd-csi/cluster-v1}
vm_cache=${NBD_CSI_VM_CACHE:-$HOME/.cache/nbd-csi/vm-v1}
timeout_s=${NBD_CSI_CLUSTER_TIMEOUT:-2700}
mkdir -p "$cache" target
start=$(date +%s)

rootfs=$(tests/cluster/rootfs.sh | tail -n 1)
[ -f "$rootfs" ] || { echo "cluster: no root file system"; echo "cluster: 0 passed, 1 failed"; exit 1; }
echo "cluster: root file system ready after $(($(date +%s) - start)) s"

work=$(mktemp -d /tmp/nbd-csi-cluster.XXXXXX)
trap 'rm -rf "$work"' EXIT
payload=$work/payload
mkdir -p "$payload"/{guest,images,chart,crds,secrets}
tests/cluster/images.sh "$payload/images" || { echo "cluster: images failed"; echo "cluster: 0 passed, 1 failed"; exit 1; }
echo "cluster: images ready after $(($(date +%s) - start)) s"

cp tests/cluster/guest/*.sh tests/cluster/guest/*.yaml "$payload/guest/"
cp -r charts/nbd-csi "$payload/chart/"
# The chart as it was before its cluster-mode controller became a
# Deployment (commit 7151fb6): scenario_cluster_install installs it and
# upgrades to this one, the upgrade path of an installed release.
mkdir -p "$payload/previous-chart"
git archive 7151fb6^ charts/nbd-csi | tar -x -C "$payload/previous-chart" --strip-components=1 ||
    { echo "cluster: the previous chart (7151fb6^) is not in this clone's history"; echo "cluster: 0 passed, 1 failed"; exit 1; }
crds=$(snapshot_crds_dir)
cp "$crds"/snapshot.storage.k8s.io_*.yaml "$payload/crds/"
openssl genrsa -out "$payload/secrets/sa.key" 2048 2>/dev/null
openssl rsa -in "$payload/secrets/sa.key" -pubout -out "$payload/secrets/sa.pub" 2>/dev/null
token() { python3 -c 'import secrets; print(secrets.token_hex(16))'; }
admin=$(token) kcm=$(token) scheduler=$(token) kubelet=$(token) proxy=$(token)
cat >"$payload/secrets/tokens.csv" <<CSV
$admin,admin,admin,"system:masters"
$kcm,system:kube-controller-manager,kcm
$scheduler,system:kube-scheduler,scheduler
$kubelet,system:node:nbd-node,kubelet,"system:nodes"
$proxy,system:kube-proxy,kube-proxy
CSV
version=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version = "\(.*\)"/\1/p' Cargo.toml)
cat >"$payload/run.env" <<ENV
VERSION=$version
SCENARIOS="${NBD_CSI_CLUSTER_SCENARIOS:-}"
ADMIN_TOKEN=$admin
KCM_TOKEN=$kcm
SCHEDULER_TOKEN=$scheduler
KUBELET_TOKEN=$kubelet
PROXY_TOKEN=$proxy
ENV
chmod -R go-rwx "$payload/secrets" "$payload/run.env"
size_mb=$(( $(du -sm "$payload" | cut -f1) + 64 ))
truncate -s "${size_mb}M" "$work/payload.img"
mkfs.ext4 -q -F -L nbd-csi-payload -d "$payload" "$work/payload.img"

# The initramfs: busybox and the modules that reach the root disk.
modules="drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko drivers/virtio/virtio_pci_legacy_dev.ko
    drivers/virtio/virtio_pci_modern_dev.ko drivers/virtio/virtio_pci.ko drivers/block/virtio_blk.ko
    lib/crc16.ko fs/mbcache.ko fs/jbd2/jbd2.ko crypto/crc32c_generic.ko fs/ext4/ext4.ko"
initrd=$cache/initrd-$( (cat "$0" tests/cluster/guest/initramfs-init.sh; ls "$vm_cache"/kernel/) | sha256sum | cut -c1-16).gz
if [ ! -f "$initrd" ]; then
    root=$work/initramfs
    mkdir -p "$root"/{bin,proc,sys,dev,newroot,modules}
    cp /bin/busybox "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    dpkg-deb -x "$vm_cache"/kernel/linux-image-*.deb "$work/kernel"
    for m in $modules; do
        cp "$work"/kernel/lib/modules/*/kernel/"$m" "$root/modules/"
        basename "$m" >>"$root/modules/order"
    done
    install -m 0755 tests/cluster/guest/initramfs-init.sh "$root/init"
    rm -f "$cache"/initrd-*.gz
    (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$initrd.tmp" && mv "$initrd.tmp" "$initrd"
fi
echo "cluster: payload $(du -sh "$work/payload.img" | cut -f1), prepared in $(($(date +%s) - start)) s"

# mitigations=off: the guest is a throwaway test machine under emulation,
# where the kernel's Spectre mitigations (retpolines on every indirect call)
# cost emulated instructions and protect nothing.
log=$repo/target/cluster-console.log
boot=$(date +%s)
set +e
TMPDIR=$work timeout --foreground -k 10 "$timeout_s" qemu-system-x86_64 -accel tcg -m 4096 -smp 2 \
    -kernel "$vm_cache/vmlinuz" -initrd "$initrd" \
    -drive "file=$rootfs,if=virtio,format=raw,snapshot=on" \
    -drive "file=$work/payload.img,if=virtio,format=raw,readonly=on" \
    -append "console=ttyS0 panic=-1 quiet mitigations=off" \
    -nographic -no-reboot -net none </dev/null 2>&1 | stdbuf -oL tr -d '\r' | tee "$log" \
    | grep --line-buffered -aE '^(RESULT|SUMMARY|BOOTED|BOOT|cluster:|scenario:) '
status=${PIPESTATUS[0]}
set -e
echo "cluster: VM ran $(($(date +%s) - boot)) s (qemu exit $status), whole suite $(($(date +%s) - start)) s; console log in $log"
[ "$status" = 124 ] && echo "cluster: TIMEOUT after ${timeout_s}s"
summary=$(grep -aoE '^SUMMARY .*' "$log" | tail -n 1)
passed=$(echo "$summary" | sed -n 's/.*passed=\([0-9]*\).*/\1/p')
failed=$(echo "$summary" | sed -n 's/.*failed=\([0-9]*\).*/\1/p')
[ -n "$summary" ] || failed=1
# CI shows only this script's output: the console of the first failed
# scenario (what it printed, the pods, events and logs it dumped) goes there.
first_failed=$(grep -aoE '^RESULT [a-z_-]+ FAIL' "$log" | head -n 1 | cut -d' ' -f2 || true)
if [ -n "$first_failed" ]; then
    echo "cluster: console of the first failed scenario, $first_failed (last 150 lines):"
    awk -v name="$first_failed" '$0 ~ "=== " name "$" { on = 1 } on { print } $0 ~ "^RESULT " name " " { exit }' "$log" \
        | tail -n 150 | sed 's/^/  | /'
fi
echo "cluster: ${passed:-0} passed, ${failed:-1} failed"
[ "${failed:-1}" -eq 0 ] && [ "$status" != 124 ]
