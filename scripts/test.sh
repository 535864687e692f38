#!/usr/bin/env bash
# The whole suite (or a selection: scripts/test.sh -k inference). pytest's exit code 5 (no
# tests collected) is handled explicitly: for a selection it only means nothing matched
# (exit 0, said); for the whole suite it means the suite itself is broken (exit 1).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p tests/output
.venv/bin/pytest -q -rs --durations=15 "$@" tests
rc=$?
if [[ $rc -eq 5 ]]; then
    if [[ $# -gt 0 ]]; then echo "pytest: no test matched the selection: $*"; exit 0; fi
    echo "pytest: the suite collected no tests: something is broken" >&2
    exit 1
fi
exit $rc
