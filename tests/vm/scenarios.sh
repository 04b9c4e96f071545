#!/bin/sh
# Scenarios run inside the test VM (busybox sh). Each prints
# "RESULT <name> PASS|FAIL <detail>"; the last line is "SUMMARY ...".
PASSED=0
FAILED=0
NODE=nbd-csi-node
CTRL=nbd-csi-controller

result() { # name PASS|FAIL detail...
    name=$1; verdict=$2; shift 2
    echo "RESULT $name $verdict $*"
    if [ "$verdict" = PASS ]; then PASSED=$((PASSED + 1)); else FAILED=$((FAILED + 1)); fi
}

wait_port() { # port: wait until something listens on 127.0.0.1:port
    hex=$(printf '%04X' "$1")
    i=0
    while ! grep -q ":$hex 00000000:0000 0A" /proc/net/tcp; do
        i=$((i + 1)); [ $i -gt 200 ] && return 1
        usleep 50000
    done
}

serve() { # port command...: a server in the background (its pid in $p), up once the port listens
    port=$1; shift
    "$@" 2>/tmp/serve.log &
    p=$!
    wait_port "$port"
}

established_to() { # port: client-side ESTABLISHED TCP connections to it
    hex=$(printf '%04X' "$1")
    awk -v p=":$hex" 'NR > 1 && substr($3, length($3) - 4) == p && $4 == "01"' /proc/net/tcp | wc -l
}

field() { sed -n "s/^$1=//p"; }

