#!/usr/bin/env bash
# The container images the cluster suite (tests/cluster) runs, built here
# without a registry, and one archive per image that
# `ctr -n k8s.io images import FILE` loads inside the VM:
#   localhost/nbd-csi:<version>         the repository's Dockerfile, binaries
#                                        from the host's target/release
#   localhost/csi-provisioner, csi-attacher, csi-resizer, csi-snapshotter,
#   snapshot-controller                 the pinned sidecars (tests/k8s/tools.sh)
#   localhost/livenessprobe, csi-node-driver-registrar
#                                        stand-ins (images/standins: the module
#                                        proxy does not serve the upstream ones)
#   localhost/pause:3.10                containerd's sandbox image
#   localhost/busybox:local             the test pods' workload image
# then checks them: our binaries print the workspace version, the node
# image's tools run, every sidecar starts, the registrar stand-in registers
# the real node plugin, and Debian's containerd imports every archive under
# its name.
#
# Usage (as root): tests/cluster/images.sh OUTDIR
# OUTDIR gets NAME.tar per image and images.txt ("IMAGE FILE SIZE_BYTES").
#
# Slow pieces are cached under $NBD_CSI_CLUSTER_CACHE/images (default
# ~/.cache/nbd-csi/cluster-v1/images), keyed by content hashes: the buildah
# storage, the runtime base (mmdebstrap), busybox's package, and one archive
# per image ID. A warm run rebuilds what changed: our binaries, usually.
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "$0: run as root (buildah, mmdebstrap and chroot)" >&2; exit 2; }
started=$(date +%s)
mkdir -p "$1"
out=$(cd "$1" && pwd)
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
cache=${NBD_CSI_CLUSTER_CACHE:-$HOME/.cache/nbd-csi/cluster-v1}/images
mkdir -p "$cache"/{stamps,archives,ctx}
# One run at a time: they share the buildah storage.
exec 9>"$cache/lock"
flock 9

need=()
for tool in buildah:buildah mmdebstrap:mmdebstrap gcc:gcc objcopy:binutils curl:curl containerd:containerd; do
    command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
export PATH=/usr/local/go/bin:$PATH GOTOOLCHAIN=local
# shellcheck source=../k8s/tools.sh
. "$repo/tests/k8s/tools.sh"

# vfs and chroot: no overlay mounts, no user namespaces, no daemon.
export BUILDAH_ISOLATION=chroot
B=(buildah --root "$cache/storage" --runroot "$cache/run" --storage-driver vfs)
# Working containers are throwaway: the checks' and those buildah bud leaves
# for a stage without instructions (the Dockerfile's `prebuilt`).
"${B[@]}" rm --all >/dev/null

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
[ -n "$version" ] || { echo "no [workspace.package] version in Cargo.toml" >&2; exit 1; }

passed=0 failed=0
ok() { echo "ok: $*"; passed=$((passed + 1)); }
bad() { echo "FAILED: $*"; failed=$((failed + 1)); }

hash_of() { sha256sum "$@" | awk '{print $1}' | sha256sum | cut -c1-32; }
hash_text() { sha256sum | cut -c1-32; }
image_id() { "${B[@]}" inspect --type image --format '{{.FromImageID}}' "$1" 2>/dev/null; }
stamp_file() { echo "$cache/stamps/$(tr '/:' '__' <<<"$1")"; }

# up_to_date NAME KEY: the image was built from inputs with this KEY and is
# still in the storage.
up_to_date() {
    local id
    id=$(image_id "$1" || true)
    [ -n "$id" ] && [ "$(cat "$(stamp_file "$1")" 2>/dev/null)" = "$2 $id" ]
}

# build_image NAME KEY BUD_ARGS...: buildah bud unless up to date.
build_image() {
    local name=$1 key=$2 start
    shift 2
    if up_to_date "$name" "$key"; then
        echo "image $name: up to date"
        return 0
    fi
    start=$(date +%s)
    "${B[@]}" bud --quiet --pull=never --layers=false -t "$name" "$@" >/dev/null
    echo "$key $(image_id "$name")" >"$(stamp_file "$name")"
    echo "image $name: built in $(($(date +%s) - start))s"
}

