#!/usr/bin/env bash
# All devices of this machine: one rank per GPU, or 2 gloo ranks on a CPU-only machine.
#   launch/local.sh [--config FILE] [key=value ...]
# dist_train.launch checks the config once (as rank 0 of this world size: a bad config exits 2
# with one message, before any rank starts), then runs torchrun; a failed rank's exit code is
# passed on (2 bad config, 3 preempted, 1 failed) without torchrun's own traceback.
# Runs in the caller's directory, as `torchrun -m dist_train` would: relative paths (--config,
# run.dir, the default runs/) and the modules that builders are imported from are the caller's.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$repo/.venv/bin/python}
NPROC=${NPROC:-$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")}
exec "$PY" -m dist_train.launch --standalone --nproc_per_node="$NPROC" "$@"
