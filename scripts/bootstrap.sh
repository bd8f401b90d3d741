#!/usr/bin/env bash
# Creates (once) the project's virtual environment and installs embedsvc into it, idempotently.
# One environment for running and testing: it always installs the dev extra (a superset of what serving
# needs), so switching between scripts/run.sh and scripts/test.sh never reinstalls.
# Usage: scripts/bootstrap.sh           Environment: EMBEDSVC_VENV (default .venv), PYTHON (default python3),
#        TORCH_SPEC (default "torch==2.14.1 torchvision==0.29.1", the pair this workplace serves from disk).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${EMBEDSVC_VENV:-$root/.venv}
python=${PYTHON:-python3}
extra=dev
torch_spec=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x "$venv/bin/python" ]; then
  echo "bootstrap: creating virtual environment $venv" >&2
  "$python" -m venv "$venv"
fi
# Reinstall only when what defines the environment changed.
want=$(cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh" | sha256sum | cut -c1-16)-$extra-$torch_spec
stamp="$venv/.embedsvc-installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing dependencies into $venv (first run: a few minutes)" >&2
  # torch first, pinned: letting the resolver pick would pull the newest CUDA build (several GB).
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $torch_spec
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root${extra:+[$extra]}"
  echo "$want" > "$stamp"
fi
