#!/usr/bin/env bash
# Builds and runs each fuzz target for a bounded number of executions / time,
# prints libFuzzer's final figures, and exits non-zero if any target crashed,
# hung or leaked past the limits. See fuzz/README.md.
#
# Environment (all optional):
#   FUZZ_TARGETS    targets to run, in order   (server_session wire_decoders)
#   FUZZ_RUNS       executions per target      (1000000)
#   FUZZ_SECONDS    time cap per target, s     (600)
#   FUZZ_TIMEOUT    one input's time limit, s  (10; longer counts as a hang)
#   FUZZ_MAX_LEN    largest input, bytes       (4096)
#   FUZZ_SANITIZER  address | none             (address)
#   FUZZ_ARGS       extra libFuzzer arguments, appended
#   ASAN_OPTIONS    passed on (default detect_stack_use_after_return=0, see README)
set -uo pipefail

cd "$(dirname "$0")" || exit 1
FUZZ_DIR=$PWD
targets=${FUZZ_TARGETS:-server_session wire_decoders}
runs=${FUZZ_RUNS:-1000000}
seconds=${FUZZ_SECONDS:-600}
timeout=${FUZZ_TIMEOUT:-10}
max_len=${FUZZ_MAX_LEN:-4096}
sanitizer=${FUZZ_SANITIZER:-address}

say() { printf '== %s\n' "$*" >&2; }

# ASan's stack-use-after-return fake stacks grow RSS by ~3 KB per
# server_session execution (tokio's blocking-pool threads come and go), which
# would trip -rss_limit_mb on long runs. Safe Rust has no use-after-return.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_stack_use_after_return=0}

# cargo-fuzz lands in ~/.cargo/bin, which persists between runs on a machine.
if ! cargo fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz"
    cargo install cargo-fuzz --locked || exit 1
fi

# Sanitizers and libFuzzer's instrumentation need unstable rustc flags: use a
# nightly toolchain when there is one (or one can be installed), otherwise the
# stable one with RUSTC_BOOTSTRAP=1.
toolchain=()
if rustup run nightly rustc --version >/dev/null 2>&1; then
    toolchain=(+nightly)
elif timeout 300 rustup toolchain install nightly --profile minimal >/dev/null 2>&1; then
    toolchain=(+nightly)
else
    say "no nightly toolchain: using stable with RUSTC_BOOTSTRAP=1"
    export RUSTC_BOOTSTRAP=1
fi
say "toolchain: $(cargo "${toolchain[@]}" --version) / $(cargo fuzz --version)"

build() {
    cargo "${toolchain[@]}" fuzz build -O -a --sanitizer "$sanitizer" --fuzz-dir "$FUZZ_DIR"
}
if ! build; then
    if [[ $sanitizer == none ]]; then
        say "build failed"
        exit 1
    fi
    say "build with --sanitizer $sanitizer failed; retrying with --sanitizer none"
    sanitizer=none
    build || exit 1
fi

mkdir -p logs
failed=()
for target in $targets; do
    corpus=$FUZZ_DIR/corpus/$target
    mkdir -p "$corpus"
    # Seeds are committed; the working corpus (ignored by git) grows from them.
    if [[ -d seeds/$target ]]; then
        cp -n seeds/"$target"/* "$corpus"/ 2>/dev/null || true
    fi
    args=(
        "-runs=$runs" "-max_total_time=$seconds" "-rss_limit_mb=2048" "-timeout=$timeout"
        "-max_len=$max_len" "-print_final_stats=1"
    )
    [[ -f $target.dict ]] && args+=("-dict=$FUZZ_DIR/$target.dict")
    # shellcheck disable=SC2206
    args+=(${FUZZ_ARGS:-})
    log=logs/$target.log
    say "fuzzing $target (sanitizer $sanitizer): ${args[*]}"
    cargo "${toolchain[@]}" fuzz run -O -a --sanitizer "$sanitizer" --fuzz-dir "$FUZZ_DIR" \
        "$target" "$corpus" -- "${args[@]}" >"$log" 2>&1
    status=$?
    say "$target: exit $status, log in fuzz/$log"
    # The last status line (execs, cov, ft, corp, exec/s, rss) and the totals.
    grep -E '^#[0-9]+' "$log" | tail -n 1
    grep -E '^(Done [0-9]+ runs|stat::)' "$log"
    if [[ $status -ne 0 ]]; then
        failed+=("$target")
        grep -E 'ERROR: libFuzzer|ERROR: AddressSanitizer|panicked at|Test unit written to' "$log" | head -n 20
        say "reproduce: cargo ${toolchain[*]} fuzz run -O -a --sanitizer $sanitizer --fuzz-dir fuzz $target fuzz/artifacts/$target/<file>"
        say "minimise:  cargo ${toolchain[*]} fuzz tmin -O -a --sanitizer $sanitizer --fuzz-dir fuzz $target fuzz/artifacts/$target/<file>"
    fi
done

if [[ ${#failed[@]} -ne 0 ]]; then
    say "FAILED: ${failed[*]}"
    exit 1
fi
say "all targets ran clean"