# attach_check name uri backend port connections want_queues want_tcp
attach_check() {
    name=$1 uri=$2 backend=$3 port=$4 conns=$5 want_q=$6 want_t=$7
    out=$($NODE attach "$uri" --backend-id "$backend" --connections "$conns" 2>/tmp/err)
    dev=$(echo "$out" | field device)
    if [ -z "$dev" ]; then result "$name" FAIL "attach: $(tail -1 /tmp/err)"; return; fi
    idx=${dev#/dev/nbd}
    q=$(ls "/sys/block/nbd$idx/mq" | wc -l)
    t=$(established_to "$port")
    b=$(cat "/sys/block/nbd$idx/backend")
    found=$($NODE status | grep -c "^nbd$idx backend=$backend connected=true")
    $NODE detach --backend-id "$backend" >/dev/null 2>/tmp/err || echo "detach: $(tail -1 /tmp/err)"
    gone=$(cat "/sys/block/nbd$idx/backend" 2>/dev/null)
    detail="dev=$dev hw_queues=$q tcp=$t backend=$b flags=$(echo "$out" | field transmission_flags)"
    if [ "$q" = "$want_q" ] && [ "$t" = "$want_t" ] && [ "$b" = "$backend" ] && [ "$found" = 1 ] && [ -z "$gone" ]; then
        result "$name" PASS "$detail"
    else
        result "$name" FAIL "$detail (want hw_queues=$want_q tcp=$want_t; status found=$found; after detach backend='$gone')"
    fi
}

# blk-mq caps hardware queues at the number of possible CPUs; the VM boots
# 2 (all the host has) of 4 possible, so 4 connections can show 4 queues.
CPUS=$(awk -F- '{ print $NF + 1 }' /sys/devices/system/cpu/possible)
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

scenario_multi_conn() {
    truncate -s 64M /tmp/mc.img
    serve 10809 $CTRL serve-file /tmp/mc.img --listen 127.0.0.1:10809 --export-name vol-mc || result multi-conn-ours FAIL "serve-file did not start"
    attach_check multi-conn-ours-2 nbd://127.0.0.1:10809/vol-mc vol-mc 10809 2 2 2
    attach_check multi-conn-ours-4 nbd://127.0.0.1:10809/vol-mc vol-mc 10809 4 "$(min 4 "$CPUS")" 4
    kill $p; wait $p 2>/dev/null

    serve 10810 $CTRL serve-file /tmp/mc.img --listen 127.0.0.1:10810 --export-name vol-nomc --no-multi-conn
    attach_check single-conn-ours-no-multi-conn nbd://127.0.0.1:10810/vol-nomc vol-nomc 10810 4 1 1
    kill $p; wait $p 2>/dev/null

    serve 10812 nbdkit --exit-with-parent -f -i 127.0.0.1 -p 10812 --filter=multi-conn memory 64M multi-conn-mode=disable
    attach_check single-conn-nbdkit-multi-conn-disable nbd://127.0.0.1:10812/ kit-off 10812 4 1 1
    kill $p; wait $p 2>/dev/null

    serve 10813 nbdkit --exit-with-parent -f -i 127.0.0.1 -p 10813 --filter=multi-conn memory 64M multi-conn-mode=plugin
    attach_check multi-conn-nbdkit-plugin nbd://127.0.0.1:10813/ kit-on 10813 4 "$(min 4 "$CPUS")" 4
    kill $p; wait $p 2>/dev/null

    # HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_CACHE (bit 10), bit 8 clear.
    serve 10811 flag-server --listen 127.0.0.1:10811 --size 67108864 --flags 0x040d
    attach_check single-conn-send-cache-bit-10 nbd://127.0.0.1:10811/ flags-10 10811 4 1 1
    kill $p; wait $p 2>/dev/null
}

scenario_flush() {
    # Our server: after sync the bytes are in the backing file.
    truncate -s 64M /tmp/flush.img
    serve 10820 $CTRL serve-file /tmp/flush.img --listen 127.0.0.1:10820 --export-name vol-fl
    dev=$($NODE attach nbd://127.0.0.1:10820/vol-fl --backend-id vol-fl --connections 2 2>/tmp/err | field device)
    idx=${dev#/dev/nbd}
    wc=$(cat "/sys/block/nbd$idx/queue/write_cache" 2>/dev/null)
    dd if=/dev/urandom of=/tmp/pattern bs=64k count=32 2>/dev/null
    dd if=/tmp/pattern of="$dev" bs=64k seek=16 2>/dev/null
    sync
    dd if=/tmp/flush.img of=/tmp/back bs=64k skip=16 count=32 2>/dev/null
    if cmp -s /tmp/pattern /tmp/back && [ "$wc" = "write back" ]; then
        result flush-ours PASS "dev=$dev write_cache='$wc' 2 MiB in the backing file after sync"
    else
        result flush-ours FAIL "dev=$dev write_cache='$wc' backing file differs"
    fi
    $NODE detach --backend-id vol-fl >/dev/null 2>&1
    kill $p; wait $p 2>/dev/null

    # nbdkit's log filter shows the FLUSH command itself arriving.
    serve 10821 nbdkit --exit-with-parent -f -i 127.0.0.1 -p 10821 --filter=log memory 64M logfile=/tmp/kit.log
    dev=$($NODE attach nbd://127.0.0.1:10821/ --backend-id kit-fl --connections 1 2>/tmp/err | field device)
    before=$(grep -c 'Flush' /tmp/kit.log)
    dd if=/tmp/pattern of="$dev" bs=64k conv=fsync 2>/dev/null
    after=$(grep -c 'Flush' /tmp/kit.log)
    $NODE detach --backend-id kit-fl >/dev/null 2>&1
    kill $p; wait $p 2>/dev/null
    if [ "$after" -gt "$before" ]; then
        result flush-nbdkit-log PASS "dev=$dev FLUSH requests seen by the server: $before -> $after"
    else
        result flush-nbdkit-log FAIL "dev=$dev no FLUSH reached nbdkit ($before -> $after)"
    fi
}

scenario_ext4() {
    truncate -s 128M /tmp/fs.img
    serve 10830 $CTRL serve-file /tmp/fs.img --listen 127.0.0.1:10830 --export-name vol-fs
    dev=$($NODE attach nbd://127.0.0.1:10830/vol-fs --backend-id vol-fs --connections 2 2>/tmp/err | field device)
    mkdir -p /mnt/fs
    failed=""
    mkfs.ext4 -q -F "$dev" >/tmp/mkfs.log 2>&1 || failed="$failed mkfs"
    mount -t ext4 "$dev" /mnt/fs || failed="$failed mount"
    dd if=/dev/urandom of=/mnt/fs/data bs=1M count=8 2>/dev/null
    sum1=$(sha256sum < /mnt/fs/data)
    umount /mnt/fs || failed="$failed umount"
    $NODE detach --backend-id vol-fs >/dev/null 2>&1 || failed="$failed detach"
    # Re-attach: everything below comes back from the server, not a cache.
    dev=$($NODE attach nbd://127.0.0.1:10830/vol-fs --backend-id vol-fs --connections 2 2>/tmp/err | field device)
    e2fsck -f -n "$dev" >/tmp/fsck.log 2>&1 || failed="$failed fsck($?)"
    mount -t ext4 "$dev" /mnt/fs || failed="$failed mount2"
    sum2=$(sha256sum < /mnt/fs/data)
    umount /mnt/fs
    $NODE detach --backend-id vol-fs >/dev/null 2>&1
    kill $p; wait $p 2>/dev/null
    if [ -z "$failed" ] && [ "$sum1" = "$sum2" ]; then
        result ext4-write-read PASS "mkfs, 8 MiB written, detach, re-attach, fsck clean, sha256 matches"
    else
        result ext4-write-read FAIL "failed:$failed sum1=$sum1 sum2=$sum2 $(tail -3 /tmp/fsck.log | tr '\n' ' ')"
    fi
}

scenario_ioctl() {
    truncate -s 64M /tmp/io.img
    serve 10840 $CTRL serve-file /tmp/io.img --listen 127.0.0.1:10840 --export-name vol-io
    $NODE attach nbd://127.0.0.1:10840/vol-io --backend-id vol-io --connections 2 --ioctl >/tmp/ioctl.out 2>/tmp/err &
    a=$!
    i=0
    while ! grep -q '^device=' /tmp/ioctl.out && [ $i -lt 100 ]; do usleep 100000; i=$((i + 1)); done
    dev=$(field device < /tmp/ioctl.out)
    usleep 500000
    dd if=/dev/urandom of=/tmp/pattern bs=64k count=16 2>/dev/null
    dd if=/tmp/pattern of="$dev" bs=64k conv=fsync 2>/dev/null
    dd if=/tmp/io.img of=/tmp/back bs=64k count=16 2>/dev/null
    q=$(ls "/sys/block/${dev#/dev/}/mq" 2>/dev/null | wc -l)
    kill -TERM $a; wait $a
    rc=$?
    size=$(cat "/sys/block/${dev#/dev/}/size" 2>/dev/null)
    kill $p; wait $p 2>/dev/null
    if [ -n "$dev" ] && cmp -s /tmp/pattern /tmp/back && [ "$rc" = 0 ] && [ "$size" = 0 ]; then
        result ioctl-fallback PASS "dev=$dev hw_queues=$q data reached the server; released on SIGTERM"
    else
        result ioctl-fallback FAIL "dev=$dev rc=$rc size_after=$size $(tail -1 /tmp/err)"
    fi
}

# The ioctls cannot add devices: with every /dev/nbdX (nbds_max=16 here)
# attached, one more attach (its handshake done) fails at once saying why (the plugin maps it
# to RESOURCE_EXHAUSTED), never waits for a device; one given back is
# taken by the next attach.
scenario_ioctl_exhausted() {
    truncate -s 16M /tmp/full.img
    serve 10841 $CTRL serve-file /tmp/full.img --listen 127.0.0.1:10841 --export-name vol-full
    total=$(ls -d /sys/block/nbd* | wc -l)
    pids=""
    n=0
    while [ $n -lt "$total" ]; do
        $NODE attach nbd://127.0.0.1:10841/vol-full --backend-id "vol-full-$n" --ioctl >"/tmp/full-$n.out" 2>/dev/null &
        pids="$pids $!"
        i=0
        while ! grep -q '^device=' "/tmp/full-$n.out" && [ $i -lt 100 ]; do usleep 100000; i=$((i + 1)); done
        n=$((n + 1))
    done
    attached=$(cat /tmp/full-*.out | grep -c '^device=')
    # From a second server: the first admits 16 connections from one peer.
    truncate -s 16M /tmp/extra.img
    first_server=$p
    serve 10842 $CTRL serve-file /tmp/extra.img --listen 127.0.0.1:10842 --export-name vol-extra
    start_ms=$(now_ms)
    timeout 30 $NODE attach nbd://127.0.0.1:10842/vol-extra --backend-id vol-full-extra --ioctl >/tmp/full-extra.out 2>/tmp/full-extra.err
    rc=$?
    took=$(($(now_ms) - start_ms))
    kill $p; wait $p 2>/dev/null
    p=$first_server
    # One given back, the next attach gets it.
    first=$(echo $pids | cut -d' ' -f1)
    freed=$(field device < /tmp/full-0.out)
    kill -TERM "$first"; wait "$first"
    $NODE attach nbd://127.0.0.1:10841/vol-full --backend-id vol-full-again --ioctl >/tmp/full-again.out 2>/dev/null &
    again=$!
    i=0
    while ! grep -q '^device=' /tmp/full-again.out && [ $i -lt 100 ]; do usleep 100000; i=$((i + 1)); done
    reused=$(field device < /tmp/full-again.out)
    for pid in $pids $again; do kill -TERM "$pid" 2>/dev/null; done
    for pid in $pids $again; do wait "$pid" 2>/dev/null; done
    left=0
    for size in /sys/block/nbd*/size; do [ "$(cat "$size")" = 0 ] || left=$((left + 1)); done
    kill $p; wait $p 2>/dev/null
    detail="$attached of $total devices attached; one more: rc=$rc after $took ms: $(tail -1 /tmp/full-extra.err | cut -c1-200); freed $freed, reused $reused; $left left attached"
    if [ "$attached" = "$total" ] && [ "$rc" != 0 ] && [ "$rc" != 124 ] && grep -q 'every /dev/nbdX is in use' /tmp/full-extra.err \
        && [ "$reused" = "$freed" ] && [ "$left" = 0 ]; then
        result ioctl-exhausted PASS "$detail"
    else
        result ioctl-exhausted FAIL "$detail"
    fi
}

# Write+verify on the raw device (several passes of a random pattern) while
# something is killed; any I/O error or mismatch fails.
io_loop() { # dev seconds -> writes /tmp/io.result
    dev=$1; end=$(($(cut -d. -f1 /proc/uptime) + $2)); n=0; errs=0
    dd if=/dev/urandom of=/tmp/p1 bs=64k count=64 2>/dev/null
    while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
        off=$(( (n % 8) * 64 ))
        dd if=/tmp/p1 of="$dev" bs=64k seek=$off conv=fsync 2>/dev/null || errs=$((errs + 1))
        echo 3 > /proc/sys/vm/drop_caches
        dd if="$dev" of=/tmp/p2 bs=64k skip=$off count=64 2>/dev/null || errs=$((errs + 1))
        cmp -s /tmp/p1 /tmp/p2 || errs=$((errs + 1))
        n=$((n + 1))
    done
    echo "rounds=$n errors=$errs" > /tmp/io.result
}

scenario_heal() {
    rm -rf /tmp/state; truncate -s 64M /tmp/heal.img
    serve 10850 $CTRL serve-file /tmp/heal.img --listen 127.0.0.1:10850 --export-name vol-h
    dev=$($NODE attach nbd://127.0.0.1:10850/vol-h --backend-id vol-h --connections 2 \
        --timeout 10 --dead-conn-timeout 60 --state-dir /tmp/state 2>/tmp/err | field device)
    $NODE watch --state-dir /tmp/state --check-interval 2 2>/tmp/watch.log &
    w=$!
    rm -f /tmp/io.result
    dmesg -c >/dev/null
    io_loop "$dev" 40 &
    io=$!
    sleep 5
    kill -9 $p; wait $p 2>/dev/null       # the server dies mid-I/O
    sleep 3
    $CTRL serve-file /tmp/heal.img --listen 127.0.0.1:10850 --export-name vol-h 2>/tmp/serve.log &
    p=$!
    sleep 8
    kill -9 $w; wait $w 2>/dev/null       # the plugin dies; I/O must not notice
    sleep 3
    $NODE watch --state-dir /tmp/state --check-interval 2 2>>/tmp/watch.log &
    w=$!
    sleep 4
    kill -9 $p; wait $p 2>/dev/null       # and the server once more, healed by the restarted plugin
    sleep 2
    $CTRL serve-file /tmp/heal.img --listen 127.0.0.1:10850 --export-name vol-h 2>/tmp/serve.log &
    p=$!
    wait $io
    t=$(established_to 10850)
    reconnects=$(grep -c 'reconnected' /tmp/watch.log)
    r=$(cat /tmp/io.result)
    ioerr=$(dmesg | grep -c 'I/O error')
    kill $w; wait $w 2>/dev/null
    $NODE detach --backend-id vol-h >/dev/null 2>&1
    kill $p; wait $p 2>/dev/null
    if echo "$r" | grep -q 'errors=0' && [ "$t" = 2 ] && [ "$reconnects" -ge 2 ] && [ "$ioerr" = 0 ]; then
        result heal-kill-server-and-plugin PASS "$r kernel_io_errors=0 reconnects=$reconnects tcp_after=$t"
    else
        result heal-kill-server-and-plugin FAIL "$r kernel_io_errors=$ioerr reconnects=$reconnects tcp_after=$t $(grep -E 'ERROR' /tmp/watch.log | tail -2 | tr '\n' ' ')"
    fi
}

# --- The CSI services: the real controller and the real node plugin. ---

CSI=/tmp/csi
CLIENT=csi-node-client
ctl() { $CTRL volume --endpoint "unix://$CSI/ctrl.sock" "$@"; }
now_ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }

start_controller() { # $CTRL_EXTRA: more flags (a scenario's own)
    # shellcheck disable=SC2086
    RUST_LOG=${RUST_LOG:-info} $CTRL --endpoint "unix://$CSI/ctrl.sock" --data-dir "$CSI/data" \
        --nbd-listen-address 127.0.0.1 --nbd-port-range 11000-11199 --known-nodes vm-node,vm-node-b ${CTRL_EXTRA:-} \
        2>>"$CSI/ctrl.log" &
    CP=$!
}

start_node() { # the node plugin, with the timeouts csi_start was given; $NODE_EXTRA: more flags
    # shellcheck disable=SC2086
    RUST_LOG=${RUST_LOG:-info} $NODE serve --endpoint "unix://$CSI/node.sock" --node-id vm-node \
        --state-dir "$CSI/state" --connections 2 $NODE_TIMEOUTS --check-interval 2 ${NODE_EXTRA:-} 2>>"$CSI/node.log" &
    NP=$!
}

csi_clean() { # whatever an earlier run left: mounts under $CSI, devices
    grep " $CSI/" /proc/mounts | cut -d' ' -f2 | sort -r | while read -r m; do umount "$m"; done
    $NODE status 2>/dev/null | sed -n 's/.* backend=\([^ ]*\) .*/\1/p' |
        while read -r b; do $NODE detach --backend-id "$b" >/dev/null 2>&1; done
    rm -rf "$CSI"
}

csi_start() { # timeout dead_conn_timeout: controller + node plugin
    csi_clean; mkdir -p "$CSI"
    start_controller
    NODE_TIMEOUTS="--timeout $1 --dead-conn-timeout $2"
    start_node
    i=0
    while ! { [ -S "$CSI/ctrl.sock" ] && [ -S "$CSI/node.sock" ]; }; do
        i=$((i + 1)); [ $i -gt 300 ] && { echo "vm: CSI sockets did not appear"; return 1; }
        usleep 100000
    done
}

csi_stop() {
    kill "$NP" "$CP" 2>/dev/null; wait "$NP" 2>/dev/null; wait "$CP" 2>/dev/null
}

# Devices left with a backend identifier (nothing may leak).
leftover() { $NODE status 2>/dev/null | grep -c backend=; }

sanity() { # access type
    at=$1
    if ! csi_start 10 30; then result "csi-sanity-$at" FAIL "could not start"; csi_stop; return; fi
    timeout 1200 csi-sanity \
        --csi.endpoint "unix://$CSI/node.sock" --csi.controllerendpoint "unix://$CSI/ctrl.sock" \
        --csi.testvolumeaccesstype "$at" --csi.testvolumesize 67108864 --csi.testvolumeexpandsize 134217728 \
        --csi.mountdir "$CSI/mnt" --csi.stagingdir "$CSI/staging" \
        --ginkgo.no-color --ginkgo.v >"$CSI/sanity.log" 2>&1
    rc=$?
    counts=$(grep -aoE '[0-9]+ Passed \| [0-9]+ Failed \| [0-9]+ Pending \| [0-9]+ Skipped' "$CSI/sanity.log" | tail -1)
    ran=$(grep -aoE 'Ran [0-9]+ of [0-9]+ Specs in [0-9.]+ seconds' "$CSI/sanity.log" | tail -1)
    csi_stop
    left=$(leftover)
    npass=$(echo "$counts" | sed -n 's/^\([0-9]*\) Passed.*/\1/p')
    nfail=$(echo "$counts" | sed -n 's/.*| \([0-9]*\) Failed.*/\1/p')
    if [ "$rc" = 0 ] && [ "${nfail:-1}" = 0 ] && [ "${npass:-0}" -gt 0 ] && [ "$left" = 0 ]; then
        result "csi-sanity-$at" PASS "$counts; $ran; devices left=$left"
    else
        result "csi-sanity-$at" FAIL "rc=$rc ${counts:-no ginkgo summary}; $ran; devices left=$left"
        grep -aE '^\s*\[FAIL\]' "$CSI/sanity.log" | head -20 | sed 's/^/vm: sanity: /'
        grep -aA4 -E 'Unexpected error|Expected$' "$CSI/sanity.log" | head -60 | sed 's/^/vm: sanity: /'
        grep -aE 'ERROR|WARN' "$CSI/node.log" | tail -20 | sed 's/^/vm: node: /'
        grep -aE 'ERROR' "$CSI/ctrl.log" | tail -10 | sed 's/^/vm: ctrl: /'
    fi
    # Which specs were skipped (capabilities the driver does not offer).
    grep -aA1 '\[SKIPPED\]' "$CSI/sanity.log" | grep -aE '\[It\]' | grep -av '/csi-test/' |
        sed 's/ *\[It\] */: /; s/^ */vm: skipped: /' | sort -u | head -30
    cp "$CSI/sanity.log" "/tmp/sanity-$at.log"
}

scenario_sanity_mount() { sanity mount; }
scenario_sanity_block() { sanity block; }

# The device node NODE's plugin attached for volume ID: the backend
# identifier names both.
device_of() { # id [node]
    idx=$($NODE status | sed -n "s/^nbd\([0-9]*\) backend=$1@${2:-vm-node} .*/\1/p")
    [ -n "$idx" ] && echo "/dev/nbd$idx"
}

# Create, publish and stage a mount volume through the CSI calls; sets ID
# URI STG DEV.
csi_stage_mount() { # name size [fstype]
    ID=$(ctl create "$1" --size "$2" | awk '/^volume:/ {print $2}')
    URI=$(ctl publish --node vm-node "$ID" 2>/dev/null | grep -E '^nbds?://')
    STG=$CSI/staging/$1
    $CLIENT "$CSI/node.sock" stage "$ID" "$STG" "$URI" --fs-type "${3:-ext4}" >"$CSI/stage.out" 2>&1
    DEV=$(device_of "$ID")
}

df_kib() { df -P -k "$1" | awk 'NR == 2 { print $2 }'; }

# expand_fs result fstype bytes bytes_after: stage a filesystem, write, expand it
# online (controller, then node) to `bytes`, write past the old end, unstage;
# stage again, which must mount the filesystem as it is (never format a
# volume that holds one), and find the data.
expand_fs() {
    name=$1 fs=$2
    csi_start 10 30 || { result "$name" FAIL "could not start"; csi_stop; return; }
    csi_stage_mount "$fs" "$3" "$fs"
    failed=""
    [ -n "$ID" ] && [ -n "$URI" ] && grep -q '^ok' "$CSI/stage.out" || failed="$failed stage($(cat "$CSI/stage.out"))"
    mounted_fs=$(grep " $STG " /proc/mounts | cut -d' ' -f3)
    dd if=/dev/urandom of="$STG/data" bs=1M count=4 2>/dev/null
    sum1=$(sha256sum < "$STG/data")
    df1=$(df_kib "$STG")
    ctl expand --size "$4" "$ID" >"$CSI/expand.out" 2>&1 || failed="$failed controller-expand($(cat "$CSI/expand.out"))"
    out=$($CLIENT "$CSI/node.sock" expand "$ID" "$STG" "$STG" "$4")
    echo "$out" | grep -q '^ok' || failed="$failed node-expand($out)"
    df2=$(df_kib "$STG")
    devbytes=$(($(cat "/sys/block/${DEV#/dev/}/size") * 512))
    dd if=/dev/urandom of="$STG/more" bs=1M count=100 2>/dev/null || failed="$failed write-into-new-space"
    sync
    sum2=$(sha256sum < "$STG/data")
    out=$($CLIENT "$CSI/node.sock" unstage "$ID" "$STG")
    echo "$out" | grep -q '^ok' || failed="$failed unstage($out)"
    out=$($CLIENT "$CSI/node.sock" stage "$ID" "$STG" "$URI" --fs-type "$fs")
    echo "$out" | grep -q '^ok' || failed="$failed restage($out)"
    sum3=$(sha256sum < "$STG/data")
    out=$($CLIENT "$CSI/node.sock" unstage "$ID" "$STG")
    echo "$out" | grep -q '^ok' || failed="$failed unstage2($out)"
    csi_stop
    detail="$mounted_fs: df 1K-blocks $df1 -> $df2, $DEV $devbytes bytes"
    # The filesystem grew by at least 90% of what the device did.
    grown=$(( (${df2:-0} - ${df1:-0}) * 1024 >= ($4 - $3) * 9 / 10 ))
    if [ -z "$failed" ] && [ "$mounted_fs" = "$fs" ] && [ "$devbytes" = "$4" ] && [ "$grown" = 1 ] &&
        [ "$sum1" = "$sum2" ] && [ "$sum1" = "$sum3" ] && [ "$(leftover)" = 0 ]; then
        result "$name" PASS "$detail; 100 MiB written past the old end; staged again without formatting, data intact"
    else
        result "$name" FAIL "$detail; failed:$failed sums: $([ "$sum1" = "$sum2" ] && echo y || echo n)$([ "$sum1" = "$sum3" ] && echo y || echo n)"
        grep -aE 'ERROR|WARN' "$CSI/node.log" | tail -10 | sed 's/^/vm: node: /'
    fi
}

scenario_expand() { expand_fs expand-online-df ext4 67108864 268435456; }
# mkfs.xfs wants at least 300 MiB; the VM's /tmp holds 512 MiB.
scenario_expand_xfs() { expand_fs expand-online-df-xfs xfs 335544320 469762048; }

# Online expansion of a raw block volume: ControllerExpandVolume asks for the
# node step, NodeExpandVolume resizes the kernel's device (netlink) while the
# volume stays staged and published, and blockdev sees the new size; the data
# at the old end reads back byte-exact (O_DIRECT) and the new space is written.
scenario_expand_block() {
    csi_start 10 30 || { result expand-online-block FAIL "could not start"; csi_stop; return; }
    ID=$(ctl create blkgrow --block --size 64M | awk '/^volume:/ {print $2}')
    URI=$(ctl publish --node vm-node "$ID" 2>/dev/null | grep '^nbd://')
    STG=$CSI/staging/blkgrow TGT=$CSI/pods/blkgrow
    out=$($CLIENT "$CSI/node.sock" stage "$ID" "$STG" "$URI" --block)
    out2=$($CLIENT "$CSI/node.sock" publish "$ID" "$STG" "$TGT" --block)
    dd if=/dev/urandom of=/tmp/g1 bs=1M count=8 2>/dev/null
    dd if=/tmp/g1 of="$TGT" bs=1M seek=56 oflag=direct conv=fsync 2>/dev/null
    before=$(blockdev --getsize64 "$TGT")
    exp=$(ctl expand --size 128M "$ID" 2>&1)
    out3=$($CLIENT "$CSI/node.sock" expand "$ID" "$TGT" "$STG" 134217728 --block)
    after=$(blockdev --getsize64 "$TGT")
    dd if=/tmp/g1 of="$TGT" bs=1M seek=120 oflag=direct conv=fsync 2>/dev/null && wrote=y || wrote=n
    dd if="$TGT" of=/tmp/g2 bs=1M skip=56 count=8 iflag=direct 2>/dev/null
    dd if="$TGT" of=/tmp/g3 bs=1M skip=120 count=8 iflag=direct 2>/dev/null
    cmp -s /tmp/g1 /tmp/g2 && old=y || old=n
    cmp -s /tmp/g1 /tmp/g3 && new=y || new=n
    out4=$($CLIENT "$CSI/node.sock" unpublish "$ID" "$TGT")
    out5=$($CLIENT "$CSI/node.sock" unstage "$ID" "$STG")
    csi_stop
    detail="blockdev --getsize64 $before -> $after while published; controller: $(echo "$exp" | head -1); old end intact=$old, new space written and read back=$wrote/$new"
    if echo "$out $out2 $out3 $out4 $out5" | grep -q '^ok.*ok.*ok.*ok.*ok' && [ "$before" = 67108864 ] &&
        [ "$after" = 134217728 ] && echo "$exp" | grep -q NodeExpandVolume && [ "$old$wrote$new" = yyy ] &&
        [ "$(leftover)" = 0 ]; then
        result expand-online-block PASS "$detail"
    else
        result expand-online-block FAIL "$detail; calls: $(echo "$out $out2 $out3 $out4 $out5" | tr '\n' ' ' | cut -c1-300)"
        grep -aE 'ERROR|WARN' "$CSI/node.log" | tail -10 | sed 's/^/vm: node: /'
    fi
}

# Shared raw block between two nodes (KubeVirt live migration): a
# MULTI_NODE_MULTI_WRITER block volume published to two node ids, each with
# a node plugin of its own (node id, state directory, CSI socket), so two
# kernel NBD clients, two /dev/nbdX, attach one export. A 1 MiB random
# pattern written with O_DIRECT + fsync through one node's device reads back
# byte-exact with O_DIRECT through the other's, in both directions (each
# region read through the page cache first, so a stale cached copy would
# show), while both stay attached; then the source node lets go
# (NodeUnpublish, NodeUnstage, ControllerUnpublish: the handover) and the
# destination still reads both patterns and writes, its write reaching the
# server's image. Without Kubernetes both nodes dial from 127.0.0.1 (the
# export name alone guards the volume), so no network namespace is needed.
# Filesystem volumes stay single-writer: MULTI_NODE_MULTI_WRITER is refused
# for them and a second node's publication too.
scenario_shared_block() {
    name=shared-block-two-nodes
    csi_start 10 30 || { result $name FAIL "could not start"; csi_stop; return; }
    RUST_LOG=${RUST_LOG:-info} $NODE serve --endpoint "unix://$CSI/node-b.sock" --node-id vm-node-b \
        --state-dir "$CSI/state-b" --connections 2 --timeout 10 --dead-conn-timeout 30 --check-interval 2 \
        2>>"$CSI/node-b.log" &
    NPB=$!
    i=0
    while ! [ -S "$CSI/node-b.sock" ] && [ $i -lt 300 ]; do usleep 100000; i=$((i + 1)); done
    mmw=multi-node-multi-writer
    ID=$(ctl create shared --block --size 64M --access-mode $mmw | awk '/^volume:/ {print $2}')
    URIA=$(ctl publish --node vm-node --access-mode $mmw "$ID" 2>/dev/null | grep '^nbd://')
    URIB=$(ctl publish --node vm-node-b --access-mode $mmw "$ID" 2>/dev/null | grep '^nbd://')
    port=$(echo "$URIA" | sed 's|nbd://127.0.0.1:\([0-9]*\)/.*|\1|')
    STGA=$CSI/staging/a/shared TGTA=$CSI/pods/a/shared STGB=$CSI/staging/b/shared TGTB=$CSI/pods/b/shared
    A="$CSI/node.sock" B="$CSI/node-b.sock"
    calls="$($CLIENT "$A" stage "$ID" "$STGA" "$URIA" --block) $($CLIENT "$A" publish "$ID" "$STGA" "$TGTA" --block)"
    calls="$calls $($CLIENT "$B" stage "$ID" "$STGB" "$URIB" --block) $($CLIENT "$B" publish "$ID" "$STGB" "$TGTB" --block)"
    deva=$(device_of "$ID" vm-node) devb=$(device_of "$ID" vm-node-b)
    tcp_both=$(established_to "$port")
    # Both caches hold the regions as they were (zeros) before the writes.
    for t in "$TGTA" "$TGTB"; do dd if="$t" of=/dev/null bs=1M count=48 2>/dev/null; done
    dd if=/dev/urandom of=/tmp/sa bs=1M count=1 2>/dev/null
    dd if=/dev/urandom of=/tmp/sb bs=1M count=1 2>/dev/null
    dd if=/dev/urandom of=/tmp/sc bs=1M count=1 2>/dev/null
    digest() { sha256sum < "$1" | cut -c1-16; }
    read_direct() { dd if="$1" of=/tmp/sr bs=1M skip="$2" count=1 iflag=direct 2>/dev/null && digest /tmp/sr; }
    ms0=$(now_ms)
    dd if=/tmp/sa of="$TGTA" bs=1M seek=5 oflag=direct conv=fsync 2>/dev/null && wa=y || wa=n
    a_to_b=$(read_direct "$TGTB" 5)
    dd if=/tmp/sb of="$TGTB" bs=1M seek=21 oflag=direct conv=fsync 2>/dev/null && wb=y || wb=n
    b_to_a=$(read_direct "$TGTA" 21)
    both_ms=$(($(now_ms) - ms0))
    # The handover: the source node lets go of the volume.
    ms0=$(now_ms)
    handover="$($CLIENT "$A" unpublish "$ID" "$TGTA") $($CLIENT "$A" unstage "$ID" "$STGA")"
    ctl unpublish --node vm-node "$ID" >/dev/null 2>&1 && handover="$handover ok" || handover="$handover controller-unpublish-failed"
    handover_ms=$(($(now_ms) - ms0))
    a_left=$(device_of "$ID" vm-node)
    b_connected=$($NODE status | grep -c "^${devb#/dev/} backend=$ID@vm-node-b connected=true")
    tcp_after=$(established_to "$port")
    after_a=$(read_direct "$TGTB" 5) after_b=$(read_direct "$TGTB" 21)
    dd if=/tmp/sc of="$TGTB" bs=1M seek=40 oflag=direct conv=fsync 2>/dev/null && wc=y || wc=n
    after_c=$(read_direct "$TGTB" 40)
    image=$(dd if="$CSI/data/volumes/$ID.img" bs=1M skip=40 count=1 2>/dev/null | sha256sum | cut -c1-16)
    cond=$($CLIENT "$B" stats "$ID" "$TGTB" | grep -o 'abnormal: [a-z]*')
    fin="$($CLIENT "$B" unpublish "$ID" "$TGTB") $($CLIENT "$B" unstage "$ID" "$STGB")"
    ctl unpublish --node vm-node-b "$ID" >/dev/null 2>&1
    # Filesystem volumes stay single-writer.
    fs_mmw=$(ctl create sharedfs --size 64M --access-mode $mmw 2>&1)
    fsid=$(ctl create singlefs --size 64M | awk '/^volume:/ {print $2}')
    ctl publish --node vm-node "$fsid" >/dev/null 2>&1
    fs_second=$(ctl publish --node vm-node-b "$fsid" 2>&1)
    ctl unpublish --node vm-node "$fsid" >/dev/null 2>&1
    kill "$NPB"; wait "$NPB" 2>/dev/null
    csi_stop
    sa=$(digest /tmp/sa) sb=$(digest /tmp/sb) sc=$(digest /tmp/sc)
    same() { [ "$1" = "$2" ] && echo y || echo n; }
    detail="$deva (vm-node) and $devb (vm-node-b) on one export, tcp=$tcp_both; A->B $(same "$a_to_b" "$sa"), B->A $(same "$b_to_a" "$sb") (O_DIRECT, 1 MiB each way, ${both_ms} ms); handover in ${handover_ms} ms: A's device left='${a_left}', B connected=$b_connected tcp=$tcp_after; B after: A's $(same "$after_a" "$sa") B's $(same "$after_b" "$sb") new write $wc/$(same "$after_c" "$sc") in the image $(same "$image" "$sc"), $cond; filesystem MULTI_NODE_MULTI_WRITER: $(echo "$fs_mmw" | tail -1 | cut -c1-90); filesystem on a second node: $(echo "$fs_second" | tail -1 | cut -c1-90)"
    if echo "$calls" | grep -q '^ok.*ok.*ok.*ok' && [ -n "$deva" ] && [ -n "$devb" ] && [ "$deva" != "$devb" ] &&
        [ "$tcp_both" = 4 ] && [ "$wa$wb" = yy ] && [ "$a_to_b" = "$sa" ] && [ "$b_to_a" = "$sb" ] &&
        echo "$handover" | grep -q '^ok.*ok.*ok' && [ -z "$a_left" ] && [ "$b_connected" = 1 ] && [ "$tcp_after" = 2 ] &&
        [ "$after_a" = "$sa" ] && [ "$after_b" = "$sb" ] && [ "$wc" = y ] && [ "$after_c" = "$sc" ] && [ "$image" = "$sc" ] &&
        [ "$cond" = "abnormal: false" ] && echo "$fin" | grep -q '^ok.*ok' &&
        echo "$fs_mmw" | grep -q 'MULTI_NODE_MULTI_WRITER is supported for block volumes only' &&
        echo "$fs_second" | grep -q 'single-node and already published' && [ "$(leftover)" = 0 ]; then
        result $name PASS "$detail"
    else
        result $name FAIL "$detail; calls: $(echo "$calls" | tr '\n' ' ' | cut -c1-200); handover: $(echo "$handover" | tr '\n' ' ' | cut -c1-200); end: $(echo "$fin" | tr '\n' ' ' | cut -c1-100); leftover=$(leftover)"
        grep -aE 'ERROR|WARN' "$CSI/node.log" | tail -6 | sed 's/^/vm: node-a: /'
        grep -aE 'ERROR|WARN' "$CSI/node-b.log" | tail -6 | sed 's/^/vm: node-b: /'
        grep -aE 'ERROR|WARN' "$CSI/ctrl.log" | tail -4 | sed 's/^/vm: ctrl: /'
    fi
}

scenario_dead_server() {
    # Request timeout 5 s, dead-connection timeout 15 s.
    csi_start 5 15 || { result unstage-dead-server FAIL "could not start"; csi_stop; return; }
    csi_stage_mount dead 64M
    grep -q '^ok' "$CSI/stage.out" || { result unstage-dead-server FAIL "stage: $(cat "$CSI/stage.out")"; csi_stop; return; }
    # Dirty data in the page cache: unmounting must try to write it back.
    dd if=/dev/urandom of="$STG/data" bs=1M count=4 2>/dev/null
    kill -9 "$CP"; wait "$CP" 2>/dev/null    # the server dies and never comes back
    dmesg -c >/dev/null
    ms0=$(now_ms)
    out=$(timeout 120 $CLIENT "$CSI/node.sock" unstage "$ID" "$STG")
    rc=$?
    ms=$(($(now_ms) - ms0))
    mounted=$(grep -c " $STG " /proc/mounts)
    state=$(ls "$CSI/state" 2>/dev/null | wc -l)
    size=$(cat "/sys/block/${DEV#/dev/}/size" 2>/dev/null)
    backend=$(cat "/sys/block/${DEV#/dev/}/backend" 2>/dev/null)
    left=$(leftover)
    # A retry is idempotent and answers at once.
    out2=$(timeout 30 $CLIENT "$CSI/node.sock" unstage "$ID" "$STG")
    kill "$NP"; wait "$NP" 2>/dev/null
    detail="took ${ms} ms (dead-conn timeout 15 s), rc=$rc, reply: $(echo "$out" | cut -c1-160); after: mounted=$mounted state_files=$state $DEV size=$size backend='$backend' leftover=$left; retry: $(echo "$out2" | cut -c1-30)"
    # The first answer is a clear error (the dirty 4 MiB never reached the
    # server), the device released all the same; the retry succeeds.
    if [ "$rc" != 124 ] && [ "$ms" -lt 45000 ] && [ "$mounted" = 0 ] && [ "$size" = 0 ] && [ -z "$backend" ] &&
        echo "$out" | grep -q '^error .*code=Unavailable.*flushing to its NBD server failed' &&
        [ "$left" = 0 ] && [ "$state" = 0 ] && echo "$out2" | grep -q '^ok'; then
        result unstage-dead-server PASS "$detail"
    else
        result unstage-dead-server FAIL "$detail"
        grep -aE 'ERROR|WARN|unstag' "$CSI/node.log" | tail -10 | sed 's/^/vm: node: /'
    fi
}

# fio write+verify rounds on the staged filesystem until $2 seconds passed;
# writes /tmp/fio.result.
fio_loop() { # dir seconds
    end=$(($(cut -d. -f1 /proc/uptime) + $2)); n=0; bad=0
    while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
        fio --name=fsv --directory="$1" --filename=fio.dat --size=16M --bs=64k --rw=randwrite \
            --ioengine=psync --direct=1 --verify=crc32c --do_verify=1 --end_fsync=1 \
            --randseed=$n >/tmp/fio.out 2>&1 || { bad=$((bad + 1)); tail -3 /tmp/fio.out | sed 's/^/vm: fio: /'; }
        grep -q 'err= 0' /tmp/fio.out || bad=$((bad + 1))
        n=$((n + 1))
    done
    echo "fio_rounds=$n failed_rounds=$bad" > /tmp/fio.result
}

# fio_under name disrupt reconnects starts: fio write+verify rounds on a
# staged filesystem for 45 s while the function `disrupt` kills things. Passes
# on zero failed rounds and kernel I/O errors, at least `reconnects` heals,
# `starts` node-plugin starts, and a clean unstage.
fio_under() {
    name=$1
    csi_start 10 60 || { result "$name" FAIL "could not start"; csi_stop; return; }
    csi_stage_mount fio 128M
    grep -q '^ok' "$CSI/stage.out" || { result "$name" FAIL "stage: $(cat "$CSI/stage.out")"; csi_stop; return; }
    port=$(echo "$URI" | sed -E 's|nbds?://127.0.0.1:([0-9]*)/.*|\1|')
    dmesg -c >/dev/null
    rm -f /tmp/fio.result
    fio_loop "$STG" 45 &
    io=$!
    "$2"
    wait $io
    r=$(cat /tmp/fio.result)
    t=$(established_to "$port")
    ioerr=$(dmesg | grep -cE 'I/O error|EXT4-fs error')
    reconnects=$(grep -c 'reconnected' "$CSI/node.log")
    starts=$(grep -c 'serving CSI Identity and Node' "$CSI/node.log")
    out=$($CLIENT "$CSI/node.sock" unstage "$ID" "$STG")
    csi_stop
    detail="$r kernel_io_errors=$ioerr plugin_starts=$starts reconnects=$reconnects tcp_after=$t unstage: $(echo "$out" | cut -c1-40)"
    if echo "$r" | grep -q 'failed_rounds=0' && ! echo "$r" | grep -q 'fio_rounds=0' && [ "$ioerr" = 0 ] &&
        [ "$reconnects" -ge "$3" ] && [ "$starts" = "$4" ] && [ "$t" -ge 1 ] && echo "$out" | grep -q '^ok'; then
        result "$name" PASS "$detail"
    else
        result "$name" FAIL "$detail"
        dmesg | grep -E 'nbd|I/O|EXT4' | tail -5 | sed 's/^/vm: dmesg: /'
        grep -aE 'ERROR|WARN' "$CSI/node.log" | tail -5 | sed 's/^/vm: node: /'
    fi
}

kill_controller_twice() {
    sleep 6
    kill -9 "$CP"; wait "$CP" 2>/dev/null     # the controller (and every NBD server in it) dies
    sleep 3
    start_controller                           # same data dir: the export comes back
    sleep 12
    kill -9 "$CP"; wait "$CP" 2>/dev/null     # and once more
    sleep 2
    start_controller
}

kill_plugin_twice() {
    sleep 6
    kill -9 "$NP"; wait "$NP" 2>/dev/null     # the plugin dies mid-I/O: the kernel keeps the sockets
    sleep 3
    start_node
    sleep 10
    kill -9 "$NP"; wait "$NP" 2>/dev/null     # dies again, and while it is away
    kill -9 "$CP"; wait "$CP" 2>/dev/null     # the server dies too: nobody is there to heal
    sleep 2
    start_controller
    sleep 3
    start_node                                 # the restarted plugin finds the dead link on start
}

scenario_fio_controller_kill() { fio_under fio-verify-controller-kill kill_controller_twice 2 1; }
scenario_fio_plugin_kill() { fio_under fio-verify-plugin-kill kill_plugin_twice 1 3; }

# The same through CSI with a TLS-required volume (the controller's storage
# role serves it with STARTTLS; the plugin stages nbds:// and hands kTLS
# sockets to the kernel): the plugin SIGKILLed mid-I/O twice, the server once;
# every reconnect redoes the TLS handshake.
scenario_fio_plugin_kill_tls() {
    CTRL_EXTRA="--default-tls required --tls-dir /tls/server"; NODE_EXTRA="--tls-dir /tls/node"
    before=$(tls_socks); dec0=$(tls_stat TlsDecryptError)
    fio_under fio-verify-plugin-kill-tls kill_plugin_twice 1 3
    CTRL_EXTRA=""; NODE_EXTRA=""
    handshakes=$(grep -c 'handed to the kernel' "$CSI/node.log")
    dec=$(($(tls_stat TlsDecryptError) - dec0))
    detail="uri=$(echo "$URI" | cut -d/ -f1-3) kernel_tls_handoffs=$handshakes decrypt_errors=$dec kernel_tls_sockets=$before->$(tls_socks)"
    # 2 connections at staging, 2 more for each reconnect (at least one).
    if echo "$URI" | grep -q '^nbds://' && [ "$handshakes" -ge 4 ] && [ "$dec" = 0 ]; then
        result tls-csi-stage PASS "$detail"
    else
        result tls-csi-stage FAIL "$detail"
    fi
}

# The plugin starts after losing track of things: a device of ours no state
# claims (disconnected; named by the volume id alone, as older versions
# named theirs), another that is mounted (left alone), and a staged
# filesystem whose device and mount vanished as in a reboot (attached and
# mounted again).
scenario_reconcile() {
    csi_start 10 30 || { result reconcile-on-start FAIL "could not start"; csi_stop; return; }
    csi_stage_mount rec 64M
    grep -q '^ok' "$CSI/stage.out" || { result reconcile-on-start FAIL "stage: $(cat "$CSI/stage.out")"; csi_stop; return; }
    dd if=/dev/urandom of="$STG/data" bs=1M count=4 2>/dev/null
    sync
    sum1=$(sha256sum < "$STG/data")
    lost=$(ctl create lost --size 64M | awk '/^volume:/ {print $2}')
    busy=$(ctl create busy --size 64M | awk '/^volume:/ {print $2}')
    $NODE attach "$(ctl publish --node vm-node "$lost" 2>/dev/null | grep '^nbd://')" --backend-id "$lost" >/dev/null 2>&1
    bdev=$($NODE attach "$(ctl publish --node vm-node "$busy" 2>/dev/null | grep '^nbd://')" --backend-id "$busy" 2>/dev/null | field device)
    mkfs.ext4 -q -F "$bdev"; mkdir -p /mnt/busy; mount -t ext4 "$bdev" /mnt/busy
    kill -9 "$NP"; wait "$NP" 2>/dev/null
    umount "$STG"; $NODE detach --backend-id "$ID@vm-node" >/dev/null 2>&1
    gone=$($NODE status | grep -c "backend=$ID@vm-node ")
    start_node
    i=0
    while ! grep -q " $STG " /proc/mounts && [ $i -lt 200 ]; do usleep 100000; i=$((i + 1)); done
    sum2=$(sha256sum < "$STG/data" 2>/dev/null)
    src=$(grep " $STG " /proc/mounts | cut -d' ' -f1)
    has_lost=$($NODE status | grep -c "backend=$lost ")
    has_busy=$($NODE status | grep -c "backend=$busy ")
    has_id=$($NODE status | grep "backend=$ID@vm-node " | cut -d' ' -f1)
    left_alone=$(grep -c 'in use; left alone' "$CSI/node.log")
    umount /mnt/busy; $NODE detach --backend-id "$busy" >/dev/null 2>&1
    out=$($CLIENT "$CSI/node.sock" unstage "$ID" "$STG")
    csi_stop
    detail="before start: device gone=$([ "$gone" = 0 ] && echo y || echo n); after: staging on $src (${has_id:-no device}), data $([ "$sum1" = "$sum2" ] && echo intact || echo differs); unclaimed unused present=$has_lost; unclaimed mounted present=$has_busy (warned $left_alone); unstage: $(echo "$out" | cut -c1-30); leftover=$(leftover)"
    if [ "$gone" = 0 ] && [ -n "$has_id" ] && [ "$src" = "/dev/$has_id" ] && [ "$sum1" = "$sum2" ] &&
        [ "$has_lost" = 0 ] && [ "$has_busy" = 1 ] && [ "$left_alone" -ge 1 ] && echo "$out" | grep -q '^ok' &&
        [ "$(leftover)" = 0 ]; then
        result reconcile-on-start PASS "$detail"
    else
        result reconcile-on-start FAIL "$detail"
        grep -aE 'ERROR|WARN' "$CSI/node.log" | tail -8 | sed 's/^/vm: node: /'
    fi
}

# The server stays away longer than the dead-connection timeout: I/O fails
# and VolumeCondition says so; when it is back the plugin's periodic retry
# reconnects the same device and I/O works again without re-staging.
scenario_heal_after_timeout() {
    csi_start 3 5 || { result heal-after-timeout FAIL "could not start"; csi_stop; return; }
    ID=$(ctl create late --size 64M | awk '/^volume:/ {print $2}')
    URI=$(ctl publish --node vm-node "$ID" 2>/dev/null | grep '^nbd://')
    STG=$CSI/staging/late TGT=$CSI/pods/late
    out=$($CLIENT "$CSI/node.sock" stage "$ID" "$STG" "$URI" --block)
    out2=$($CLIENT "$CSI/node.sock" publish "$ID" "$STG" "$TGT" --block)
    stats() { $CLIENT "$CSI/node.sock" stats "$ID" "$TGT" | grep -o 'VolumeCondition {[^}]*}'; }
    c1=$(stats)
    dd if=/dev/urandom of=/tmp/p1 bs=64k count=16 2>/dev/null
    kill -9 "$CP"; wait "$CP" 2>/dev/null
    ms0=$(now_ms)
    dd if=/tmp/p1 of="$TGT" bs=64k conv=fsync 2>/dev/null && failed_io=n || failed_io=y
    ms=$(($(now_ms) - ms0))
    sleep 3
    c2=$(stats)
    start_controller
    ms0=$(now_ms)
    i=0
    while ! stats | grep -q 'abnormal: false' && [ $i -lt 300 ]; do usleep 100000; i=$((i + 1)); done
    back_ms=$(($(now_ms) - ms0))
    c3=$(stats)
    dd if=/tmp/p1 of="$TGT" bs=64k conv=fsync 2>/dev/null && wrote=y || wrote=n
    echo 3 > /proc/sys/vm/drop_caches
    dd if="$TGT" of=/tmp/p2 bs=64k count=16 2>/dev/null
    cmp -s /tmp/p1 /tmp/p2 && same=y || same=n
    $CLIENT "$CSI/node.sock" unpublish "$ID" "$TGT" >/dev/null
    out3=$($CLIENT "$CSI/node.sock" unstage "$ID" "$STG")
    csi_stop
    detail="write with the server gone failed=$failed_io after ${ms} ms; condition before: $c1; while gone: $c2; back after ~${back_ms} ms: $c3; write+read back after: wrote=$wrote same=$same; unstage: $(echo "$out3" | cut -c1-20)"
    if echo "$out $out2" | grep -q '^ok.*ok' && echo "$c1" | grep -q 'abnormal: false' && [ "$failed_io" = y ] &&
        echo "$c2" | grep -q 'abnormal: true.*I/O fails until reconnecting succeeds' && echo "$c3" | grep -q 'abnormal: false' &&
        [ "$wrote" = y ] && [ "$same" = y ] && echo "$out3" | grep -q '^ok' && [ "$(leftover)" = 0 ]; then
        result heal-after-timeout PASS "$detail"
    else
        result heal-after-timeout FAIL "$detail; stage: $out $out2"
        grep -aE 'ERROR|WARN' "$CSI/node.log" | tail -8 | sed 's/^/vm: node: /'
    fi
}

# A node plugin pod restarts (crash, DaemonSet upgrade) while a filesystem is
# staged, published and written to, and the server dies in the gap, so a
# heal is needed that nobody is there to do. The new container starts from
# scratch: an empty socket directory and nothing else of the old process,
# only what the chart mounts from the host, among it the state directory
# (<kubeletDir>/plugins/<driver>/state). From that alone the fresh plugin
# must re-adopt the volume: heal its connection (fio keeps verifying), report
# it healthy in NodeGetVolumeStats, publish it again, and unstage it.
# FRESH_STATE=container (on the kernel command line) keeps the state inside
# the container instead, as the chart once did: the scenario must then fail.
scenario_fresh_container() {
    name=fresh-container-host-state
    csi_clean; mkdir -p "$CSI"
    kubelet=$CSI/kubelet                                 # the host's kubelet directory
    container=$CSI/container                             # the container's own files
    host_state=$kubelet/plugins/nbd.csi.dev/state        # the chart's hostPath
    [ "${FRESH_STATE:-host}" = container ] && host_state=$container/state
    sock=$container/csi/csi.sock
    start_controller
    start_container() { # a new container: its own directories empty, the host's kept
        rm -rf "$container"; mkdir -p "$container/csi"
        RUST_LOG=${RUST_LOG:-info} $NODE serve --endpoint="unix://$sock" --node-id=vm-node \
            --driver-name=nbd.csi.dev --state-dir="$host_state" --connections=2 \
            --timeout=10 --dead-conn-timeout=60 --check-interval=2 2>>"$CSI/node.log" &
        NP=$!
        i=0
        while ! { [ -S "$CSI/ctrl.sock" ] && [ -S "$sock" ]; }; do
            i=$((i + 1)); [ $i -gt 300 ] && return 1
            usleep 100000
        done
    }
    start_container || { result $name FAIL "could not start"; csi_stop; return; }
    ID=$(ctl create fresh --size 128M | awk '/^volume:/ {print $2}')
    URI=$(ctl publish --node vm-node "$ID" 2>/dev/null | grep '^nbd://')
    port=$(echo "$URI" | sed 's|nbd://127.0.0.1:\([0-9]*\)/.*|\1|')
    STG=$kubelet/plugins/kubernetes.io/csi/nbd.csi.dev/fresh/globalmount
    TGT1=$kubelet/pods/pod-1/volumes/kubernetes.io~csi/fresh/mount
    TGT2=$kubelet/pods/pod-2/volumes/kubernetes.io~csi/fresh/mount
    out=$($CLIENT "$sock" stage "$ID" "$STG" "$URI" --fs-type ext4)
    out1=$($CLIENT "$sock" publish "$ID" "$STG" "$TGT1")
    if ! echo "$out $out1" | grep -q '^ok.*ok'; then
        result $name FAIL "stage: $out publish: $out1"; csi_stop; return
    fi
    dd if=/dev/urandom of="$TGT1/data" bs=1M count=4 2>/dev/null
    sync
    sum1=$(sha256sum < "$TGT1/data")
    state_before=$(ls "$host_state" | wc -l)
    dmesg -c >/dev/null
    rm -f /tmp/fio.result
    fio_loop "$TGT1" 40 &
    io=$!
    sleep 6
    kill -9 "$NP"; wait "$NP" 2>/dev/null     # the container dies mid-I/O
    kill -9 "$CP"; wait "$CP" 2>/dev/null     # and the server with it: the link is dead
    sleep 2
    start_controller
    sleep 2
    restarts=$(grep -c 'serving CSI Identity and Node' "$CSI/node.log")
    start_container || { result $name FAIL "the fresh container did not start"; kill $io; csi_stop; return; }
    ms0=$(now_ms)
    i=0
    while ! $CLIENT "$sock" stats "$ID" "$TGT1" 2>/dev/null | grep -q 'abnormal: false' && [ $i -lt 300 ]; do
        usleep 100000; i=$((i + 1))
    done
    healthy_ms=$(($(now_ms) - ms0))
    cond=$($CLIENT "$sock" stats "$ID" "$TGT1" | grep -o 'VolumeCondition {[^}]*}')
    wait $io
    r=$(cat /tmp/fio.result)
    ioerr=$(dmesg | grep -cE 'I/O error|EXT4-fs error')
    reconnects=$(grep -c 'reconnected' "$CSI/node.log")
    # The already-staged volume is published again: to the old target
    # (idempotent) and to a new one, which sees the same data.
    again=$($CLIENT "$sock" publish "$ID" "$STG" "$TGT1")
    out2=$($CLIENT "$sock" publish "$ID" "$STG" "$TGT2")
    sum2=$(sha256sum < "$TGT2/data" 2>/dev/null)
    t=$(established_to "$port")
    u1=$($CLIENT "$sock" unpublish "$ID" "$TGT1")
    u2=$($CLIENT "$sock" unpublish "$ID" "$TGT2")
    out3=$($CLIENT "$sock" unstage "$ID" "$STG")
    state_after=$(ls "$host_state" | wc -l)
    csi_stop
    detail="$r kernel_io_errors=$ioerr; host state files before=$state_before after unstage=$state_after; fresh plugin: healthy after ~${healthy_ms} ms, $cond, reconnects=$reconnects tcp=$t; publish again: $(echo "$again" | cut -c1-40) / new target: $(echo "$out2" | cut -c1-40) data $([ "$sum1" = "$sum2" ] && echo intact || echo differs); unpublish: $(echo "$u1" | cut -c1-2)/$(echo "$u2" | cut -c1-2), unstage: $(echo "$out3" | cut -c1-40)"
    if echo "$r" | grep -q 'failed_rounds=0' && ! echo "$r" | grep -q 'fio_rounds=0' && [ "$ioerr" = 0 ] &&
        [ "$restarts" = 1 ] && [ "$state_before" = 1 ] && echo "$cond" | grep -q 'abnormal: false' &&
        [ "$reconnects" -ge 1 ] && [ "$t" -ge 1 ] && echo "$again" | grep -q '^ok' && echo "$out2" | grep -q '^ok' &&
        [ "$sum1" = "$sum2" ] && echo "$u1" | grep -q '^ok' && echo "$u2" | grep -q '^ok' &&
        echo "$out3" | grep -q '^ok' && [ "$state_after" = 0 ] && [ "$(leftover)" = 0 ]; then
        result $name PASS "$detail"
    else
        result $name FAIL "$detail"
        dmesg | grep -E 'nbd|I/O|EXT4' | tail -5 | sed 's/^/vm: dmesg: /'
        grep -aE 'ERROR|WARN' "$CSI/node.log" | tail -8 | sed 's/^/vm: node: /'
    fi
}

# The node plugin's metrics of a staged raw block volume on a real kernel,
# scraped over HTTP (busybox wget): the volume's connections (its device's
# blk-mq queues, one per socket, and the TCP connections to its server),
# health ok, no reconnect, and the kernel's counters from
# /sys/block/nbdX/stat after direct I/O, within the values the stat file
# had just before and just after the scrape; the storage role's allocated
# bytes of the written volume. Unstaged, the volume is gone from the node's
# metrics. (The host's tests/metrics.sh parses both endpoints with
# Prometheus' parser; busybox has no Python.)
scenario_metrics() {
    NODE_EXTRA="--metrics-address 127.0.0.1:9813" CTRL_EXTRA="--metrics-address 127.0.0.1:9810"
    csi_start 10 30 || { result node-metrics FAIL "could not start"; csi_stop; NODE_EXTRA= CTRL_EXTRA=; return; }
    NODE_EXTRA= CTRL_EXTRA=
    wait_port 9813 && wait_port 9810 || { result node-metrics FAIL "no metrics endpoint"; csi_stop; return; }
    ID=$(ctl create metered --block --size 64M | awk '/^volume:/ {print $2}')
    URI=$(ctl publish --node vm-node "$ID" 2>/dev/null | grep '^nbd://')
    port=$(echo "$URI" | sed 's|nbd://127.0.0.1:\([0-9]*\)/.*|\1|')
    STG=$CSI/staging/metered TGT=$CSI/pods/metered
    out=$($CLIENT "$CSI/node.sock" stage "$ID" "$STG" "$URI" --block)
    out2=$($CLIENT "$CSI/node.sock" publish "$ID" "$STG" "$TGT" --block)
    idx=$($NODE status | sed -n "s/^nbd\([0-9]*\) backend=$ID@vm-node .*/\1/p")
    dd if=/dev/urandom of="$TGT" bs=1M count=8 oflag=direct conv=fsync 2>/dev/null
    dd if="$TGT" of=/dev/null bs=1M count=4 iflag=direct 2>/dev/null
    before=$(cat "/sys/block/nbd$idx/stat")
    wget -q -O /tmp/node-metrics.txt http://127.0.0.1:9813/metrics
    after=$(cat "/sys/block/nbd$idx/stat")
    wget -q -O /tmp/ctrl-metrics.txt http://127.0.0.1:9810/metrics
    sample() { # file name [extra labels]: the value of name{volume_id,device[,extra]}
        labels="volume_id=\"$ID\",device=\"nbd$idx\"${3:+,$3}"
        grep -F "$2{$labels} " "$1" | awk '{ print $2 }'
    }
    within() { # value field: the stat file's field before <= value <= after
        lo=$(echo "$before" | awk -v f="$2" '{ print $f }') hi=$(echo "$after" | awk -v f="$2" '{ print $f }')
        [ -n "$1" ] && [ "$1" -gt 0 ] && [ "$lo" -le "$1" ] && [ "$1" -le "$hi" ]
    }
    n=/tmp/node-metrics.txt
    conns=$(sample $n nbd_csi_node_volume_connections) queues=$(ls "/sys/block/nbd$idx/mq" | wc -l)
    tcp=$(established_to "$port")
    ok=$(sample $n nbd_csi_node_volume_health 'state="ok"') lost=$(sample $n nbd_csi_node_volume_health 'state="lost"')
    reconnects=$(sample $n nbd_csi_node_volume_reconnects_total)
    reads=$(sample $n nbd_csi_node_volume_reads_completed_total)
    writes=$(sample $n nbd_csi_node_volume_writes_completed_total)
    wbytes=$(sample $n nbd_csi_node_volume_written_bytes_total) rbytes=$(sample $n nbd_csi_node_volume_read_bytes_total)
    wsec=$(sample $n nbd_csi_node_volume_write_time_seconds_total)
    allocated=$(grep -F "nbd_csi_volume_allocated_bytes{volume_id=\"$ID\"} " /tmp/ctrl-metrics.txt | awk '{ print $2 }')
    out3=$($CLIENT "$CSI/node.sock" unpublish "$ID" "$TGT")
    out4=$($CLIENT "$CSI/node.sock" unstage "$ID" "$STG")
    wget -q -O /tmp/node-metrics-after.txt http://127.0.0.1:9813/metrics
    gone=$(grep -c "$ID" /tmp/node-metrics-after.txt) staged=$(awk '$1 == "nbd_csi_node_volumes" { print $2 }' /tmp/node-metrics-after.txt)
    csi_stop
    detail="nbd$idx: connections=$conns (hw_queues=$queues tcp=$tcp) health ok=$ok lost=$lost reconnects=$reconnects reads=$reads writes=$writes read_bytes=$rbytes written_bytes=$wbytes write_seconds=$wsec; stat before scrape: $(echo $before); storage allocated_bytes=$allocated; after unstage: samples of the volume=$gone, volumes=$staged"
    if echo "$out $out2 $out3 $out4" | grep -q '^ok.*ok.*ok.*ok' && [ -n "$conns" ] && [ "$conns" -ge 1 ] &&
        [ "$conns" = "$queues" ] && [ "$conns" = "$tcp" ] && [ "$ok" = 1 ] && [ "$lost" = 0 ] && [ "$reconnects" = 0 ] &&
        within "$reads" 1 && within "$writes" 5 && [ "${wbytes:-0}" -ge 8388608 ] && [ "${rbytes:-0}" -ge 4194304 ] &&
        [ -n "$wsec" ] && [ "${allocated:-0}" -ge 8388608 ] && [ "$gone" = 0 ] && [ "$staged" = 0 ] &&
        [ "$(leftover)" = 0 ]; then
        result node-metrics PASS "$detail"
    else
        result node-metrics FAIL "$detail; calls: $(echo "$out $out2 $out3 $out4" | tr '\n' ' ' | cut -c1-300)"
        grep "nbd_csi_node_volume" /tmp/node-metrics.txt | head -30 | sed 's/^/vm: metrics: /'
        grep -aE 'ERROR|WARN' "$CSI/node.log" | tail -8 | sed 's/^/vm: node: /'
    fi
}

# --- NBD over TLS with kernel TLS on the node (certificates under /tls,
# made by run.sh). The node's attach runs STARTTLS, the TLS handshake and
# GO in userspace per connection, then hands each session to the kernel:
# /proc/net/tls_stat counts the kernel's TLS sockets (our server and nbdkit
# terminate TLS in userspace, so every counted socket is the client's).

tls_stat() { awk -v k="$1" '$1 == k { print $2 }' /proc/net/tls_stat; }
tls_socks() { # kernel TLS sockets each way: "tx rx" (software or offloaded)
    echo "$(($(tls_stat TlsCurrTxSw) + $(tls_stat TlsCurrTxDevice))) $(($(tls_stat TlsCurrRxSw) + $(tls_stat TlsCurrRxDevice)))"
}

# tls_data name dev image: 4 MiB of random data written with O_DIRECT
# through the device, then read back from the server's file and, O_DIRECT,
# from the device; sets $data_ok
tls_data() {
    dd if=/dev/urandom of=/tmp/tls-p bs=1M count=4 2>/dev/null
    dd if=/tmp/tls-p of="$2" bs=1M oflag=direct conv=fsync 2>/tmp/dd.err || echo "vm: $1: write: $(cat /tmp/dd.err)"
    dd if="$3" of=/tmp/tls-file bs=1M count=4 2>/dev/null
    dd if="$2" of=/tmp/tls-dev bs=1M count=4 iflag=direct 2>/dev/null
    data_ok=no
    cmp -s /tmp/tls-p /tmp/tls-file && cmp -s /tmp/tls-p /tmp/tls-dev && data_ok=yes
}

scenario_tls() {
    if [ ! -r /proc/net/tls_stat ]; then result tls-ktls FAIL "no /proc/net/tls_stat: tls.ko not loaded"; return; fi
    rm -rf /tmp/state; truncate -s 64M /tmp/tls.img
    serve 10870 $CTRL serve-file /tmp/tls.img --listen 127.0.0.1:10870 --export-name vol-t \
        --tls required --tls-dir /tls/server
    # Plaintext against the required export: refused, nothing attached.
    if $NODE attach nbd://127.0.0.1:10870/vol-t --backend-id vol-tp --connections 2 >/tmp/out 2>/tmp/err; then
        result tls-plaintext-refused FAIL "a plaintext attach of a TLS-required export succeeded"
        $NODE detach --backend-id vol-tp >/dev/null 2>&1
    elif grep -q 'TLS' /tmp/err && [ "$($NODE status | grep -c backend=vol-tp)" = 0 ]; then
        result tls-plaintext-refused PASS "$(tail -1 /tmp/err | cut -c1-200)"
    else
        result tls-plaintext-refused FAIL "$(tail -1 /tmp/err | cut -c1-200)"
    fi
    # nbds:// without certificates: a clear error.
    $NODE attach nbds://127.0.0.1:10870/vol-t --backend-id vol-tn --connections 2 >/dev/null 2>/tmp/err
    nocert=$(grep -c -- '--tls-dir' /tmp/err)

    before=$(tls_socks); dec0=$(tls_stat TlsDecryptError)
    out=$($NODE attach nbds://127.0.0.1:10870/vol-t --backend-id vol-t --connections 2 --tls-dir /tls/node \
        --timeout 10 --dead-conn-timeout 60 --state-dir /tmp/state 2>/tmp/tls-attach.log)
    dev=$(echo "$out" | field device); conns=$(echo "$out" | field connections)
    if [ -z "$dev" ]; then
        result tls-ktls FAIL "attach: $(tail -1 /tmp/tls-attach.log | cut -c1-300)"
        kill $p; wait $p 2>/dev/null; return
    fi
    socks=$(tls_socks)
    tls_data tls-ktls "$dev" /tmp/tls.img
    dec=$(($(tls_stat TlsDecryptError) - dec0))
    handed=$(grep -c 'handed to the kernel' /tmp/tls-attach.log)
    detail="dev=$dev connections=$conns kernel_tls_sockets(tx rx)=$before->$socks decrypt_errors=$dec handoffs=$handed data=$data_ok no_tls_dir_error=$nocert"
    if [ "$conns" = 2 ] && [ "$socks" = "$(( ${before% *} + 2 )) $(( ${before#* } + 2 ))" ] && [ "$dec" = 0 ] &&
        [ "$data_ok" = yes ] && [ "$handed" = 2 ] && [ "$nocert" -ge 1 ]; then
        result tls-ktls PASS "$detail; $(grep -E 'TlsCurr(Tx|Rx)Sw' /proc/net/tls_stat | tr -s ' \n' '= ')"
    else
        result tls-ktls FAIL "$detail; $(tail -1 /tmp/tls-attach.log | cut -c1-200)"
    fi

    # Healing over TLS: the server dies (SIGKILL) mid-I/O and comes back;
    # the watcher's reconnect redoes the TLS handshake on each connection.
    RUST_LOG=info $NODE watch --state-dir /tmp/state --check-interval 2 --tls-dir /tls/node 2>/tmp/tls-watch.log &
    w=$!
    rm -f /tmp/io.result
    dmesg -c >/dev/null
    io_loop "$dev" 25 &
    io=$!
    sleep 5
    kill -9 $p; wait $p 2>/dev/null
    sleep 3
    $CTRL serve-file /tmp/tls.img --listen 127.0.0.1:10870 --export-name vol-t --tls required \
        --tls-dir /tls/server 2>/tmp/serve.log &
    p=$!
    wait $io
    r=$(cat /tmp/io.result)
    reconnects=$(grep -c 'reconnected' /tmp/tls-watch.log)
    rehandshakes=$(grep -c 'handed to the kernel' /tmp/tls-watch.log)
    ioerr=$(dmesg | grep -c 'I/O error')
    after=$(tls_socks); dec=$(($(tls_stat TlsDecryptError) - dec0))
    kill $w; wait $w 2>/dev/null
    $NODE detach --backend-id vol-t >/dev/null 2>&1
    kill $p; wait $p 2>/dev/null
    detail="$r kernel_io_errors=$ioerr reconnects=$reconnects tls_handshakes_in_watch=$rehandshakes kernel_tls_sockets=$after decrypt_errors=$dec"
    if echo "$r" | grep -q 'errors=0' && [ "$ioerr" = 0 ] && [ "$reconnects" -ge 1 ] && [ "$rehandshakes" -ge 2 ] &&
        [ "$after" = "$(( ${before% *} + 2 )) $(( ${before#* } + 2 ))" ] && [ "$dec" = 0 ]; then
        result tls-heal-kill-server PASS "$detail"
    else
        result tls-heal-kill-server FAIL "$detail $(grep -aE 'ERROR|WARN' /tmp/tls-watch.log | tail -2 | tr '\n' ' ' | cut -c1-300)"
        dmesg | tail -5 | sed 's/^/vm: dmesg: /'
    fi

    # The same client against nbdkit --tls=require (GnuTLS).
    truncate -s 64M /tmp/tls-kit.img
    serve 10871 nbdkit --exit-with-parent -f -i 127.0.0.1 -p 10871 --tls=require --tls-certificates /tls/nbdkit \
        --filter=multi-conn file /tmp/tls-kit.img multi-conn-mode=plugin
    before=$(tls_socks); dec0=$(tls_stat TlsDecryptError)
    out=$($NODE attach nbds://127.0.0.1:10871/ --backend-id vol-tk --connections 2 --tls-dir /tls/node 2>/tmp/err)
    dev=$(echo "$out" | field device); conns=$(echo "$out" | field connections)
    if [ -n "$dev" ]; then
        socks=$(tls_socks)
        tls_data tls-ktls-nbdkit "$dev" /tmp/tls-kit.img
        dec=$(($(tls_stat TlsDecryptError) - dec0))
        $NODE detach --backend-id vol-tk >/dev/null 2>&1
    fi
    kill $p; wait $p 2>/dev/null
    detail="dev=$dev connections=$conns kernel_tls_sockets(tx rx)=$before->$socks decrypt_errors=$dec data=$data_ok"
    if [ -n "$dev" ] && [ "$socks" = "$(( ${before% *} + conns )) $(( ${before#* } + conns ))" ] && [ "$dec" = 0 ] &&
        [ "$data_ok" = yes ]; then
        result tls-ktls-nbdkit PASS "$detail"
    else
        result tls-ktls-nbdkit FAIL "$detail $(tail -1 /tmp/err | cut -c1-200) $(tail -2 /tmp/serve.log | tr '\n' ' ')"
    fi
}

# --- What crosses the wire: tcpdump on the VM's loopback while a canary
# (a known text, repeated) is written through two devices, one attached over
# TLS and one in plaintext. The plaintext capture must show the canary (so
# the capture does see payloads); the TLS capture must not, nor the export
# name (the volume's secret token), though the same bytes reached the file.
wire_attach() { # name port uri tls_flag...: attach, write the canary, read it back; sets $wire_ok
    rm -f "/tmp/$1.pcap"
    tcpdump -Z root -i lo -s 0 -U -w "/tmp/$1.pcap" "tcp port $2" 2>/tmp/tcpdump.log &
    td=$!
    i=0
    while ! grep -q 'listening on' /tmp/tcpdump.log && [ $i -lt 100 ]; do usleep 100000; i=$((i + 1)); done
    out=$($NODE attach "$3" --backend-id "$1" --connections 2 ${4:+--tls-dir "$4"} 2>/tmp/err)
    dev=$(echo "$out" | field device)
    wire_ok=no
    if [ -n "$dev" ]; then
        dd if=/tmp/canary of="$dev" bs=1M oflag=direct conv=fsync 2>/dev/null
        dd if="$dev" of=/tmp/canary-back bs=1M count=1 iflag=direct 2>/dev/null
        cmp -s /tmp/canary /tmp/canary-back && wire_ok=yes
        $NODE detach --backend-id "$1" >/dev/null 2>&1
    else
        echo "vm: $1: attach: $(tail -1 /tmp/err | cut -c1-200)"
    fi
    usleep 300000
    kill -INT $td; wait $td 2>/dev/null
}

scenario_tls_wire() {
    if ! command -v tcpdump >/dev/null; then result tls-wire FAIL "no tcpdump in the VM"; return; fi
    yes NBD-CSI-CANARY-3f9c1e | head -c 1048576 > /tmp/canary
    truncate -s 64M /tmp/wire-tls.img /tmp/wire-plain.img
    serve 10872 $CTRL serve-file /tmp/wire-tls.img --listen 127.0.0.1:10872 --export-name vol-secret-token-tls \
        --tls required --tls-dir /tls/server
    tp=$p
    serve 10873 $CTRL serve-file /tmp/wire-plain.img --listen 127.0.0.1:10873 --export-name vol-secret-token-plain
    wire_attach wire-plain 10873 nbd://127.0.0.1:10873/vol-secret-token-plain
    plain_ok=$wire_ok
    wire_attach wire-tls 10872 nbds://127.0.0.1:10872/vol-secret-token-tls /tls/node
    tls_ok=$wire_ok
    kill $p $tp; wait $p $tp 2>/dev/null
    plain_hits=$(grep -ac NBD-CSI-CANARY /tmp/wire-plain.pcap)
    tls_hits=$(grep -ac NBD-CSI-CANARY /tmp/wire-tls.pcap)
    plain_name=$(grep -ac vol-secret-token /tmp/wire-plain.pcap)
    tls_name=$(grep -ac vol-secret-token /tmp/wire-tls.pcap)
    tls_bytes=$(wc -c < /tmp/wire-tls.pcap)
    in_file=no
    dd if=/tmp/wire-tls.img of=/tmp/canary-back bs=1M count=1 2>/dev/null
    cmp -s /tmp/canary /tmp/canary-back && in_file=yes
    detail="plaintext: canary_lines=$plain_hits export_name=$plain_name data=$plain_ok; tls: canary_lines=$tls_hits export_name=$tls_name captured_bytes=$tls_bytes data=$tls_ok in_file=$in_file"
    if [ "$plain_hits" -gt 0 ] && [ "$plain_name" -gt 0 ] && [ "$plain_ok" = yes ] && [ "$tls_hits" = 0 ] &&
        [ "$tls_name" = 0 ] && [ "$tls_bytes" -gt 1048576 ] && [ "$tls_ok" = yes ] && [ "$in_file" = yes ]; then
        result tls-wire PASS "$detail"
    else
        result tls-wire FAIL "$detail $(tail -1 /tmp/tcpdump.log)"
    fi
}

for s in $(echo "${SCENARIOS:-multi_conn flush ext4 ioctl ioctl_exhausted heal tls tls_wire expand expand_xfs expand_block metrics shared_block dead_server fio_controller_kill fio_plugin_kill fio_plugin_kill_tls fresh_container reconcile heal_after_timeout sanity_mount sanity_block}" | tr , " "); do
    t0=$(cut -d. -f1 /proc/uptime)
    "scenario_$s"
    echo "vm: scenario $s took $(($(cut -d. -f1 /proc/uptime) - t0)) s"
done
echo "SUMMARY passed=$PASSED failed=$FAILED"
