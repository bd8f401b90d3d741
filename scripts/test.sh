#!/usr/bin/env bash
# Installs embedsvc with its dev extra into .venv (idempotently; the same environment as scripts/run.sh)
# and runs the test suite.
# Extra arguments go to pytest. Slow tests (training, soak) are skipped unless EMBEDSVC_SLOW=1. Tests run in
# parallel on every core (pytest-xdist, one file per worker, long files first; EMBEDSVC_TEST_WORKERS=N sets the number,
# 0 runs them in one process).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/bootstrap.sh"
venv=${EMBEDSVC_VENV:-$root/.venv}
cd "$root"
marker=("-m" "not slow")
[ "${EMBEDSVC_SLOW:-0}" = "1" ] && marker=()
exec "$venv/bin/python" -m pytest -n "${EMBEDSVC_TEST_WORKERS:-auto}" --dist loadfile "${marker[@]}" "$@"
