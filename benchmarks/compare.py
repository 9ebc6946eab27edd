"""dist_train against a hand-written PyTorch loop, Lightning Fabric and Accelerate, in one run.

    python benchmarks/compare.py                 # or: make bench   (3 alternating rounds, < 10 min on 2 cores)
    python benchmarks/compare.py --smoke         # 1 round, a few steps, the smallest sizes (CI)
    python benchmarks/compare.py --workloads lm-fsdp --runners dist_train,plain --rounds 5

Workloads (``workloads.py``), each on ``--nproc`` gloo ranks (2), fp32, AdamW:

- ``vision-ddp``: dist_train's ``resnet18`` on 3x32x32 synthetic images, batch 32 per rank, DDP;
- ``lm-fsdp``: ``gpt`` (4 layers, width 256, 4 heads, context 128, byte vocabulary), batch 8 per
  rank, FSDP2 (``fully_shard`` per block + root);
- ``lm-zero2``: the same ``gpt``, DeepSpeed ZeRO-2.

Runners: ``dist_train`` (``torchrun -m dist_train key=value ...``, as a user runs it; its
``samples_per_s`` read from ``summary.json``), ``plain`` (``ref_loops.py``), ``fabric``
(``peer_fabric.py``) and ``accelerate`` (``peer_accelerate.py``); the peers run where they have the
workload's parallelism (DDP, FSDP2), and are skipped with a clear note when not installed
(``pip install -e '.[bench]'``). Every round runs every runner once, in an order rotated each
round, so load from anything else on the machine falls on all runners alike; medians over rounds
and per-round paired ratios are reported. On a virtual machine a job during which the hypervisor
gave more than ``--max-steal`` of the cores' time to other guests is run again (``--retakes``).
Writes every number to a JSON file (``--out``).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import launch  # noqa: E402
import report  # noqa: E402
import workloads as wk  # noqa: E402

RUNNERS = report.RUNNERS
SCRIPTS = {"plain": "ref_loops.py", "fabric": "peer_fabric.py", "accelerate": "peer_accelerate.py"}
# Which runners have each workload's parallelism (Fabric and Accelerate: DDP and FSDP2 only).
SUPPORTS = {"dist_train": set(wk.WORKLOAD_NAMES), "plain": set(wk.WORKLOAD_NAMES),
            "fabric": {"vision-ddp", "lm-fsdp"}, "accelerate": {"vision-ddp", "lm-fsdp"}}
# The packages a runner (or a workload) needs, with what to tell the user when one is missing.
NEEDS = {"fabric": ("lightning", "Lightning Fabric is not installed: pip install -e '.[bench]'"),
         "accelerate": ("accelerate", "Accelerate is not installed: pip install -e '.[bench]'"),
         "lm-zero2": ("deepspeed", "DeepSpeed is not installed: pip install -e '.[deepspeed]'")}
FULL_STEPS = {"vision-ddp": 8, "lm-fsdp": 10, "lm-zero2": 10}  # each: 5 warm-up steps, the rest timed
SMOKE_STEPS = wk.WARMUP_STEPS + 2
RAN = {"ddp": "DDP", "fsdp": "FSDP2, fully_shard per block + root", "zero2": "DeepSpeed ZeRO-2"}


def missing(name: str) -> Optional[str]:
    """Why ``name`` (a runner or workload) cannot run here, or None."""
    need = NEEDS.get(name)
    if need is None or importlib.util.find_spec(need[0]) is not None:
        return None
    return need[1]


def make_plan(workloads: List[str], runners: List[str]) -> Tuple[Dict[str, List[str]], Dict[str, str]]:
    """``({workload: [runner, ...]}, {skipped name: why})``: what can run here, and what cannot."""
    plan: Dict[str, List[str]] = {}
    skipped: Dict[str, str] = {}
    for name in workloads:
        if missing(name):
            skipped[name] = missing(name)
            continue
        plan[name] = []
        for runner in runners:
            if name not in SUPPORTS[runner]:
                continue
            if missing(runner):
                skipped[runner] = missing(runner)
                continue
            plan[name].append(runner)
    return plan, skipped


def run_dist_train(wl: wk.Workload, steps: int, nproc: int, extra: List[str], timeout: float, tmp: str) -> Dict:
    run_dir = os.path.join(tmp, "run")
    args = ["-m", "dist_train", *wk.train_overrides(wl, steps), f"run.dir={run_dir}",
            # Progress lines every 5 steps (the warm-up boundary): wall rate and CPU per step are
            # measured at them (launch.py). MLflow off: its writer process would share the 2 cores (see docs).
            "logging.every_steps=5", "logging.progress_bar=auto", "logging.mlflow.enabled=false", *extra]
    job = launch.torchrun(args, nproc, timeout)
    out = {"peak_rss_mib": job.peak_rss_mib, "launch_s": job.seconds, "launch_cpu_s": job.cpu_s}
    summary_path = Path(run_dir) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if job.returncode != 0 or summary.get("status") != "completed" or not summary.get("samples_per_s"):
        return {**out, "ok": False, "error": f"exit {job.returncode}, summary {summary.get('status')}: "
                                              f"{summary.get('error', '')}\n{job.tail()}"}
    rate = summary["samples_per_s"]
    global_batch = wk.load_job(wl, steps).data.batch_size * summary["world_size"]
    out.update(ok=True, samples_per_s=rate, step_time_s=global_batch / rate, train_rss_mib=_last_rss(run_dir),
               **job.steady(wk.WARMUP_STEPS, global_batch),
               ran=f"dist_train strategy={summary['strategy']} ({RAN[wl.parallel]})")
    return out


def _last_rss(run_dir: str) -> Optional[float]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    values = [r["memory_rss_mib"] for r in records if r.get("memory_rss_mib") is not None]
    return values[-1] if values else None


def run_reference(runner: str, wl: wk.Workload, steps: int, nproc: int, smoke: bool, timeout: float,
                  tmp: str) -> Dict:
    result_path = os.path.join(tmp, "result.json")
    script = str(Path(__file__).with_name(SCRIPTS[runner]))
    args = [script, "--workload", wl.name, "--steps", str(steps), "--out", result_path, *(["--smoke"] if smoke else [])]
    job = launch.torchrun(args, nproc, timeout)
    out = {"peak_rss_mib": job.peak_rss_mib, "launch_s": job.seconds, "launch_cpu_s": job.cpu_s}
    if job.returncode != 0 or not os.path.exists(result_path):
        return {**out, "ok": False, "error": f"exit {job.returncode}{' (timed out)' if job.timed_out else ''}\n{job.tail()}"}
    result = json.loads(Path(result_path).read_text())
    return {**out, **result, **job.steady(wk.WARMUP_STEPS, result["global_batch"]), "ok": True}


def busy_cpu_s() -> Optional[float]:
    """CPU seconds all cores have spent busy inside this machine since boot, or None off Linux."""
    fields = launch.cpu_fields()
    if fields is None:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, _steal = fields
    return (user + nice + system + irq + softirq) / launch.TICK


def stolen_share(before: Optional[float], seconds: float) -> Optional[float]:
    """The share of the cores' time the hypervisor took over the last ``seconds`` (0 to 1)."""
    after = launch.steal_s()
    return None if before is None or after is None else launch.share_of_cores(after - before, seconds)


