#!/usr/bin/env bash
# Snapshots under writes on the two filesystems the README names for the
# data directory: agent/tests/snapshot_under_writes.rs with its data
# directory on an ext4 loop device (no reflink: the copy-before-write path
# must be taken) and on an XFS one made with reflink=1 (the FICLONE path
# must be taken, the snapshot sharing the volume's extents). Needs root for
# the loop devices and mounts, and fails without it: CI runs as root, and a
# suite that skips proves nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
. tests/cargo.sh
passed=0 failed=0
finish() { echo "snapshot-fs: $passed passed, $failed failed"; [ "$failed" -eq 0 ]; }
if [ "$(id -u)" -ne 0 ]; then
    echo "snapshot-fs: needs root (losetup, mkfs, mount)"
    failed=1
    finish
    exit 1
fi
for tool in losetup mkfs.ext4 mkfs.xfs filefrag qemu-img; do
    command -v "$tool" >/dev/null || { echo "snapshot-fs: $tool is missing"; failed=1; finish; exit 1; }
done
work=$(mktemp -d)
loops=()
cleanup() {
    for m in "$work"/*/mnt; do mountpoint -q "$m" && umount "$m"; done
    for l in "${loops[@]}"; do losetup -d "$l"; done
    rm -rf "$work"
}
trap cleanup EXIT

workspace_test --test snapshot_under_writes --no-run || { failed=1; finish; exit 1; }
for case in "ext4 copy" "xfs reflink"; do
    read -r fs expect <<<"$case"
    mkdir -p "$work/$fs/mnt"
    truncate -s 2G "$work/$fs/disk.img"
    loop=$(losetup -f --show "$work/$fs/disk.img") || { failed=$((failed + 1)); continue; }
    loops+=("$loop")
    case "$fs" in
        ext4) mkfs.ext4 -q -F "$loop" ;;
        xfs) mkfs.xfs -q -f -m reflink=1 "$loop" ;;
    esac
    mount "$loop" "$work/$fs/mnt" || { failed=$((failed + 1)); continue; }
    echo "== $fs ($expect)"
    if NBD_CSI_SNAPSHOT_DIR="$work/$fs/mnt" NBD_CSI_SNAPSHOT_EXPECT="$expect" \
        workspace_test --test snapshot_under_writes; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
    fi
done
finish
