#!/usr/bin/env bash
# The README's first command, exactly as the README writes it, run from the root of a
# fresh clone in a fresh virtualenv, as a newcomer would. Fails if the command fails,
# if the demo does not pass, if anything on stderr is a warning or a traceback, or if
# the demo leaves files behind in the temporary directory.
#   .ci/first_command.sh [REPO]   (default: this checkout's repository, committed HEAD)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO="${1:-$ROOT}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/first_command.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# the first ```sh block of the README is the first command
CMD="$(python3 - "$ROOT/README.md" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
block = re.search(r"```sh\n(.*?)```", text, re.S).group(1).strip()
assert "\n" not in block, f"the first command is one line: {block!r}"
print(block)
PY
)"
echo "README's first command: $CMD"

git clone -q "$REPO" "$WORK/clone"
python3 -m venv "$WORK/venv"
mkdir "$WORK/tmp"
set +e
(
    cd "$WORK/clone"
    # shellcheck disable=SC1091
    . "$WORK/venv/bin/activate"
    TMPDIR="$WORK/tmp" bash -c "$CMD"
) >"$WORK/out" 2>"$WORK/err"
status=$?
set -e
fail() {
    echo "FAILED: $*"
    echo "---- stdout (last 40 lines)"; tail -n 40 "$WORK/out"
    echo "---- stderr"; cat "$WORK/err"
    exit 1
}
[ "$status" -eq 0 ] || fail "exit status $status"
grep -q "^demo passed$" "$WORK/out" || fail "the demo did not pass"
# this machine's pip configuration names local indexes that lack some packages: pip says
# so on stderr; that is the machine, not the command
if grep -v "^WARNING: Location 'file://.*' is ignored" "$WORK/err" | grep -Eiq "warning|traceback|error"; then
    fail "the command wrote warnings or errors to stderr"
fi
# pip's build directories and torch's own inductor cache are not the demo's
leftover="$(ls -A "$WORK/tmp" | grep -Ev '^(pip-|torchinductor_)' || true)"
[ -z "$leftover" ] || fail "the demo left files in TMPDIR: $leftover"
grep -E "^(writing the demo's files into|removed) " "$WORK/out"
echo "first command OK ($(wc -l <"$WORK/out") lines of output, stderr clean)"