def own_cpu_s() -> float:
    """CPU seconds of this process and every job it has started and reaped."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def machine() -> Dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    return {"host": platform.node(), "cpu": model, "cores": os.cpu_count(), "memory_gib": round(mem, 1),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="1 round, a few steps, the smallest sizes")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; --smoke: 1)")
    p.add_argument("--steps", type=int, default=None, help=f"steps per run, the first {wk.WARMUP_STEPS} untimed "
                   f"(default: {FULL_STEPS}; --smoke: {SMOKE_STEPS})")
    p.add_argument("--workloads", default=",".join(wk.WORKLOAD_NAMES), help="comma-separated subset")
    p.add_argument("--runners", default=",".join(RUNNERS), help="comma-separated subset (dist_train is always run)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per job")
    p.add_argument("--timeout", type=float, default=300, help="seconds before one job is killed")
    p.add_argument("--dist-train-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra dist_train override, e.g. logging.mlflow.enabled=true (repeatable)")
    p.add_argument("--max-steal", type=float, default=0.1, metavar="SHARE",
                   help="run a job again when the hypervisor took more than this share of the cores' time "
                        "during it (steal, /proc/stat; default 0.1; 1 never)")
    p.add_argument("--retakes", type=int, default=2, help="at most this many reruns of one job (default 2)")
    p.add_argument("--out", default=str(launch.REPO / "runs" / "bench" / "compare.json"), help="result JSON")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.smoke else 3)
    for flag, names, known in (("--workloads", args.workloads, wk.WORKLOAD_NAMES), ("--runners", args.runners, RUNNERS)):
        chosen = [n for n in names.split(",") if n]
        bad = [n for n in chosen if n not in known]
        if bad or not chosen:
            p.error(f"{flag}: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(known)}")
    args.workloads = [n for n in wk.WORKLOAD_NAMES if n in args.workloads.split(",")]
    args.runners = ["dist_train"] + [n for n in RUNNERS[1:] if n in args.runners.split(",")]
    if args.steps is not None and args.steps <= wk.WARMUP_STEPS:
        p.error(f"--steps must exceed the {wk.WARMUP_STEPS} warm-up steps")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if not 0 <= args.max_steal <= 1 or args.retakes < 0:
        p.error("--max-steal is a share of the cores' time, 0 to 1; --retakes must be >= 0")
    return args


def run_job(runner: str, wl: wk.Workload, steps: int, args: argparse.Namespace) -> Dict:
    """One job of ``runner``, with the share of the cores' time the hypervisor took during its
    timed steps (during the whole job when it did not get that far)."""
    stolen_before = launch.steal_s()
    with tempfile.TemporaryDirectory(prefix="dist_train_bench_") as tmp:
        if runner == "dist_train":
            res = run_dist_train(wl, steps, args.nproc, args.dist_train_arg, args.timeout, tmp)
        else:
            res = run_reference(runner, wl, steps, args.nproc, args.smoke, args.timeout, tmp)
    # Over the timed steps (what the throughput comes from) where the job got that far; a burst
    # during them is diluted, or one during start-up counted, by the whole job's span.
    timed = res.pop("timed_steal", None)
    res["steal"] = timed if timed is not None else stolen_share(stolen_before, res["launch_s"])
    return res


def run_steady(job: Callable[[], Dict], max_steal: float, retakes: int, on_retake: Callable[[Dict], None]) -> Dict:
    """``job()``, run again (at most ``retakes`` times) while the hypervisor took more than
    ``max_steal`` of the cores' time during it: such a job measured the neighbours, not the runner.
    The last attempt is kept; the ones set aside are listed under ``"retaken"``."""
    set_aside: List[Dict] = []
    while True:
        res = job()
        steal = res.get("steal")
        if not res["ok"] or steal is None or steal <= max_steal or len(set_aside) >= retakes:
            break
        on_retake(res)
        set_aside.append({k: res.get(k) for k in ("steal", "samples_per_s", "cpu_s_per_step", "launch_s")})
    if set_aside:
        res["retaken"] = set_aside
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    started, load_start = time.perf_counter(), os.getloadavg()
    busy_start, own_start, steal_start = busy_cpu_s(), own_cpu_s(), launch.steal_s()
    plan, skipped = make_plan(args.workloads, args.runners)
    for name, why in skipped.items():
        print(f"SKIPPED {name}: {why}", flush=True)
    rounds: Dict[str, Dict[str, List[Dict]]] = {w: {r: [] for r in rs} for w, rs in plan.items()}
    for rnd in range(args.rounds):
        for name, runners in plan.items():
            wl = wk.workload(name, args.smoke)
            steps = args.steps or (SMOKE_STEPS if args.smoke else FULL_STEPS[name])
            shift = rnd % len(runners)
            for runner in runners[shift:] + runners[:shift]:  # a different runner first every round
                res = run_steady(lambda: run_job(runner, wl, steps, args), args.max_steal, args.retakes,
                                 lambda r: print(report.progress_line(rnd, args.rounds, name, runner, r) +
                                                 " -> retaken", flush=True))
                res.update(round=rnd, steps=steps)
                rounds[name][runner].append(res)
                print(report.progress_line(rnd, args.rounds, name, runner, res), flush=True)
    elapsed = time.perf_counter() - started
    busy_end = busy_cpu_s()
    # Other work on the machine, in cores on average over the run: what every core spent busy,
    # less what the benchmark and its jobs spent. The load average cannot say this (the
    # benchmark's own ranks keep it near the rank count). Time the hypervisor gave to other
    # guests (steal) is counted apart: no process here could have caused it.
    other_cores = None if busy_start is None or busy_end is None else \
        max(0.0, (busy_end - busy_start) - (own_cpu_s() - own_start)) / max(elapsed, 1e-9)
    result = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "machine": machine(), "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
              "other_work_cores": None if other_cores is None else round(other_cores, 3),
              "steal_share": (None if (share := stolen_share(steal_start, elapsed)) is None else round(share, 3)),
              "elapsed_s": round(elapsed, 1), "smoke": args.smoke, "rounds": args.rounds,
              "max_steal": args.max_steal, "nproc": args.nproc, "warmup_steps": wk.WARMUP_STEPS,
              "dist_train_extra": args.dist_train_arg,
              "skipped": skipped,
              "retaken_jobs": sum(1 for rs in rounds.values() for runs in rs.values() for run in runs
                                  if run.get("retaken")),
              "reruns": sum(len(run.get("retaken", [])) for rs in rounds.values() for runs in rs.values()
                            for run in runs),
              "workloads": {name: {"overrides": list(wk.workload(name, args.smoke).overrides),
                                   "runners": report.summarize(rounds[name])} for name in plan}}
    print(report.render(result))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"\nresults written to {args.out}")
    failed = [f"{w}/{r}" for w, rs in rounds.items() for r, runs in rs.items() if not all(x["ok"] for x in runs)]
    if failed:
        print(f"FAILED runs: {', '.join(failed)} (errors are in the JSON file)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
