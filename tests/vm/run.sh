#!/usr/bin/env bash
# Real-kernel test bed: boots a Debian kernel that has nbd.ko under qemu
# (software emulation, no network) and runs tests/vm/scenarios.sh inside.
# Prints one line per scenario and a summary; exits non-zero on any failure
# or timeout. Downloads are cached under $NBD_CSI_VM_CACHE (default
# ~/.cache/nbd-csi/vm-v1); only the initramfs is rebuilt on every run.
# NBD_CSI_VM_SCENARIOS=heal,fresh_container runs only those scenarios (the
# names after scenario_ in scenarios.sh), in that order.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
cache=${NBD_CSI_VM_CACHE:-$HOME/.cache/nbd-csi/vm-v1}
timeout_s=${NBD_CSI_VM_TIMEOUT:-900}
mkdir -p "$cache"
start=$(date +%s)

# Host tools. Both qemu packages come from the same suite (the candidate of
# qemu-system-x86), or installing one would replace the other's version.
need=()
for pkg in qemu-system-x86 qemu-utils busybox-static cpio nbdkit e2fsprogs xfsprogs fio openssl tcpdump; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    qemu_version=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    apt-get install -y -qq --no-install-recommends \
        "qemu-system-x86=$qemu_version" "qemu-utils=$qemu_version" busybox-static cpio nbdkit e2fsprogs xfsprogs fio openssl tcpdump
fi

# The kernel: vmlinuz, its package (kept) and the modules listed here.
# Kernel TLS (the tls scenario): tls.ko has no dependencies of its own but
# needs the AEADs of the ciphers rustls negotiates, loaded before it is
# used: AES-GCM (gcm, ctr, ghash-generic and its gf128mul; aes and aead
# are built in) and ChaCha20-Poly1305 (its generic parts and their libs).
modules="lib/crc16.ko fs/mbcache.ko fs/jbd2/jbd2.ko crypto/crc32c_generic.ko fs/ext4/ext4.ko lib/libcrc32c.ko fs/xfs/xfs.ko drivers/block/nbd.ko"
modules="$modules crypto/gf128mul.ko crypto/ghash-generic.ko crypto/ctr.ko crypto/gcm.ko"
modules="$modules lib/crypto/libchacha.ko lib/crypto/libpoly1305.ko crypto/chacha_generic.ko crypto/poly1305_generic.ko"
modules="$modules crypto/chacha20poly1305.ko net/tls/tls.ko"
. tests/vm/kernel.sh
ensure_vm_kernel "$cache" "$modules"

# csi-sanity, as tests/csi-sanity.sh installs it (a Go binary; only libc).
CSI_TEST_VERSION=v5.6.0
sanity_dir="${NBD_CSI_TOOLS:-$HOME/.cache/nbd-csi/tools-v1}/csi-test-$CSI_TEST_VERSION"
if [ ! -x "$sanity_dir/bin/csi-sanity" ]; then
    mkdir -p "$sanity_dir/bin"
    GOBIN="$sanity_dir/bin" go install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$CSI_TEST_VERSION"
fi

# The project's release binaries and the test tools (tests/tools).
. "$repo/tests/cargo.sh"
release_build

# The initramfs: busybox, our binaries, the tools the scenarios use, and
# every shared library they need.
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,run,mnt,lib,lib64,usr/bin,usr/sbin,tests}
# tcpdump looks its user up (-Z root) before it captures.
echo 'root:x:0:0:root:/:/bin/sh' > "$root/etc/passwd"
echo 'root:x:0:' > "$root/etc/group"
cp /bin/busybox "$root/bin/busybox"
for applet in sh mount umount mkdir; do ln -sf busybox "$root/bin/$applet"; done
tools=(
    "$repo/target/release/nbd-csi-node" "$repo/target/release/nbd-csi-controller"
    "$repo/target/release/flag-server" "$repo/target/release/csi-node-client"
    "$sanity_dir/bin/csi-sanity"
    "$(command -v mke2fs)" "$(command -v e2fsck)" "$(command -v resize2fs)" "$(command -v nbdkit)" "$(command -v fio)"
    "$(command -v mkfs.xfs)" "$(command -v xfs_growfs)" "$(command -v xfs_repair)" "$(command -v tcpdump)"
)
nbdkit_lib=/usr/lib/x86_64-linux-gnu/nbdkit
extra=("$nbdkit_lib/plugins/nbdkit-memory-plugin.so" "$nbdkit_lib/plugins/nbdkit-file-plugin.so"
    "$nbdkit_lib/filters/nbdkit-multi-conn-filter.so" "$nbdkit_lib/filters/nbdkit-log-filter.so")
