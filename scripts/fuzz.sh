#!/usr/bin/env bash
# Fuzzes the ZooKeeper record readers and the configuration loader with cargo-fuzz.
#
# Usage: scripts/fuzz.sh [--runs N] [--time SECONDS] [--seed N] [--keep] [TARGET...]
#
#   (no options)     the CI form: every target for a fixed number of runs from a fixed seed,
#                    starting from the checked-in seed corpus (tests/fuzz/corpus/<target>)
#                    and the crash regressions (tests/fuzz/regressions/<target>); about a
#                    minute once built
#   --runs N         runs per target (default: each target's CI count below)
#   --time SECONDS   run each target for this long instead of a number of runs
#   --seed N         libFuzzer's random seed (default 1); 0 picks a random one
#   --keep           keep and grow the working corpus in target/fuzz/corpus/<target> across
#                    runs instead of starting afresh
#   TARGET...        only these targets (default: all)
#
# Targets: build_record, upload_record (the znode record readers), znode_path (the positional
# path parser), config_main (the loader on one file), config_secure (main and secure file,
# separated by a NUL byte).
#
# A long manual session, e.g. ten minutes per target from a random seed, growing a corpus:
#   scripts/fuzz.sh --time 600 --seed 0 --keep
#
# The targets and their properties are in tests/fuzz/ (fuzz_targets/*.rs, checks.rs). They
# build with the machine's stable Rust: no sanitizer (`--sanitizer none`; AddressSanitizer
# needs a nightly compiler), but with debug assertions and overflow checks. cargo-fuzz is
# installed when missing, with `cargo install --locked`, into FUZZ_TOOLS (default
# target/tools); the targets build into FUZZ_TARGET_DIR (default target/fuzz).
#
# Any finding (a panic, a failed property, a timeout, running out of memory) makes the exit
# status non-zero; the input is saved in target/fuzz/artifacts/<target>/ and the log says how
# to replay it. Once fixed, copy it into tests/fuzz/regressions/<target>/: `cargo test`
# (bad_data::every_corpus_and_regression_file_passes_the_checks) then runs it for ever.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO_ROOT="$(pwd)"

CARGO_FUZZ_VERSION=0.13.2
FUZZ_DIR=tests/fuzz
TOOLS="${FUZZ_TOOLS:-$REPO_ROOT/target/tools}"
TARGET_DIR="${FUZZ_TARGET_DIR:-$REPO_ROOT/target/fuzz}"
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"

# Runs per target in the CI form, sized to a few seconds each on this machine.
declare -A CI_RUNS=(
    [build_record]=1000000
    [upload_record]=1000000
    [znode_path]=1000000
    [config_main]=100000
    [config_secure]=80000
)
ALL_TARGETS=(build_record upload_record znode_path config_main config_secure)
# libFuzzer dictionaries (tests/fuzz/dicts): tokens and extreme values of each input language.
declare -A DICT=(
    [build_record]=record.dict
    [upload_record]=record.dict
    [config_main]=config.dict
    [config_secure]=config.dict
)

log() { printf 'fuzz: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

runs="" time="" seed=1 keep=0 targets=()
while (($#)); do
    case "$1" in
        --runs) runs="${2:?--runs needs a number}"; shift 2 ;;
        --time) time="${2:?--time needs seconds}"; shift 2 ;;
        --seed) seed="${2:?--seed needs a number}"; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ -v CI_RUNS[$1] ]] || die "unknown target $1 (targets: ${ALL_TARGETS[*]})"
           targets+=("$1"); shift ;;
    esac
done
((${#targets[@]})) || targets=("${ALL_TARGETS[@]}")

# 1. cargo-fuzz, pinned, installed once into $TOOLS.
export PATH="$TOOLS/bin:$PATH"
if [[ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
    log "installing cargo-fuzz $CARGO_FUZZ_VERSION into $TOOLS"
    start=$SECONDS
    cargo install cargo-fuzz --version "=$CARGO_FUZZ_VERSION" --locked --root "$TOOLS" </dev/null
    log "cargo-fuzz installed in $((SECONDS - start)) s"
fi

# 2. The targets, all at once.
start=$SECONDS
cargo fuzz build --fuzz-dir "$FUZZ_DIR" --sanitizer none --target-dir "$TARGET_DIR" </dev/null
log "targets built in $((SECONDS - start)) s"
bin_dir="$TARGET_DIR/$TRIPLE/release"

# 3. Each target: a working corpus first (libFuzzer adds what it finds there), then the
#    checked-in seeds and regressions, read only.
failed=()
for target in "${targets[@]}"; do
    work="$TARGET_DIR/corpus/$target"
    artifacts="$TARGET_DIR/artifacts/$target"
    ((keep)) || rm -rf "$work"
    mkdir -p "$work" "$artifacts"
    inputs=("$work" "$FUZZ_DIR/corpus/$target")
    [[ -d "$FUZZ_DIR/regressions/$target" ]] && inputs+=("$FUZZ_DIR/regressions/$target")
    limit=("-runs=${runs:-${CI_RUNS[$target]}}")
    [[ -n "$time" ]] && limit=("-max_total_time=$time")
    [[ -v DICT[$target] ]] && limit+=("-dict=$FUZZ_DIR/dicts/${DICT[$target]}")
    log "$target: ${limit[*]} -seed=$seed"
    start=$SECONDS
    if "$bin_dir/$target" "${inputs[@]}" "${limit[@]}" -seed="$seed" \
        -artifact_prefix="$artifacts/" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -print_final_stats=1 </dev/null >"$TARGET_DIR/$target.log" 2>&1; then
        log "$target: no finding ($(grep -o 'stat::number_of_executed_units: *[0-9]*' \
            "$TARGET_DIR/$target.log" | grep -o '[0-9]*$') runs in $((SECONDS - start)) s)"
    else
        tail -n 40 "$TARGET_DIR/$target.log" >&2
        log "$target: FINDING; inputs in $artifacts/, whole log in $TARGET_DIR/$target.log"
        log "replay one with: $bin_dir/$target $artifacts/<file>"
        failed+=("$target")
    fi
done

if ((${#failed[@]})); then
    log "findings in: ${failed[*]}"
    exit 1
fi
log "no findings in ${targets[*]}"
