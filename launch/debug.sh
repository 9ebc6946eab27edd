#!/usr/bin/env bash
# One process, no process group (strategy single): the fastest loop for debugging a model.
#   launch/debug.sh [key=value ...]      (defaults to the repository's configs/debug.yaml)
# Runs in the caller's directory, as `python -m dist_train` would: relative paths (--config,
# run.dir, the default runs/) and the modules that builders are imported from are the caller's.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
exec "${PY:-$repo/.venv/bin/python}" -m dist_train --config "${CONFIG:-$repo/configs/debug.yaml}" "$@"
