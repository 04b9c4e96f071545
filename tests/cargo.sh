# The test command's Rust builds, sourced by the suites. Each profile is
# built with one package selection only: cargo unifies features per command
# line, so `-p nbd-csi-agent` and `--workspace` (or a build with and
# without dev-dependencies) compile tokio, hyper, kube and every crate
# above them once each. The workspace declares shared crates' features
# once (Cargo.toml); these two selections are the only ones the suites use.
cargo_manifest=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/Cargo.toml

# debug_build: exactly what `cargo test --workspace` builds (the binaries,
# examples and test targets, dev-dependencies' features included), so after
# that step of tests/run.sh it compiles nothing.
debug_build() {
    cargo test --manifest-path "$cargo_manifest" --workspace --locked --no-run --quiet "$@"
}

# release_build: the two binaries the images ship and the VM's test tools
# (tests/tools), with no dev-dependency: one release tree for both.
release_build() {
    cargo build --manifest-path "$cargo_manifest" --release --locked --quiet -p nbd-csi-controller -p nbd-csi-node -p nbd-csi-test-tools --bins
}

# workspace_test ARGS...: `cargo test` of some targets (--test NAME, --lib)
# with the workspace's selection, so that it reuses debug_build's artifacts.
workspace_test() {
    cargo test --manifest-path "$cargo_manifest" --workspace --locked "$@"
}
