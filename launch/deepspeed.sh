#!/usr/bin/env bash
# DeepSpeed ZeRO through torchrun (no `deepspeed` launcher needed):
#   ZERO=3 launch/deepspeed.sh [--config FILE] [key=value ...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)   # (before the cd: a relative $0 names a path from here)
cd "$here/.."
exec "$here/local.sh" strategy.name=deepspeed strategy.zero_stage="${ZERO:-2}" "$@"
