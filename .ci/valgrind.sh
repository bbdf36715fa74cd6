#!/usr/bin/env bash
# Runs the C-heavy tests (test_rules.py, test_hostile_corpus.py, test_leaks.py: whichever
# exist) under valgrind memcheck against the normal build (-O2 -g), prints a summary and
# exits non-zero when memcheck reports an error or a definite leak in our extension, or when
# a test fails. Errors and leaks of CPython, libtorch and friends are counted, not judged.
#
#   .ci/valgrind.sh                    # the fast subset: ~830 tests, ~3.5 min on 2 cores
#   VALGRIND_K='...' .ci/valgrind.sh   # another pytest -k expression
#   .ci/valgrind.sh -x                 # extra arguments go to pytest
# Needs the normal build in place (not the ASan one: the two runtimes cannot mix).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if ! command -v valgrind >/dev/null 2>&1; then
    echo "installing valgrind"
    (apt-get update -qq && apt-get install -y -qq valgrind) >/dev/null 2>&1 || {
        echo "valgrind is missing and could not be installed" >&2
        exit 2
    }
fi

# the interpreter itself, not a pyenv shim or wrapper script that valgrind would trace
# instead; not its realpath either, which would step out of a virtualenv
PY="$(python3 -c 'import sys; print(sys.executable)')"
"$PY" -c "import torch_safetensors" || { echo "torch_safetensors is not importable" >&2; exit 2; }

TESTS=()
for f in tests/test_rules.py tests/test_hostile_corpus.py tests/test_leaks.py; do
    [ -f "$f" ] && TESTS+=("$f")
done
if [ ${#TESTS[@]} -eq 0 ]; then
    echo "no C-heavy test files found" >&2
    exit 2
fi

# The fast subset: every rule and every C path once, without what only repeats them.
# - test_rules.py: all of it;
# - the hostile corpus through load(bytes), load_file (mapping) and torch.load(mmap=False)
#   (pread); the other torch.load variants run the same C;
# - no RSS/size-based leak tests (memcheck does that job), no subprocess tests (valgrind
#   does not follow children), no 100,000-entry headers (minutes under memcheck, no new path).
K_DEFAULT='not bounded_memory and not big_ and not hundred_thousand and not no_mapping_or_fd'
K_DEFAULT+=' and not (test_refused and (safe_open or (torch_load and not nommap)))'
K="${VALGRIND_K:-$K_DEFAULT}"

OUT="$(mktemp -d "${TMPDIR:-/tmp}/torch_safetensors-valgrind.XXXXXX")"
LOG="$OUT/memcheck.%p.log"   # one per process: torch and pytest fork helpers
RCFILE="$OUT/pytest.rc"
SUPP="$ROOT/.ci/valgrind-python.supp"

export PYTHONMALLOC=malloc                     # every allocation goes through valgrind
export TORCH_SAFETENSORS_LEAK_ROUNDS=20        # test_leaks.py: 20 rounds, not 1,000
export TORCH_SAFETENSORS_HANG_BOUND_S=120      # test_hostile_corpus.py: memcheck is slow
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export VG_RCFILE="$RCFILE"

echo "valgrind $(valgrind --version | sed 's/valgrind-//'), $PY"
echo "tests: ${TESTS[*]}"
echo "-k: $K"
echo "logs: $OUT"
start=$(date +%s)
timeout "${VALGRIND_TIMEOUT:-1500}" valgrind --tool=memcheck --error-exitcode=99 --errors-for-leak-kinds=definite \
    --leak-check=full --show-leak-kinds=definite --num-callers=40 --fullpath-after= \
    --suppressions="$SUPP" --log-file="$LOG" \
    "$PY" -c 'import os, sys, pytest
rc = int(pytest.main(sys.argv[1:]))
open(os.environ["VG_RCFILE"], "w").write(str(rc))
sys.exit(rc)' -q -p no:cacheprovider -k "$K" "${TESTS[@]}" "$@"
vg_rc=$?
elapsed=$(( $(date +%s) - start ))
pytest_rc="$(cat "$RCFILE" 2>/dev/null || echo missing)"

"$PY" - "$OUT" "$vg_rc" "$pytest_rc" "$elapsed" <<'EOF'
"""Splits the memcheck log into records and judges those that involve our extension."""
import glob
import os
import re
import sys

out, vg_rc, pytest_rc, elapsed = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
OURS = re.compile(r"csrc/(module|st_binding|st_write|legacy_module|st_pickle|st_hash|st_engine|st_file|st_aten)\.c|torch_safetensors/_C\.cpython")

def read_records(path):
    records, cur = [], []
    with open(path, errors="replace") as f:
        for line in f:
            m = re.match(r"==\d+== ?(.*)", line.rstrip("\n"))
            if not m:
                continue
            body = m.group(1)
            if body.strip():
                cur.append(body)
            elif cur:
                records.append(cur)
                cur = []
    if cur:
        records.append(cur)
    return records

# the main process ran pytest; the others are its forks (helpers torch and pytest exec),
# whose parent is the main process
logs = sorted(glob.glob(os.path.join(out, "memcheck.*.log")))
pids = {re.search(r"memcheck\.(\d+)\.log$", p).group(1): p for p in logs}
main = None
for pid, path in pids.items():
    with open(path, errors="replace") as f:
        m = re.search(r"Parent PID: (\d+)", f.read(4000))
    if m and m.group(1) not in pids:
        main = path
records = [r for p in logs for r in read_records(p)]
main_records = read_records(main) if main else []

def is_error(rec):
    head = rec[0]
    return (head.startswith(("Invalid ", "Conditional jump", "Use of uninitialised",
                             "Syscall param", "Mismatched free", "Source and destination",
                             "Argument 'size'", "Jump to the invalid"))
            or "definitely lost in loss record" in head)

errors = [r for r in records if is_error(r)]
ours = [r for r in errors if any(OURS.search(l) for l in r)]
leaks_ours = [r for r in ours if "definitely lost" in r[0]]
other_ours = [r for r in ours if "definitely lost" not in r[0]]

def leak_bytes(rec):
    m = re.match(r"([\d,]+) bytes in", rec[0]) or re.match(r"([\d,]+) \(", rec[0])
    return int(m.group(1).replace(",", "")) if m else 0

summary = ""
definitely = ""
for r in main_records:
    for l in r:
        if l.startswith("ERROR SUMMARY:"):
            summary = l
        if l.strip().startswith("definitely lost:"):
            definitely = l.strip()

print("\n==== valgrind memcheck summary ====")
print(f"time: {elapsed} s; pytest exit status: {pytest_rc}; valgrind exit status: {vg_rc}")
print(f"main process, all libraries: {summary or 'no ERROR SUMMARY (did valgrind finish?)'}")
print(f"main process, all libraries: {definitely or 'definitely lost: (no leak summary)'}")
print(f"logs: {len(logs)} processes; main: {main}")
print(f"records naming torch_safetensors: {len(other_ours)} errors, {len(leaks_ours)} "
      f"definite leaks ({sum(leak_bytes(r) for r in leaks_ours)} bytes)")
for r in ours[:10]:
    print("\n  " + "\n  ".join(r[:24]))
status = 0
if pytest_rc != "0":
    print("FAIL: the tests did not pass under valgrind")
    status = 1
if ours:
    print("FAIL: memcheck reports problems in torch_safetensors")
    status = 1
if not summary:
    status = 1
print("OK" if status == 0 else f"see {main or out}")
sys.exit(status)
EOF
