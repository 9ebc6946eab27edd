#!/usr/bin/env bash
# The one prepared command of a session lent a GPU machine (the device tool), in under 9 minutes:
#
#   bash tests/scripts/gpu_wheels.sh        # here, once: the wheels the machine lacks, in .whl/
#   device run: command "bash tests/scripts/gpu_session.sh", carry [".whl"], timeout_s 570
#
# 1. gpu_check.py: bf16 and fp16 (scaler) x single, DDP, FSDP on NCCL, FSDP cpu_offload and
#    DeepSpeed ZeRO-3 bf16, on ResNet-18 (BatchNorm buffers); async saves whose copy runs
#    on a side stream; an exact resume of each, bit for bit (tests/scripts/gpu_check.py).
# 2. throughput.py --explain: dist_train's single-GPU job against a plain loop (ResNet-18, 3x32x32,
#    batch 32, bf16), and the host time of each part of dist_train's loop (the GPU run's
#    unexplained "other", docs/benchmarks.md).
# 3. step_overhead.py vision-ddp bf16: train_step against a plain step on the same DDP model, with
#    and without the non-finite check (its per-step host sync) and the preemption flag.
#
# Each part has its own time limit and writes $OUT/<part>.txt (the device tool brings $OUT back);
# the tail of each is printed. GPU_SESSION_CPU=1 runs the same parts, small, on a CPU machine (to
# check this script here). Exit status: that of the first part that failed, else 0.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dist_train_site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/dist_train_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (at most ${limit}s): $*"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
    rc=$?
    echo "   exit $rc after $(( $(date +%s) - start ))s$([ $rc -eq 124 ] && echo ' (timed out)')"
    tail -n 30 "$OUT/$name.txt" | sed 's/^/   /'
    [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
    return 0
}

{
    date -u
    nvidia-smi -L 2>&1 || echo "no nvidia-smi"
    "$PY" -c "import sys, torch, omegaconf, dist_train; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', \
'omegaconf', omegaconf.__version__)"
    "$PY" -c "import torchvision; print('torchvision', torchvision.__version__)" 2>&1 | tail -1
    "$PY" -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "${GPU_SESSION_CPU:-0}" = 1 ]; then
    part gpu_check 600 "$PY" tests/scripts/gpu_check.py --cpu --steps 6 --only fsdp-fp32
    part throughput 300 "$PY" benchmarks/throughput.py --explain --model mlp --data digits --batch-size 8 \
        --steps 40 --repeats 1
    part step_overhead 300 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
        benchmarks/step_overhead.py --workload vision-ddp --smoke --blocks 2 --steps 2
else
    part gpu_check 330 "$PY" tests/scripts/gpu_check.py --jobs 8
    part throughput 100 "$PY" benchmarks/throughput.py --explain --precision bf16 --model resnet18 \
        --data synthetic_images --batch-size 32 --steps 300 --repeats 3
    part step_overhead 100 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
        benchmarks/step_overhead.py --workload vision-ddp --precision bf16 --blocks 20 --steps 20
fi
exit $status
