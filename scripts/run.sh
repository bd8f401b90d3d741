#!/usr/bin/env bash
# Installs embedsvc into .venv (idempotently) and runs it on its embedded defaults.
# With arguments, runs `embedsvc ARGS...` instead.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/bootstrap.sh"
venv=${EMBEDSVC_VENV:-$root/.venv}
if [ $# -gt 0 ]; then exec "$venv/bin/embedsvc" "$@"; fi
exec "$venv/bin/embedsvc" embed --model ViT-B-32 --random-init --pooling cls --pooling gem \
  --text "a small red circle in the top left" --text "two objects: a blue star and a green square"
