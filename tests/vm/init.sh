#!/bin/sh
# /init of the test VM: minimal system, nbd.ko, then the scenarios.
/bin/busybox --install -s /bin
export PATH=/usr/bin:/usr/sbin:/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
ip link set lo up
ln -s /proc/mounts /etc/mtab
echo "BOOTED uptime=$(cut -d' ' -f1 /proc/uptime)s kernel=$(uname -r) cpus=$(nproc)"
for m in $(cat /modules/order); do
    args=""; [ "$m" = nbd.ko ] && args="nbds_max=16"
    insmod "/modules/$m" $args || echo "RESULT insmod-$m FAIL"
done
sh /tests/scenarios.sh
sync
poweroff -f