# A FROM-scratch image holding one static binary as its entrypoint. The
# build context (a copy of the binary) lives only while buildah reads it.
single_binary_image() { # NAME BINARY DESCRIPTION
    local name=$1 bin=$2 desc=$3 base ctx containerfile key
    base=$(basename "$bin")
    containerfile="FROM scratch
LABEL org.opencontainers.image.description=\"$desc\"
COPY $base /$base
ENTRYPOINT [\"/$base\"]"
    key=$( { sha256sum <"$bin"; echo "$containerfile"; } | hash_text)
    ctx=$cache/ctx/$base
    if ! up_to_date "$name" "$key"; then
        rm -rf "$ctx" && mkdir -p "$ctx"
        cp "$bin" "$ctx/$base"
        echo "$containerfile" >"$ctx/Containerfile"
    fi
    build_image "$name" "$key" -f "$ctx/Containerfile" "$ctx"
    rm -rf "$ctx"
}

# --- the runtime base: Debian bookworm, only the programs the images run
# and the libraries they load. mmdebstrap extracts the packages (with their
# dependencies) into a staging tree; the base keeps each listed program,
# whatever it links (ld.so --list in the staging tree), and a few files
# they read. Nothing else: no apt, no dpkg, no python3 that xfsprogs pulls in.
runtime_packages="libc6 libgcc-s1 dash coreutils e2fsprogs xfsprogs util-linux mount kmod"
# The node plugin runs mkfs.*, resize2fs and xfs_growfs (node/src/fsutil.rs);
# the chart's init container runs sh, modprobe and uname; the checks below
# run truncate. fsck, blkid, blockdev, findmnt, mount and umount are there for
# whoever debugs a node.
runtime_programs="sh dash uname cat ls truncate
    mkfs.ext4 mkfs.ext3 mkfs.ext2 mke2fs resize2fs e2fsck fsck.ext4 fsck.ext3 fsck.ext2
    mkfs.xfs xfs_growfs xfs_repair fsck.xfs
    blkid blockdev fsck findmnt mount umount
    modprobe insmod rmmod lsmod kmod"
runtime_files="etc/mke2fs.conf lib/x86_64-linux-gnu/libgcc_s.so.1 lib/x86_64-linux-gnu/libm.so.6
    lib/x86_64-linux-gnu/libc.so.6 lib64/ld-linux-x86-64.so.2"

apt_sources() {
    local f
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
        [ -s "$f" ] && { echo "$f"; return; }
    done
    echo http://deb.debian.org/debian
}

# Copies REL (a path inside the staging tree) into the root, and what its
# symbolic links point to.
copy_from_staging() { # STAGING ROOT REL
    local staging=$1 root=$2 rel=$3 target
    [ -e "$root/$rel" ] || [ -L "$root/$rel" ] && return 0
    (cd "$staging" && cp -a --parents "$rel" "$root/")
    if [ -L "$staging/$rel" ]; then
        target=$(readlink "$staging/$rel")
        case $target in
            /*) target=${target#/} ;;
            *) target=$(dirname "$rel")/$target ;;
        esac
        copy_from_staging "$staging" "$root" "$(realpath -ms --relative-to=/ "/$target")"
    fi
}

make_runtime_base() { # STAGING ROOT TARBALL
    local staging=$1 root=$2 tarball=$3 prog rel lib found
    rm -rf "$staging" "$root"
    # shellcheck disable=SC2046
    mmdebstrap --quiet --variant=extract --include="$(tr ' ' ',' <<<"$runtime_packages")" \
        bookworm "$staging" "$(apt_sources)"
    mkdir -p "$root"
    for prog in $runtime_programs; do
        found=
        for dir in usr/local/sbin usr/local/bin usr/sbin usr/bin sbin bin; do
            if [ -e "$staging/$dir/$prog" ]; then
                copy_from_staging "$staging" "$root" "$dir/$prog"
                found=1
                break
            fi
        done
        [ -n "$found" ] || { echo "runtime base: no $prog in $runtime_packages" >&2; return 1; }
    done
    for rel in $runtime_files; do copy_from_staging "$staging" "$root" "$rel"; done
    # Every library the copied programs load, from the staging tree's loader.
    while read -r rel; do
        if [ "$(head -c4 "$staging/$rel" | od -An -c | tr -d ' ')" = '177ELF' ]; then
            chroot "$staging" /lib64/ld-linux-x86-64.so.2 --list "/$rel" 2>/dev/null |
                sed -n 's#.*=> \(/[^ ]*\) .*#\1#p; s#^\s*\(/[^ ]*\) (0x.*#\1#p'
        fi
    done < <(cd "$root" && find . -type f -printf '%P\n') | sort -u | while read -r lib; do
        copy_from_staging "$staging" "$root" "${lib#/}"
    done
    # The packages' licences travel with their programs.
    (cd "$staging" && find usr/share/doc -name copyright -print0 | xargs -0 cp -a --parents -t "$root/")
    cp -a "$staging/etc/modprobe.d" "$root/etc/" 2>/dev/null || true
    mkdir -p "$root"/{dev,proc,sys,run,root,tmp,var/tmp}
    chmod 1777 "$root/tmp" "$root/var/tmp"
    echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
    echo 'root:x:0:' >"$root/etc/group"
    ln -sfn ../proc/self/mounts "$root/etc/mtab"
    tar -C "$root" --numeric-owner -cf "$tarball" .
    rm -rf "$staging"
}

base_name=localhost/nbd-csi-runtime-base:bookworm
base_dir=$cache/runtime-base
base_key=$( { declare -f make_runtime_base copy_from_staging; echo "$runtime_packages $runtime_programs $runtime_files"; cat "$(apt_sources)" 2>/dev/null; } | hash_text)
if [ "$(cat "$base_dir/key" 2>/dev/null)" != "$base_key" ] || [ ! -f "$base_dir/rootfs.tar" ]; then
    start=$(date +%s)
    mkdir -p "$base_dir" && rm -f "$base_dir/key"
    make_runtime_base "$base_dir/staging" "$base_dir/root" "$base_dir/rootfs.tar"
    echo "$base_key" >"$base_dir/key"
    echo "runtime base: mmdebstrap and pruning in $(($(date +%s) - start))s ($(du -sm "$base_dir/root" | cut -f1) MB)"
fi
cat >"$base_dir/Containerfile" <<'EOF'
FROM scratch
ADD rootfs.tar /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
EOF
build_image "$base_name" "$base_key" -f "$base_dir/Containerfile" "$base_dir"

# --- localhost/nbd-csi:VERSION from the Dockerfile, binaries from the host.
echo "cargo build --release (nbd-csi-controller, nbd-csi-node; the VM suite's build when it ran)"
. "$repo/tests/cargo.sh"
release_build
release=${CARGO_TARGET_DIR:-$repo/target}/release
bin_ctx=$cache/ctx/binaries
rm -rf "$bin_ctx" && mkdir -p "$bin_ctx/out"
# As the Dockerfile's builder stage: without the line tables.
for b in nbd-csi-controller nbd-csi-node; do objcopy --strip-debug "$release/$b" "$bin_ctx/out/$b"; done
printf 'FROM scratch\nCOPY out/ /out/\n' >"$bin_ctx/Containerfile"
build_image "localhost/nbd-csi-binaries:$version" "$(hash_of "$bin_ctx"/out/* "$bin_ctx/Containerfile")" \
    -f "$bin_ctx/Containerfile" "$bin_ctx"
rm -rf "$bin_ctx"
build_image "localhost/nbd-csi:$version" \
    "$( { cat Dockerfile; image_id "localhost/nbd-csi-binaries:$version"; image_id "$base_name"; echo "$version"; } | hash_text)" \
    --target prebuilt-image --build-arg "VERSION=$version" \
    --build-arg "BINARIES_FROM=localhost/nbd-csi-binaries:$version" --build-arg "RUNTIME_IMAGE=$base_name" .

# --- the pinned sidecars, static binaries from tests/k8s/tools.sh.
ensure_cluster_sidecars || bad "ensure_cluster_sidecars failed (tests/k8s/tools.sh)"
sidecars="csi-provisioner:$EXTERNAL_PROVISIONER_VERSION csi-attacher:$EXTERNAL_ATTACHER_VERSION
    csi-resizer:$EXTERNAL_RESIZER_VERSION csi-snapshotter:$EXTERNAL_SNAPSHOTTER_VERSION
    snapshot-controller:$EXTERNAL_SNAPSHOTTER_VERSION"
for s in $sidecars; do
    if [ -x "$TOOLS_BIN/${s%%:*}" ]; then
        single_binary_image "localhost/$s" "$TOOLS_BIN/${s%%:*}" "kubernetes-csi ${s%%:*} ${s#*:}, built from its module by nbd-csi's tests"
    else
        bad "no $TOOLS_BIN/${s%%:*}: ensure_cluster_sidecars did not build it"
    fi
done

# --- stand-ins for livenessprobe and node-driver-registrar, at the chart's
# pinned tags so that only the repository is overridden. They are NOT the
# upstream programs: the module proxy refuses those modules (403) and GitHub
# is unreachable here; see tests/cluster/images/standins.
standins_bin=$cache/standins-bin
(cd tests/cluster/images/standins &&
    CGO_ENABLED=0 nice -n 10 go build -trimpath -ldflags='-s -w' -o "$standins_bin/" ./cmd/...)
standin_desc="STAND-IN written for nbd-csi's cluster tests (tests/cluster/images/standins), not the upstream kubernetes-csi"
single_binary_image localhost/livenessprobe:v2.19.0 "$standins_bin/livenessprobe" "$standin_desc livenessprobe"
single_binary_image localhost/csi-node-driver-registrar:v2.17.0 "$standins_bin/csi-node-driver-registrar" \
    "$standin_desc node-driver-registrar"

# --- the sandbox image.
pause_dir=$cache/pause
mkdir -p "$pause_dir"
pause_key=$(hash_of tests/cluster/images/pause/pause.c)
if [ "$(cat "$pause_dir/key" 2>/dev/null)" != "$pause_key" ] || [ ! -x "$pause_dir/pause" ]; then
    gcc -Os -static -Wall -Wextra -Werror -o "$pause_dir/pause" tests/cluster/images/pause/pause.c
    strip "$pause_dir/pause"
    echo "$pause_key" >"$pause_dir/key"
fi
single_binary_image localhost/pause:3.10 "$pause_dir/pause" "pod sandbox placeholder for nbd-csi's cluster tests (sleeps until SIGTERM, reaps children)"

# --- the workload image: Debian's static busybox with every applet linked.
bb_dir=$cache/busybox
bb_candidate() { apt-cache policy busybox-static | awk '/Candidate:/ && $2 != "(none)" {print $2}'; }
bb_version=$(bb_candidate)
[ -n "$bb_version" ] || { apt-get update -qq && bb_version=$(bb_candidate); }
[ -n "$bb_version" ] || { echo "apt knows no busybox-static" >&2; exit 1; }
if [ "$(cat "$bb_dir/version" 2>/dev/null)" != "$bb_version" ]; then
    rm -rf "$bb_dir" && mkdir -p "$bb_dir/deb"
    (cd "$bb_dir/deb" && apt-get download busybox-static 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
    dpkg-deb -x "$bb_dir"/deb/busybox-static_*.deb "$bb_dir/x"
    mkdir -p "$bb_dir/ctx/root/bin" "$bb_dir/ctx/root/tmp" "$bb_dir/ctx/root/usr/share/doc/busybox-static"
    chmod 1777 "$bb_dir/ctx/root/tmp"
    cp "$bb_dir/x/bin/busybox" "$bb_dir/ctx/root/bin/busybox"
    cp "$bb_dir/x/usr/share/doc/busybox-static/copyright" "$bb_dir/ctx/root/usr/share/doc/busybox-static/"
    for applet in $("$bb_dir/ctx/root/bin/busybox" --list); do
        [ "$applet" = busybox ] || ln -s busybox "$bb_dir/ctx/root/bin/$applet"
    done
    printf 'FROM scratch\nCOPY root/ /\nENV PATH=/bin\nCMD ["sh"]\n' >"$bb_dir/ctx/Containerfile"
    rm -rf "$bb_dir/x"
    echo "$bb_version" >"$bb_dir/version"
fi
build_image localhost/busybox:local "$(echo "$bb_version" | cat - "$bb_dir/ctx/Containerfile" | hash_text)" \
    -f "$bb_dir/ctx/Containerfile" "$bb_dir/ctx"

images="localhost/nbd-csi:$version"
for s in $sidecars; do images="$images localhost/$s"; done
images="$images localhost/livenessprobe:v2.19.0 localhost/csi-node-driver-registrar:v2.17.0 localhost/pause:3.10 localhost/busybox:local"

# --- archives: oci-archive (layers gzip-compressed; a compressed archive
# is refused by ctr 1.6) keeps the name through `ctr images import`.
# Cached per image ID; a changed image gets a new one, the old is removed.
: >"$out/images.txt.tmp"
keep=()
for image in $images; do
    id=$(image_id "$image") || { bad "image $image was not built"; continue; }
    ok "image $image exists ($(cut -c1-12 <<<"$id"))"
    archive=$cache/archives/$id.tar
    keep+=("$archive")
    if [ ! -f "$archive" ]; then
        "${B[@]}" push --quiet "$image" "oci-archive:$archive.tmp:$image" >/dev/null
        mv "$archive.tmp" "$archive"
    fi
    file=$(basename "${image%:*}").tar
    ln -f "$archive" "$out/$file" 2>/dev/null || cp -f "$archive" "$out/$file"
    echo "$image $file $(stat -c %s "$out/$file")" >>"$out/images.txt.tmp"
done
mv "$out/images.txt.tmp" "$out/images.txt"
for archive in "$cache"/archives/*.tar; do
    [[ " ${keep[*]} " == *" $archive "* ]] || rm -f "$archive"
done
# Untagged images left by rebuilds.
"${B[@]}" rm --all >/dev/null
"${B[@]}" rmi --prune >/dev/null 2>&1 || true

# --- checks
# in_image IMAGE CMD...: runs CMD in a working container of IMAGE, prints
# its output (stdout and stderr). buildah 1.28's chroot isolation now and
# then loses the whole output of a short-lived command (1 run in ~30 here),
# so an empty output is retried: every command checked here prints something.
in_image() {
    local image=$1 c rc out attempt
    shift
    c=$("${B[@]}" from --pull=never --quiet "$image")
    for attempt in 1 2 3; do
        rc=0
        out=$("${B[@]}" run "$c" -- "$@" 2>&1) || rc=$?
        [ -z "$out" ] || break
    done
    "${B[@]}" rm "$c" >/dev/null
    printf '%s\n' "$out"
    return "$rc"
}

nbd=localhost/nbd-csi:$version
for b in nbd-csi-controller nbd-csi-node; do
    got=$(in_image "$nbd" "$b" --version 2>&1 || true)
    if [ "$got" = "$b $version" ]; then ok "$nbd: $b --version prints $version"; else bad "$nbd: $b --version printed: $got"; fi
done
# Every tool resolves on PATH and loads its libraries.
# shellcheck disable=SC2016
if got=$(in_image "$nbd" sh -c '
    for t in mkfs.ext4 mkfs.xfs resize2fs xfs_growfs e2fsck fsck.ext4 xfs_repair blkid blockdev fsck findmnt mount umount modprobe uname; do
        command -v "$t" >/dev/null || { echo "no $t"; exit 1; }
    done
    mkfs.xfs -V && xfs_growfs -V && xfs_repair -V && blkid -V && blockdev --version && fsck --version &&
    findmnt --version && mount --version && umount --version && modprobe --version && uname -r' 2>&1); then
    ok "$nbd has every tool: $(tr '\n' ' ' <<<"$got" | cut -c1-160)…"
else
    bad "$nbd misses a tool: $got"
fi
# The node plugin's own calls on a file: mkfs, blkid, offline grow, fsck.
if got=$(in_image "$nbd" sh -c '
    set -e; f=/tmp/fs.img
    truncate -s 64M $f; mkfs.ext4 -q -F $f; blkid -o value -s TYPE $f
    truncate -s 128M $f; resize2fs $f >/dev/null 2>&1 && echo resized; e2fsck -fn $f >/dev/null && echo e2fsck-clean
    truncate -s 0 $f; truncate -s 512M $f; mkfs.xfs -q -f $f; blkid -o value -s TYPE $f; xfs_repair -n $f >/dev/null 2>&1 && echo xfs_repair-clean' 2>&1) && [ "$(grep -c -x -e ext4 -e resized -e xfs -e e2fsck-clean -e xfs_repair-clean <<<"$got")" = 5 ]; then
    ok "$nbd: mkfs.ext4, resize2fs, e2fsck, mkfs.xfs, xfs_repair and blkid work on a file"
else
    bad "$nbd: filesystem tools on a file: $got"
fi

for s in $sidecars; do
    name=${s%%:*}
    if got=$(in_image "localhost/$s" "/$name" --version 2>&1) && grep -q -- "${s#*:}" <<<"$got"; then
        ok "localhost/$s: /$name --version: $(head -1 <<<"$got")"
    else
        bad "localhost/$s: /$name --version: $got"
    fi
done
for s in livenessprobe:v2.19.0 csi-node-driver-registrar:v2.17.0; do
    if got=$(in_image "localhost/$s" "/${s%%:*}" --version 2>&1) && grep -q stand-in <<<"$got"; then
        ok "localhost/$s: $got"
    else
        bad "localhost/$s: --version: $got"
    fi
done
if got=$(in_image localhost/pause:3.10 /pause -v 2>&1); then ok "localhost/pause:3.10 runs: $got"; else bad "localhost/pause:3.10: $got"; fi
if got=$(in_image localhost/busybox:local sh -c 'echo data | md5sum && command -v dd sync sha256sum df stat head blockdev mount' 2>&1) &&
    grep -q '^6137cde4893c59f76f005a8123d8e8e6 ' <<<"$got"; then
    ok "localhost/busybox:local: sh, md5sum, dd, sync, sha256sum, df, stat, head, blockdev, mount"
else
    bad "localhost/busybox:local: $got"
fi

# pause as PID 1 of its own PID namespace, as in a pod sandbox: an orphan
# handed to it is reaped (no zombie left), and SIGTERM ends it with 0.
unshare --pid --fork --mount-proc "$pause_dir/pause" &
unshare_pid=$!
pause_pid=
for _ in $(seq 50); do pause_pid=$(pgrep -P "$unshare_pid" || true); [ -n "$pause_pid" ] && break; sleep 0.1; done
if [ -n "$pause_pid" ]; then
    # The shell exits at once: its sleep becomes pause's child, then exits too.
    nsenter -t "$pause_pid" -p -m sh -c 'sleep 0.3 & exit'
    children=x
    for _ in $(seq 50); do
        children=$(ps -o stat=,comm= --ppid "$pause_pid" || true)
        [ -z "$children" ] && break
        sleep 0.1
    done
    if [ -z "$children" ]; then ok "pause as PID 1 reaps an orphan"; else bad "pause as PID 1 left: $children"; fi
    kill -TERM "$pause_pid"
fi
rc=0
wait "$unshare_pid" || rc=$?
if [ -n "$pause_pid" ] && [ "$rc" = 0 ]; then ok "pause as PID 1 exits 0 on SIGTERM"; else bad "pause as PID 1: exit $rc"; fi

# The stand-ins against the real node plugin (the same binaries as in their
# images): the registrar names the driver to a kubelet-like client and
# exits non-zero on a failed registration; the livenessprobe answers 200
# while the plugin answers Probe, 500 once it is gone.
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/reg"
"$release/nbd-csi-node" serve --endpoint "unix://$work/csi.sock" --node-id images-check-node \
    --state-dir "$work/state" >"$work/node.log" 2>&1 &
node_pid=$!
pids+=("$node_pid")
kubelet_path=/var/lib/kubelet/plugins/nbd.csi.dev/csi.sock
"$standins_bin/csi-node-driver-registrar" --csi-address=/nonexistent-first >/dev/null 2>&1 &
early=$!
# (--kubelet-registration-path is required: that start must fail at once.)
rc=0
wait "$early" || rc=$?
if [ "$rc" != 0 ]; then ok "registrar stand-in refuses to start without --kubelet-registration-path"; else bad "registrar stand-in started without --kubelet-registration-path"; fi
"$standins_bin/csi-node-driver-registrar" --csi-address=$work/csi.sock --kubelet-registration-path=$kubelet_path \
    --plugin-registration-path="$work/reg" --http-endpoint=127.0.0.1:29819 --v=2 >"$work/registrar.log" 2>&1 &
reg_pid=$!
pids+=("$reg_pid")
"$standins_bin/livenessprobe" --csi-address=$work/csi.sock --http-endpoint=127.0.0.1:29818 --probe-timeout=3s \
    >"$work/liveness.log" 2>&1 &
pids+=($!)
want='{"endpoint":"'$kubelet_path'","name":"nbd.csi.dev","supported_versions":["1.0.0"],"type":"CSIPlugin"}'
if got=$("$standins_bin/registration-probe" --socket "$work/reg/nbd.csi.dev-reg.sock" --wait 20s --notify 2>&1) &&
    [ "$got" = "$want" ]; then
    ok "registrar stand-in on the real node plugin: GetInfo $got, registration acknowledged"
else
    bad "registrar stand-in GetInfo: $got (want $want)"
    tail -5 "$work/registrar.log" "$work/node.log"
fi
code() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$1" || true; }
if [ "$(code http://127.0.0.1:29819/healthz)" = 200 ]; then ok "registrar stand-in /healthz 200"; else bad "registrar stand-in /healthz: $(code http://127.0.0.1:29819/healthz)"; fi
for _ in $(seq 50); do [ "$(code http://127.0.0.1:29818/healthz)" = 000 ] || break; sleep 0.1; done
if [ "$(code http://127.0.0.1:29818/healthz)" = 200 ]; then ok "livenessprobe stand-in /healthz 200 while the node plugin runs"; else bad "livenessprobe stand-in /healthz: $(code http://127.0.0.1:29818/healthz)"; fi
kill "$node_pid"
wait "$node_pid" 2>/dev/null || true
if [ "$(code http://127.0.0.1:29818/healthz)" = 500 ]; then ok "livenessprobe stand-in /healthz 500 once the node plugin is gone"; else bad "livenessprobe stand-in /healthz after the plugin stopped: $(code http://127.0.0.1:29818/healthz)"; fi
"$standins_bin/registration-probe" --socket "$work/reg/nbd.csi.dev-reg.sock" --fail >/dev/null 2>&1 || true
rc=0
for _ in $(seq 50); do kill -0 "$reg_pid" 2>/dev/null || break; sleep 0.1; done
wait "$reg_pid" 2>/dev/null || rc=$?
if [ "$rc" = 1 ]; then ok "registrar stand-in exits 1 when the kubelet reports a failed registration"; else bad "registrar stand-in after a failed registration: exit $rc"; fi

# The archives as the VM loads them: Debian's containerd (the VM's) on a
# private socket imports each under its name.
mkdir -p "$work/containerd"
cat >"$work/containerd/config.toml" <<EOF
version = 2
root = "$work/containerd/root"
state = "$work/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/containerd/sock"
EOF
containerd --config "$work/containerd/config.toml" >"$work/containerd/log" 2>&1 &
pids+=($!)
ctr=(ctr --address "$work/containerd/sock" --namespace k8s.io)
for _ in $(seq 100); do "${ctr[@]}" version >/dev/null 2>&1 && break; sleep 0.1; done
while read -r image file _; do
    # native: no overlay mount needed on the host.
    # (The list is read whole: grep -q closing the pipe early fails it under pipefail.)
    if got=$("${ctr[@]}" images import --snapshotter native "$out/$file" 2>&1) &&
        grep -qx "$image" <<<"$("${ctr[@]}" images ls -q)"; then
        ok "ctr images import $file: $image"
    else
        bad "ctr images import $file did not give $image: $got"
    fi
done <"$out/images.txt"

# --- sizes
total=0
while read -r image file size; do
    total=$((total + size))
    mb=$("${B[@]}" images --format '{{.Size}}' "$image" 2>/dev/null | head -1)
    printf 'size: %-45s image %8s  archive %6.1f MB\n' "$image" "$mb" "$(awk -v b="$size" 'BEGIN {print b / 1048576}')"
done <"$out/images.txt"
printf 'size: all archives %.1f MB in %s\n' "$(awk -v b="$total" 'BEGIN {print b / 1048576}')" "$out"
echo "images: $passed passed, $failed failed ($(($(date +%s) - started))s)"
[ "$failed" -eq 0 ]
