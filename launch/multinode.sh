#!/usr/bin/env bash
# Multi-node torchrun (c10d rendezvous). Run the same command on every node:
#   NNODES=2 MASTER_ADDR=node0 launch/multinode.sh [--config FILE] [key=value ...]
# Optional: NPROC (ranks per node, default: GPUs or 2), MASTER_PORT (29500), RDZV_ID (job id).
# Each node checks the config first (world size NNODES x NPROC; its own run dir and data), see local.sh.
# Runs in the caller's directory, as local.sh does. Exit 2 (bad usage) when NNODES or MASTER_ADDR is unset.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$repo/.venv/bin/python}
if [ -z "${NNODES:-}" ]; then echo "launch/multinode.sh: set NNODES (the number of nodes)" >&2; exit 2; fi
if [ -z "${MASTER_ADDR:-}" ]; then
  echo "launch/multinode.sh: set MASTER_ADDR to the address of the first node" >&2; exit 2
fi
NPROC=${NPROC:-$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")}
exec "$PY" -m dist_train.launch --nnodes="$NNODES" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id="${RDZV_ID:-dist_train}" \
  "$@"
