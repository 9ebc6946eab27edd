#!/usr/bin/env bash
# One process, no process group (strategy single): the fastest loop for debugging a model.
#   launch/debug.sh [key=value ...]      (defaults to configs/debug.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PY:-.venv/bin/python}" -m dist_train --config "${CONFIG:-configs/debug.yaml}" "$@"
