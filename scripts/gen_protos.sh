#!/usr/bin/env bash
# Regenerates embedsvc/v1/*_pb2*.py from protos/ with the pinned grpcio-tools (pyproject's dev extra).
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: the repository root, i.e. in place)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
python=${PYTHON:-python}
mkdir -p "$out/embedsvc/v1"
"$python" -m grpc_tools.protoc -I"$root/protos" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$root/protos/embedsvc/v1/embedsvc.proto"
[ -f "$out/embedsvc/v1/__init__.py" ] || echo '"""Generated embedsvc.v1 API code: do not edit; run scripts/gen_protos.sh."""' > "$out/embedsvc/v1/__init__.py"