for f in "${tools[@]}"; do cp "$f" "$root/usr/bin/"; done
for f in "${extra[@]}"; do mkdir -p "$root$(dirname "$f")"; cp "$f" "$root$f"; done
ln -sf mke2fs "$root/usr/bin/mkfs.ext4"
for f in "${tools[@]}" "${extra[@]}"; do
    ldd "$f" 2>/dev/null | grep -oE '/[^ ]+' || true
done | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
mkdir -p "$root/modules"
for m in $modules; do cp "$cache/modules/$(basename "$m")" "$root/modules/"; done
echo "$modules" | tr ' ' '\n' | xargs -n1 basename > "$root/modules/order"
cp "$repo/tests/vm/init.sh" "$root/init"
# Certificates for the tls scenario, made here (openssl) and valid 2 days:
# a CA; the server's for 127.0.0.1 in serve-file's layout (/tls/server) and
# nbdkit's (/tls/nbdkit); the node's, named vm-node, in --tls-dir's layout.
tls=$root/tls
mkdir -p "$tls/server" "$tls/nbdkit" "$tls/node"
ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
openssl req -x509 "${ec[@]}" -keyout "$tls/ca.key" -out "$tls/ca.crt" -days 2 -subj /CN=nbd-csi-vm-ca \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
leaf() { # dir subjectAltName extendedKeyUsage
    openssl req "${ec[@]}" -keyout "$1/tls.key" -out "$1/tls.csr" -subj "/CN=${2#*:}" 2>/dev/null
    printf 'subjectAltName=%s\nextendedKeyUsage=%s\nbasicConstraints=CA:FALSE\n' "$2" "$3" > "$1/ext"
    openssl x509 -req -in "$1/tls.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" -CAcreateserial -days 2 \
        -extfile "$1/ext" -out "$1/tls.crt" 2>/dev/null
    cp "$tls/ca.crt" "$1/ca.crt"
    rm "$1/tls.csr" "$1/ext"
}
leaf "$tls/server" IP:127.0.0.1 serverAuth
leaf "$tls/node" DNS:vm-node clientAuth
cp "$tls/ca.crt" "$tls/nbdkit/ca-cert.pem"
cp "$tls/server/tls.crt" "$tls/nbdkit/server-cert.pem"
cp "$tls/server/tls.key" "$tls/nbdkit/server-key.pem"
rm -f "$tls/ca.key" "$tls/ca.srl"
cp "$repo/tests/vm/scenarios.sh" "$root/tests/scenarios.sh"
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$cache/initrd.gz"
echo "vm: initramfs $(du -h "$cache/initrd.gz" | cut -f1), prepared in $(($(date +%s) - start)) s"

# mitigations=off: the guest is a throwaway test machine under emulation,
# where the kernel's Spectre mitigations (retpolines on every indirect call)
# cost emulated instructions and protect nothing.
log=$repo/target/vm-console.log
mkdir -p "$repo/target"
boot=$(date +%s)
set +e
timeout --foreground -k 10 "$timeout_s" qemu-system-x86_64 -accel tcg -m 1024 -smp 2,maxcpus=4 \
    -kernel "$cache/vmlinuz" -initrd "$cache/initrd.gz" \
    -append "console=ttyS0 panic=-1 quiet mitigations=off ${NBD_CSI_VM_SCENARIOS:+SCENARIOS=$NBD_CSI_VM_SCENARIOS} ${NBD_CSI_VM_APPEND:-}" \
    -nographic -no-reboot -net none </dev/null 2>&1 | tr -d '\r' | tee "$log" | grep --line-buffered -aoE '(RESULT|SUMMARY|BOOTED|vm:) .*'
status=${PIPESTATUS[0]}
set -e
echo "vm: ran $(($(date +%s) - boot)) s (qemu exit $status); console log in $log"
if [ "$status" = 124 ]; then
    echo "vm: TIMEOUT after ${timeout_s}s" >&2
    exit 1
fi
summary=$(grep -aoE 'SUMMARY .*' "$log" | tail -1)
[ -n "$summary" ] || { echo "vm: no SUMMARY line (crash?)" >&2; exit 1; }
passed=$(echo "$summary" | sed -n 's/.*passed=\([0-9]*\).*/\1/p')
failed=$(echo "$summary" | sed -n 's/.*failed=\([0-9]*\).*/\1/p')
echo "vm: ${passed:-0} passed, ${failed:-1} failed"
[ "${failed:-1}" -eq 0 ]
