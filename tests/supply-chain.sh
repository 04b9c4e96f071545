#!/usr/bin/env bash
# Supply-chain checks of the dependency graph with cargo-deny and deny.toml:
# licences, bans (duplicates, wildcards) and sources. cargo-deny is built
# once with `cargo install --locked` into the tools cache of tests/k8s/tools.sh.
#
# Advisories (RustSec) are NOT checked here: cargo-deny clones the advisory
# database from GitHub, which this environment cannot reach (only the package
# registries are); see deny.toml. The three checks below need only
# `cargo metadata` over the locked graph.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=tests/k8s/tools.sh
. tests/k8s/tools.sh

CARGO_DENY_VERSION=0.20.2

ensure_cargo_deny() {
    tools_have cargo-deny "$CARGO_DENY_VERSION" && return 0
    local start; start=$(date +%s)
    echo "building cargo-deny $CARGO_DENY_VERSION (cargo install --locked)"
    # Its own target dir, thrown away after: the workspace's stays untouched.
    # Its release profile asks for fat LTO in one codegen unit, which on two
    # cores is most of a cold test run; a check over one lock file needs none
    # of that speed, so the build overrides it.
    CARGO_TARGET_DIR=$NBD_CSI_TOOLS/build/cargo-deny-$CARGO_DENY_VERSION \
        CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_OPT_LEVEL=1 nice -n 10 \
        cargo install --locked --quiet --root "$NBD_CSI_TOOLS" "cargo-deny@$CARGO_DENY_VERSION" || return 1
    rm -rf "$NBD_CSI_TOOLS/build/cargo-deny-$CARGO_DENY_VERSION"
    tools_built cargo-deny "$CARGO_DENY_VERSION" "$start"
}

ensure_cargo_deny || { echo "supply-chain: 0 passed, 1 failed"; exit 1; }

# One check per class, each counted: a failing class does not hide the others.
passed=0 failed=0
for class in licenses bans sources; do
    echo "-- cargo deny check $class"
    if "$TOOLS_BIN/cargo-deny" --locked --config deny.toml check "$class"; then
        passed=$((passed + 1))
    else
        echo "cargo deny check $class FAILED"
        failed=$((failed + 1))
    fi
done
echo "supply-chain: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
