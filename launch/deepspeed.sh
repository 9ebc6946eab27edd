#!/usr/bin/env bash
# DeepSpeed ZeRO through torchrun (no `deepspeed` launcher needed):
#   ZERO=3 launch/deepspeed.sh [--config FILE] [key=value ...]
# Runs in the caller's directory, as local.sh does.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
exec "$here/local.sh" strategy.name=deepspeed strategy.zero_stage="${ZERO:-2}" "$@"
