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

CPUS=$(nproc)
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

scenario_multi_conn() {
    truncate -s 64M /tmp/mc.img
    $CTRL serve-file /tmp/mc.img --listen 127.0.0.1:10809 --export-name vol-mc 2>/tmp/serve.log &
    p=$!
    wait_port 10809 || result multi-conn-ours FAIL "serve-file did not start"
    attach_check multi-conn-ours-2 nbd://127.0.0.1:10809/vol-mc vol-mc 10809 2 2 2
    # blk-mq caps hardware queues at the CPU count; the sockets are all used.
    attach_check multi-conn-ours-4 nbd://127.0.0.1:10809/vol-mc vol-mc 10809 4 "$(min 4 "$CPUS")" 4
    kill $p; wait $p 2>/dev/null

    $CTRL serve-file /tmp/mc.img --listen 127.0.0.1:10810 --export-name vol-nomc --no-multi-conn 2>/tmp/serve.log &
    p=$!
    wait_port 10810
    attach_check single-conn-ours-no-multi-conn nbd://127.0.0.1:10810/vol-nomc vol-nomc 10810 4 1 1
    kill $p; wait $p 2>/dev/null

    nbdkit --exit-with-parent -f -i 127.0.0.1 -p 10812 --filter=multi-conn memory 64M multi-conn-mode=disable 2>/dev/null &
    p=$!
    wait_port 10812
    attach_check single-conn-nbdkit-multi-conn-disable nbd://127.0.0.1:10812/ kit-off 10812 4 1 1
    kill $p; wait $p 2>/dev/null

    nbdkit --exit-with-parent -f -i 127.0.0.1 -p 10813 --filter=multi-conn memory 64M multi-conn-mode=plugin 2>/dev/null &
    p=$!
    wait_port 10813
    attach_check multi-conn-nbdkit-plugin nbd://127.0.0.1:10813/ kit-on 10813 2 2 2
    kill $p; wait $p 2>/dev/null

    # HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_CACHE (bit 10), bit 8 clear.
    flag-server --listen 127.0.0.1:10811 --size 67108864 --flags 0x040d 2>/dev/null &
    p=$!
    wait_port 10811
    attach_check single-conn-send-cache-bit-10 nbd://127.0.0.1:10811/ flags-10 10811 4 1 1
    kill $p; wait $p 2>/dev/null
}

scenario_flush() {
    # Our server: after sync the bytes are in the backing file.
    truncate -s 64M /tmp/flush.img
    $CTRL serve-file /tmp/flush.img --listen 127.0.0.1:10820 --export-name vol-fl 2>/tmp/serve.log &
    p=$!
    wait_port 10820
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
    nbdkit --exit-with-parent -f -i 127.0.0.1 -p 10821 --filter=log memory 64M logfile=/tmp/kit.log 2>/dev/null &
    p=$!
    wait_port 10821
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
    $CTRL serve-file /tmp/fs.img --listen 127.0.0.1:10830 --export-name vol-fs 2>/tmp/serve.log &
    p=$!
    wait_port 10830
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
    $CTRL serve-file /tmp/io.img --listen 127.0.0.1:10840 --export-name vol-io 2>/tmp/serve.log &
    p=$!
    wait_port 10840
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
    $CTRL serve-file /tmp/heal.img --listen 127.0.0.1:10850 --export-name vol-h 2>/tmp/serve.log &
    p=$!
    wait_port 10850
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

for s in ${SCENARIOS:-multi_conn flush ext4 ioctl heal}; do
    t0=$(cut -d. -f1 /proc/uptime)
    "scenario_$s"
    echo "vm: scenario $s took $(($(cut -d. -f1 /proc/uptime) - t0)) s"
done
echo "SUMMARY passed=$PASSED failed=$FAILED"
