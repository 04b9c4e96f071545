#!/usr/bin/env bash
# The project's test command (README "Test"). Installs what it needs when
# missing, then runs formatting, lints, unit, session and interop tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real NBD peers the interop tests drive, from Debian packages.
apt_packages=(qemu-utils nbdkit libnbd-bin python3-libnbd nbd-server fio)
missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
for component in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
done

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
mkdir -p target
cargo test --workspace --locked 2>&1 | tee target/test-output.txt
# One closing line for CI, summed over every test binary.
awk '/^test result:/ { p += $4; f += $6; s += $8 } END { printf "%d passed, %d failed, %d skipped\n", p, f, s; exit (f > 0) }' target/test-output.txt
