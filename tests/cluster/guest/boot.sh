#!/bin/bash
# PID 1 of the cluster VM: a minimal system (no init system; the components
# run as children of this script), one node address on dummy0, then
# cluster.sh (control plane, containerd, kubelet, the chart) and the
# scenarios. Powers off when they are done; the host reads the console.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
# The kubelet's Bidirectional mounts (the node plugin's) need a shared root.
mount --make-rshared /
echo "+cpu +cpuset +io +memory +pids" >/sys/fs/cgroup/cgroup.subtree_control
echo 1 >/proc/sys/kernel/sysrq
hostname nbd-node
ip link set lo up
# The kubelet and kube-proxy want a node address that is not loopback;
# loading dummy creates dummy0.
modprobe dummy
ip addr add 10.0.2.15/24 dev dummy0
ip link set dummy0 up
ip route add default dev dummy0
modprobe overlay
modprobe br_netfilter
# kube-proxy sets conntrack limits at start and fails if the module is absent.
modprobe nf_conntrack
# The kubelet pins a raw block volume with a loop device (losetup -f); a
# udev-less node has no /dev/loop-control until the module is loaded.
modprobe loop
sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1
echo "BOOTED uptime=$(cut -d' ' -f1 /proc/uptime)s kernel=$(uname -r) cpus=$(nproc) mem=$(awk '/MemTotal/ {print $2 / 1024}' /proc/meminfo)MiB"

bash /payload/guest/cluster.sh
sync
echo o >/proc/sysrq-trigger
sleep 30
