"""The one script a session lent a GPU machine runs: the GPU paths this CPU-only project can only
build "correct by construction", exercised for real in a few minutes.

    python tests/scripts/gpu_check.py [--out DIR] [--steps 30] [--only single-bf16,fsdp-fp16] [--jobs 5]

On this machine's GPUs (``torchrun --nproc_per_node=<GPUs>``, NCCL; ``single`` runs one process;
on a one-GPU machine the distributed cases run one rank, so no collective crosses ranks), for each
case (strategy x precision: single, ddp and fsdp; bf16, and fp16 with the gradient scaler; FSDP
with ``cpu_offload``; DeepSpeed ZeRO-3 bf16; DDP on 2 ranks over gloo, which may share one GPU), ``resnet18`` (BatchNorm's buffers: staged, sharded
units of their own, kept on the device under offload) on ``synthetic_images`` (``--cpu``: the
``cnn``, no buffers, to check this script quickly):

- a reference run of ``--steps`` steps, checkpointing every third of them asynchronously, with
  ``debug.faults=slow_staging=0.2``: each save's deferred copy of parameters and optimizer state
  (a side CUDA stream into pinned buffers) runs while the next steps compute, and the next
  optimizer step must wait for it;
- the same job stopped at two thirds (``train.max_steps``) and resumed in the same run dir to the
  end: the resumed steps' losses must equal the reference's bit for bit (``train.deterministic``
  on: cuDNN and cuBLAS pick reproducible kernels), every checkpoint must verify, and no save may
  be dropped or failed.

Prints one line per case (pass/fail, wall time, blocking per save) and exits 1 if any failed.
Needs torch with CUDA and this project's dependencies importable (``python -c "import dist_train"``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Dict, List, Tuple

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
CASES = [("single", "bf16"), ("single", "fp16"), ("ddp", "bf16"), ("fsdp", "bf16"), ("fsdp", "fp16"),
         ("fsdp_offload", "bf16"), ("zero3", "bf16"), ("ddp_gloo2", "bf16")]
# A case's strategy overrides (the others: strategy.name=<case>).
STRATEGIES = {"fsdp_offload": ["strategy.name=fsdp", "strategy.fsdp.cpu_offload=true"],
              "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"],
              # Two ranks whatever the GPU count (gloo lets them share one): what only runs at a world
              # size above 1 (each rank staging its share of an async save in pinned memory, the ranks'
              # agreement on the shares, rank 0's buffers broadcast, the task inside DDP's forward)
              # runs on a one-GPU machine too.
              "ddp_gloo2": ["strategy.name=ddp", "dist.backend=gloo"]}
RANKS = {"ddp_gloo2": 2}  # ranks of a case that does not run one per GPU


def run(args: List[str], nproc: int, run_dir: str, log: str) -> int:
    if nproc == 0:
        cmd = [sys.executable, "-m", "dist_train", *args, f"run.dir={run_dir}"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "dist_train", *args, f"run.dir={run_dir}"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=900).returncode


def losses(run_dir: str) -> Dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def summary(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


def check(strategy: str, precision: str, steps: int, gpus: int, out: str, model: str) -> Tuple[bool, str]:
    nproc = 0 if strategy == "single" else RANKS.get(strategy, gpus)
    every = max(1, steps // 3)
    stop = 2 * every
    common = [f"model.name={model}", "data.name=synthetic_images", "data.synthetic_samples=4096", "data.batch_size=32",
              *STRATEGIES.get(strategy, [f"strategy.name={strategy}"]), f"train.precision={precision}",
              f"checkpoint.every_steps={every}",
              "checkpoint.async=true", "debug.faults=slow_staging=0.2", "eval.every_steps=0",
              "logging.every_steps=1", "logging.mlflow.enabled=false", "logging.progress_bar=off",
              "train.deterministic=true"]
    name = f"{strategy}-{precision}"
    log = os.path.join(out, f"{name}.log")
    ref, resumed = os.path.join(out, name, "reference"), os.path.join(out, name, "resumed")
    t0 = time.perf_counter()
    if run([*common, f"train.max_steps={steps}"], nproc, ref, log) != 0:
        return False, f"the reference run failed (see {log})"
    if run([*common, f"train.max_steps={stop}"], nproc, resumed, log) != 0:
        return False, f"the run to step {stop} failed (see {log})"
    if run([*common, f"train.max_steps={steps}"], nproc, resumed, log) != 0:
        return False, f"the resumed run failed (see {log})"
    wall = time.perf_counter() - t0
    s_ref, s_res = summary(ref), summary(resumed)
    problems = []
    if s_res.get("resumed_from_step") != stop:
        problems.append(f"resumed from {s_res.get('resumed_from_step')}, not {stop}")
    a, b = losses(ref), losses(resumed)
    differ = [k for k in range(stop + 1, steps + 1) if a.get(k) != b.get(k)]
    if differ:
        worst = max((abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for k in differ if k in a and k in b), default=None)
        problems.append(f"losses differ after the resume at {len(differ)} of {steps - stop} steps {differ[:5]} "
                        f"(e.g. {a.get(differ[0])} vs {b.get(differ[0])}; worst relative difference {worst})")
    for s in (s_ref, s_res):
        ckpt = s.get("checkpoint", {})
        if ckpt.get("dropped_saves") or ckpt.get("failed_saves"):
            problems.append(f"saves dropped or failed: {ckpt}")
    sys.path.insert(0, ROOT)
    from dist_train.checkpoint import layout

    for run_dir in (ref, resumed):
        ckpts = os.path.join(run_dir, "checkpoints")
        for n in sorted(os.listdir(ckpts)):
            if n.startswith("step_") and layout.verify(os.path.join(ckpts, n)):
                problems.append(f"{run_dir}/checkpoints/{n} does not verify")
    blocking = s_ref.get("checkpoint", {}).get("blocking_s", 0.0) / max(1, s_ref.get("checkpoint", {}).get("saves", 1))
    detail = f"{wall:.0f} s, blocking {blocking * 1e3:.1f} ms per async save (each copy held 0.2 s by the fault)"
    phases = s_ref.get("time_breakdown") or {}
    total = sum(phases.values())
    if total > 0:  # (on a GPU: is the device's forward and backward timed as such, not as the optimizer's?)
        detail += "; time " + ", ".join(f"{k} {100 * phases.get(k, 0.0) / total:.0f}%"
                                        for k in ("data", "forward_backward", "optimizer", "checkpoint", "other"))
    return not problems, "; ".join(problems) or detail


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="where the runs and logs go (default: a temporary dir)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--only", default="", help="comma-separated cases, e.g. single-bf16,fsdp-fp16")
    p.add_argument("--cpu", action="store_true", help="check this script itself on a CPU machine (fp32, 2 ranks)")
    p.add_argument("--jobs", type=int, default=1, help="cases run at once (they share the GPUs; wall times and "
                   "blocking then include the others' load)")
    args = p.parse_args()
    import torch

    cases, model = CASES, "resnet18"
    if args.cpu:
        model = "cnn"
        gpus, cases = 2, [(strategy, "fp32") for strategy in ("single", "ddp", "fsdp")]
        print(f"torch {torch.__version__}, CPU (--cpu: fp32 on 2 gloo ranks; the GPU paths are not run)")
    elif not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (torch.cuda.is_available() is False); --cpu checks the script")
    else:
        gpus = torch.cuda.device_count()
        print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {gpus} x {torch.cuda.get_device_name(0)}, "
              f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}", flush=True)
    out = args.out or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(out, exist_ok=True)
    wanted = {c for c in args.only.split(",") if c}
    todo = [(s, p) for s, p in cases if not wanted or f"{s}-{p}" in wanted]
    for strategy, precision in todo:
        shutil.rmtree(os.path.join(out, f"{strategy}-{precision}"), ignore_errors=True)
    failed = 0
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(check, strategy, precision, args.steps, gpus, out, model): f"{strategy}-{precision}"
                   for strategy, precision in todo}
        for future in as_completed(futures):
            try:
                ok, what = future.result()
            except Exception as exc:  # a run that hung past its timeout, unreadable outputs: a failure
                ok, what = False, f"{type(exc).__name__}: {exc}"
            failed += not ok
            print(f"{'PASS' if ok else 'FAIL'} {futures[future]:12s} {what}", flush=True)
    print(f"{'all passed' if not failed else f'{failed} failed'}; runs and logs in {out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
