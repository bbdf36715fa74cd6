#!/usr/bin/env bash
# run.sh: builds a libFuzzer target over the format engine (ASan + UBSan) into fuzz/build/
# and runs it for SECONDS on one core; prints executions, coverage and corpus size.
#
# Usage: fuzz/run.sh SECONDS [engine|plan|pickle]
#   engine (default): fuzz_engine.c, st_parse + invariants + writer round trip + st_sniff
#   plan:             fuzz_plan.c, st_plan_write over decoded items, read back
#   pickle:           fuzz_pickle.c, the legacy checkpoint engine (st_pickle.c): plan invariants
# Environment: CC (default: the first of clang, clang-19, clang-16, clang-14 found),
#   COVERAGE=0 skips the line-coverage build, FUZZ_ARGS adds libFuzzer flags.
# Exits non-zero when a regression input or the fuzzer finds a crash, a sanitizer report,
# a leak, a timeout or an out-of-memory; artifacts go to fuzz/build/artifacts/.
set -euo pipefail

usage() {
    echo "usage: $0 SECONDS [engine|plan|pickle]" >&2
    exit 2
}
[ $# -ge 1 ] && [ $# -le 2 ] || usage
secs=$1
target=${2:-engine}
case "$secs" in '' | *[!0-9]*) usage ;; esac
case "$target" in engine | plan | pickle) ;; *) usage ;; esac

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
engine_src=$root/csrc/st_engine.c
if [ "$target" = pickle ]; then engine_src=$root/csrc/st_pickle.c; fi
build=$here/build
work=$build/corpus-$target
artifacts=$build/artifacts
log=$build/fuzz-$target.log
bin=$build/fuzz_$target
mkdir -p "$build" "$work" "$artifacts"

# ---- tools ----

find_tool() {
    local c
    for c in "$@"; do
        if command -v "$c" >/dev/null 2>&1; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}
CC=${CC:-$(find_tool clang clang-19 clang-16 clang-14 || true)}
if [ -z "$CC" ]; then
    echo "run.sh: clang not found; install it with:" >&2
    echo "  apt-get update && apt-get install -y clang libclang-rt-14-dev llvm-14" >&2
    exit 2
fi
# llvm-profdata and llvm-cov of the same release, beside the real clang binary
llvm_bin=$(dirname "$(readlink -f "$(command -v "$CC")")")

# ---- build ----

src=$here/fuzz_$target.c
cflags=(-g -O1 -fno-omit-frame-pointer -Wall -Wextra -I"$root/csrc")
echo "== building $bin with $CC"
"$CC" "${cflags[@]}" -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    "$engine_src" "$src" -o "$bin"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

status=0

# ---- regressions: every saved finding must now pass ----

regress=$here/regressions/$target
if [ -d "$regress" ] && [ -n "$(ls -A "$regress" 2>/dev/null)" ]; then
    echo "== replaying $(ls -A "$regress" | wc -l) regression inputs from $regress"
    for f in "$regress"/*; do
        if "$bin" -runs=1 "$f" >"$build/regress.log" 2>&1; then
            echo "   pass  $(basename "$f")"
        else
            echo "   FAIL  $(basename "$f")"
            grep -E 'ERROR|invariant violated|runtime error|SUMMARY' "$build/regress.log" |
                head -5 | sed 's/^/         /'
            status=1
        fi
    done
fi

# ---- fuzzing ----

fuzz_args=(-max_total_time="$secs" -max_len=65536 -timeout=5 -rss_limit_mb=2048
    -malloc_limit_mb=2048 -print_final_stats=1 -use_value_profile=1
    -artifact_prefix="$artifacts/$target-")
if [ "$target" = engine ]; then
    cp -f "$here"/corpus/* "$work"/
    fuzz_args+=(-dict="$here/safetensors.dict")
elif [ "$target" = pickle ]; then
    cp -f "$here"/corpus_pickle/* "$work"/
    fuzz_args+=(-dict="$here/pickle.dict")
fi
before=$(find "$work" -type f | wc -l)
echo "== fuzzing $target for ${secs}s on 1 worker; corpus $work ($before inputs); log $log"
start=$(date +%s)
set +e
# shellcheck disable=SC2086
"$bin" "${fuzz_args[@]}" ${FUZZ_ARGS:-} "$work" >"$log" 2>&1
rc=$?
set -e
elapsed=$(($(date +%s) - start))

stat() { grep -E "^stat::$1:" "$log" | tail -1 | awk '{print $2}'; }
last=$(grep -E '^#[0-9]+.*(cov|ft): ' "$log" | tail -1 || true)
field() { echo "$last" | grep -oE "$1: [0-9]+" | awk '{print $2}'; }
echo "== results ($target)"
echo "   seconds:      $elapsed"
echo "   executions:   $(stat number_of_executed_units)"
echo "   exec/s:       $(stat average_exec_per_sec)"
echo "   cov:          $(field cov)   ft: $(field ft)"
echo "   new units:    $(stat new_units_added)"
echo "   peak rss MB:  $(stat peak_rss_mb)"
echo "   corpus:       libFuzzer's $(echo "$last" | grep -oE 'corp: [^ ]+' | awk '{print $2}') (units/size);" \
    "$(find "$work" -type f | wc -l) files, $(du -sb "$work" | awk '{print $1}') bytes on disk (was $before)"

if [ "$rc" -ne 0 ]; then
    status=1
    echo "== FINDING: libFuzzer exited with $rc"
    grep -E 'ERROR: |invariant violated|runtime error|SUMMARY|Test unit written|timeout after|out-of-memory' \
        "$log" | head -20 | sed 's/^/   /'
    echo "   artifacts in $artifacts:"
    ls -1 "$artifacts" | sed 's/^/     /'
    echo "   minimize:  $bin -minimize_crash=1 -runs=100000 -exact_artifact_path=OUT ARTIFACT"
fi

# ---- line coverage (optional) ----

if [ "${COVERAGE:-1}" != 0 ] && [ -x "$llvm_bin/llvm-profdata" ] && [ -x "$llvm_bin/llvm-cov" ]; then
    cov_bin=$build/cov_$target
    prof=$build/cov-$target
    "$CC" "${cflags[@]}" -O0 -fprofile-instr-generate -fcoverage-mapping -fsanitize=fuzzer \
        "$engine_src" "$src" -o "$cov_bin"
    rm -f "$prof".profraw
    # -runs=0: execute the corpus once and stop
    LLVM_PROFILE_FILE=$prof.profraw "$cov_bin" -runs=0 "$work" >"$build/cov-$target.log" 2>&1 || true
    if [ -s "$prof.profraw" ]; then
        "$llvm_bin/llvm-profdata" merge -sparse "$prof.profraw" -o "$prof.profdata"
        "$llvm_bin/llvm-cov" report "$cov_bin" -instr-profile="$prof.profdata" \
            "$engine_src" >"$prof-report.txt"
        "$llvm_bin/llvm-cov" show "$cov_bin" -instr-profile="$prof.profdata" \
            "$engine_src" >"$prof-show.txt"
        # columns: regions missed cover functions missed cover lines missed cover [branches]
        awk -v f="$(basename "$engine_src")" 'index($1, f) {
                printf "   " f " line coverage: %s (%d of %d lines), regions %s, functions %s\n",
                       $10, $8 - $9, $8, $4, $7 }' "$prof-report.txt"
        echo "   uncovered lines: grep -E '^ +[0-9]+\\| +0\\|' $prof-show.txt"
    else
        echo "   (line coverage: no profile written)"
    fi
fi

exit $status
