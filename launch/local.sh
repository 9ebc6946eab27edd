#!/usr/bin/env bash
# All devices of this machine: one rank per GPU, or 2 gloo ranks on a CPU-only machine.
#   launch/local.sh [--config FILE] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NPROC=${NPROC:-$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")}
"$PY" -m dist_train --check "$@"          # a bad config stops here, before any rank starts
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m dist_train "$@"
