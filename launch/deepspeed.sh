#!/usr/bin/env bash
# DeepSpeed ZeRO through torchrun (no `deepspeed` launcher needed):
#   ZERO=3 launch/deepspeed.sh [--config FILE] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "$(dirname "$0")/local.sh" strategy.name=deepspeed strategy.zero_stage="${ZERO:-2}" "$@"
