#!/bin/sh
# /init of the cluster VM's initramfs: the virtio disk and ext4 drivers
# (modules in Debian's kernel), then the real root (/dev/vda, a cached
# Debian image) with the run's payload (/dev/vdb) on /payload, and
# /payload/guest/boot.sh as PID 1.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules/order); do insmod "/modules/$m" || echo "BOOT insmod $m failed"; done
for _ in $(seq 100); do [ -b /dev/vdb ] && break; sleep 0.1; done
mkdir -p /newroot
if ! mount -t ext4 /dev/vda /newroot || ! mount -t ext4 -o ro /dev/vdb /newroot/payload; then
    echo "BOOT cannot mount the root or the payload disk"
    echo "SUMMARY passed=0 failed=1"
    poweroff -f
fi
umount /proc /sys /dev
exec switch_root /newroot /payload/guest/boot.sh
