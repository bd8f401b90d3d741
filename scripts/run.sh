#!/usr/bin/env bash
# Installs embedsvc into .venv (idempotently) and starts the service on its embedded defaults:
# the bundled model, data in ./embedsvc-data, gRPC on 127.0.0.1:50051, metrics on :9100, and a demo
# collection "scenes" of generated images indexed on first start.
# With arguments, runs `embedsvc ARGS...` instead (e.g. scripts/run.sh search scenes --text "a red star").
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/bootstrap.sh"
venv=${EMBEDSVC_VENV:-$root/.venv}
if [ $# -gt 0 ]; then exec "$venv/bin/embedsvc" "$@"; fi
exec "$venv/bin/embedsvc" serve
