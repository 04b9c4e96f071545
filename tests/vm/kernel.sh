# shellcheck shell=bash
# The kernel both VM suites boot (tests/vm, tests/cluster): the newest
# linux-image-6.1.0-N-amd64 from apt. Sourced; ensure_vm_kernel CACHE MODULES
# leaves in CACHE: vmlinuz, kernel/linux-image-*.deb (kept, so a longer
# module list or the cluster's root file system needs no download) and
# modules/ with the listed .ko files (paths under kernel/, in load order).
ensure_vm_kernel() { # CACHE "MODULES"
    local cache=$1 modules=$2 missing=0 m n
    for m in $modules; do [ -f "$cache/modules/$(basename "$m")" ] || missing=1; done
    [ -f "$cache/vmlinuz" ] && [ "$missing" = 0 ] && return 0
    if ! ls "$cache"/kernel/linux-image-*.deb >/dev/null 2>&1; then
        n=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' |
            sed -E 's/^linux-image-6\.1\.0-([0-9]+)-amd64 .*/\1/' | sort -n | tail -1)
        [ -n "$n" ] || { echo "no linux-image-6.1.0-N-amd64 in apt" >&2; return 1; }
        rm -rf "$cache/kernel" && mkdir -p "$cache/kernel"
        (cd "$cache/kernel" && apt-get download "linux-image-6.1.0-$n-amd64" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
    fi
    rm -rf "$cache/kernel/x"
    dpkg-deb -x "$cache"/kernel/linux-image-*.deb "$cache/kernel/x"
    cp "$cache"/kernel/x/boot/vmlinuz-* "$cache/vmlinuz.tmp"
    rm -rf "$cache/modules.tmp" && mkdir -p "$cache/modules.tmp"
    for m in $modules; do cp "$cache"/kernel/x/lib/modules/*/kernel/"$m" "$cache/modules.tmp/"; done
    rm -rf "$cache/modules" && mv "$cache/modules.tmp" "$cache/modules" && mv "$cache/vmlinuz.tmp" "$cache/vmlinuz"
    rm -rf "$cache/kernel/x"
}
