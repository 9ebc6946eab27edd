"""Checkpoint save/load speed of dist_train against plain torch.save/torch.load of the same state,
in the same run, at several state sizes; and the time a save blocks a real training run.

    .venv/bin/python benchmarks/checkpoint_bench.py [--sizes 5,100,1000] [--repeats 3] [--dir PATH]
    .venv/bin/python benchmarks/checkpoint_bench.py --smoke      # CI: smallest size, one round

One process, the single strategy, an ``mlp`` whose width gives about the requested MB of state
(model + AdamW moments, one optimizer step taken), and built-in models of many small tensors
(``--models``, default ``resnet18``: 122 model entries, 134 MB with its AdamW state). Both sides write to the same filesystem and
fsync (a checkpoint that is not on disk is not one). Rounds alternate which side goes first; medians.

- plain save: ``torch.save({"model", "optim"})`` to a new file, then fsync.
- dist_train save: everything a real checkpoint does: staging dir, RNG and meta files, DCP shards,
  checksums, manifest, fsyncs, rename, ``latest``, retention.
- plain load: ``torch.load(weights_only=True)`` + ``load_state_dict`` of model and optimizer.
- dist_train load: what a resume does: choose the newest checkpoint, verify every checksum (the DCP
  shards while they are read), DCP
  load, set model/optimizer/scheduler state, RNG, train state.
- first load: the same two, into a freshly built model and an optimizer that has no state yet, as
  in a process that has just started to resume; the load above goes into a model and optimizer
  that already hold state (a rollback, or a repeated load).
- new process (``--fresh N``, default 5; 1 with ``--smoke``): a user's resume, each side in a
  process of its own that builds the model and loads once (the first call of everything: torch's
  and dist_train's own caches are empty); the processes alternate, N of each; only the load is
  timed.
- async: the time training is blocked: ``save()`` (RNG states, meta.json's contents, the buffers'
  host copy) plus the wait before the next optimizer step for the copy of parameters and optimizer
  state that the writer thread makes during one forward and backward; how much longer that step
  took than a forward and backward alone; and the time until the background write is committed.

``--train`` (on unless ``--smoke``) also runs ``python -m dist_train`` (``mlp`` hidden 2048, AdamW,
one process, a save every 5 steps), synchronous and async, and compares ``summary.json``'s
checkpoint blocking time per save with a plain torch.save + fsync of the same model and
optimizer timed right after it. Timings on a shared machine are noisy: read the spread.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from dist_train.checkpoint import CheckpointManager, digest, retention  # noqa: E402
from dist_train.config import load_config, to_dict  # noqa: E402
from dist_train.data import build_datasets  # noqa: E402
from dist_train.env.cluster import detect  # noqa: E402
from dist_train.models import build_model  # noqa: E402
from dist_train.strategy import build_strategy  # noqa: E402
from dist_train.train.optim import make_optimizer_factory, make_scheduler_factory  # noqa: E402
from dist_train.train.state import TrainState  # noqa: E402

MB = 1e6
BATCH = 64  # the forward and backward an async save's copy overlaps: digits' default batch
MODEL_BATCH = 8  # the same for the vision models (a ResNet-18's at 64 takes 3 s on 2 cores)


def hidden_for(megabytes: float) -> int:
    """The ``mlp`` width on ``digits`` (64 inputs, 10 classes) whose model + AdamW state is about
    ``megabytes``: 3 fp32 copies (weights, two moments) of H^2 + 76 H + 10 parameters."""
    params = megabytes * MB / 12
    return max(8, int((-76 + math.sqrt(76 ** 2 + 4 * params)) / 2))


def build(overrides, trained: bool = True):
    """The job and its strategy; ``trained``: one optimizer step taken (AdamW state allocated),
    else a fresh model and an optimizer without state (a process about to resume)."""
    job = load_config(None, overrides)
    torch.manual_seed(0)
    info = data_info(job)
    strategy = build_strategy(job.strategy, detect(), torch.device("cpu"), "fp32")
    strategy.setup(build_model(job.model, info), make_optimizer_factory(job.train), make_scheduler_factory(job.train))
    if not trained:
        return job, strategy
    x = torch.randn(8, *info.input_shape)
    torch.nn.functional.cross_entropy(strategy.model(x), torch.randint(0, info.num_classes, (8,))).backward()
    strategy.step(1.0)  # AdamW state allocated
    return job, strategy


def data_info(job):
    return build_datasets(job.data)[2]


def mlp_case(megabytes: float):
    """(label, overrides) of the ``mlp`` with about ``megabytes`` of model + AdamW state."""
    hidden = hidden_for(megabytes)
    return f"mlp hidden {hidden}", ["model.name=mlp", "data.name=digits", f"model.hidden={hidden}"]


def model_case(name: str):
    """(label, overrides) of a built-in vision model on 32x32 images: many tensors (a ResNet-18's
    state is 62 parameters, 60 BatchNorm buffers and their AdamW state), most of them small."""
    return name, [f"model.name={name}", "data.name=synthetic_images", "data.synthetic_samples=256"]


def forward_backward(strategy, batch) -> None:
    """One training step's forward and backward (the work an async save's copy overlaps)."""
    x, y = batch
    strategy.backward(torch.nn.functional.cross_entropy(strategy.model(x), y))
    strategy.optimizer.zero_grad(set_to_none=True)


def state_bytes(strategy) -> int:
    total = sum(t.numel() * t.element_size() for t in strategy.model.state_dict().values())
    return total + sum(v.numel() * v.element_size() for s in strategy.optimizer.state.values()
                       for v in s.values() if torch.is_tensor(v))


def manager(job, strategy, run_dir):
    return CheckpointManager(job.checkpoint, run_dir, strategy, config=to_dict(job),
                             micro_global_batch=job.data.batch_size, grad_accum_steps=1, seed=0)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def plain_save(strategy, path: str) -> None:
    """``torch.save`` to a path (torch's own file writer, not Python's), then fsync."""
    torch.save({"model": strategy.model.state_dict(), "optim": strategy.optimizer.state_dict()}, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_load(strategy, path: str) -> None:
    sd = torch.load(path, weights_only=True)
    strategy.model.load_state_dict(sd["model"])
    strategy.optimizer.load_state_dict(sd["optim"])


def plain_first_load(overrides, path: str) -> float:
    """Seconds of ``plain_load`` into a freshly built model and optimizer (no state yet)."""
    _job, fresh = build(overrides, trained=False)
    try:
        return timed(lambda: plain_load(fresh, path))
    finally:
        fresh.teardown()


def dt_first_load(overrides, run_dir: str) -> float:
    """Seconds of a resume from ``run_dir`` into a freshly built model and optimizer (no state yet)."""
    job, fresh = build(overrides, trained=False)
    m = manager(job, fresh, run_dir)
    try:
        return timed(lambda: m.resume(TrainState()))
    finally:
        m.close()
        fresh.teardown()


def fresh_resume(kind: str, overrides: List[str], path: str) -> float:
    """Seconds of one load in a new process (``kind``: ``dist_train`` from the run dir ``path``, or
    ``plain`` from the file ``path``), into a model and optimizer that process has just built."""
    cmd = [sys.executable, os.path.abspath(__file__), "--resume-once", kind, path, json.dumps(overrides)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"the {kind} resume in a new process failed ({out.returncode}): {out.stderr[-2000:]}")
    return float(out.stdout.split()[-1])


def resume_once(kind: str, path: str, overrides: List[str]) -> None:
    """The body of ``fresh_resume``'s process: prints the seconds its one load took."""
    job, fresh = build(overrides, trained=False)
    if kind == "plain":
        print(timed(lambda: plain_load(fresh, path)))
        return
    m = manager(job, fresh, path)
    try:
        print(timed(lambda: m.resume(TrainState())))
    finally:
        m.close()


def bench_case(label: str, model_overrides: List[str], repeats: int, where: str, fresh: int = 0) -> Dict[str, float]:
    overrides = [*model_overrides, "strategy.name=single", "checkpoint.keep_last=2", "logging.mlflow.enabled=false"]
    job, strategy = build(overrides)
    res: Dict[str, List[float]] = {k: [] for k in ("plain_save", "dt_save", "plain_load", "dt_load", "plain_first",
                                                   "dt_first", "fwd_bwd", "async_block", "async_step", "async_total",
                                                   "dt_digest")}
    info = data_info(job)
    size = BATCH if job.model.name == "mlp" else MODEL_BATCH
    batch = torch.randn(size, *info.input_shape), torch.randint(0, info.num_classes, (size,))
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        plain = ""
        sync = manager(job, strategy, os.path.join(tmp, "sync"))
        asyn = manager(load_config(None, [*overrides, "checkpoint.async_save=true"]), strategy, os.path.join(tmp, "async"))
        try:
            for i in range(1, repeats + 1):
                # Each plain save to a new file (truncating the last one would be timed with it), the
                # old one removed and pruned checkpoints deleted outside the timed operations; the
                # side that goes first alternates from round to round.
                if plain:
                    os.unlink(plain)
                plain = os.path.join(tmp, f"plain{i}.pt")
                retention.wait_deleted()  # (pruned checkpoints: never during a timed operation)
                saves = [("plain_save", lambda: plain_save(strategy, plain)),
                         ("dt_save", lambda: sync.save(TrainState(step=i)))]
                loads = [("plain_load", lambda: plain_load(strategy, plain)),
                         ("dt_load", lambda: sync.resume(TrainState()))]
                for key, op in (saves + loads if i % 2 else saves[::-1] + loads[::-1]):
                    res[key].append(timed(op))
                    if key == "dt_save":  # the SHA-256 pass rank 0 runs after a commit, in the background
                        res["dt_digest"].append(timed(digest.wait))
                    retention.wait_deleted()
                res["plain_first"].append(plain_first_load(overrides, plain))
                res["dt_first"].append(dt_first_load(overrides, os.path.join(tmp, "sync")))
                res["fwd_bwd"].append(timed(lambda: forward_backward(strategy, batch)))
                # An async save as the loop makes one: save() returns after the buffers are copied;
                # the parameters and optimizer state are copied while the next forward and backward
                # run, and the next optimizer step waits for that (before_update).
                t0 = time.perf_counter()
                asyn.save(TrainState(step=i))
                saved = time.perf_counter()
                forward_backward(strategy, batch)
                gate = time.perf_counter()
                strategy.before_update()
                done = time.perf_counter()
                res["async_block"].append((saved - t0) + (done - gate))
                res["async_step"].append(done - t0)
                asyn.wait()
                res["async_total"].append(time.perf_counter() - t0)
                digest.wait()
            for _ in range(fresh):
                res.setdefault("dt_process", []).append(fresh_resume("dist_train", overrides, os.path.join(tmp, "sync")))
                res.setdefault("plain_process", []).append(fresh_resume("plain", overrides, plain))
        finally:
            sync.close()
            asyn.close()
    med = {k: statistics.median(v) for k, v in res.items()}
    med["bytes"] = state_bytes(strategy)
    med["label"] = label
    med["batch"] = size
    med["fresh"] = fresh
    med["spread"] = {k: (min(v), max(v)) for k, v in res.items()}
    return med


def print_size(m: Dict[str, float], repeats: int) -> None:
    size = m["bytes"] / MB
    rate = lambda s: f"{size / s:7.0f} MB/s"  # noqa: E731
    print(f"state {size:8.1f} MB ({m['label']}, AdamW), median of {repeats}")
    print(f"  save   plain torch.save+fsync {m['plain_save'] * 1e3:9.1f} ms {rate(m['plain_save'])} | dist_train "
          f"{m['dt_save'] * 1e3:9.1f} ms {rate(m['dt_save'])} | ratio {m['dt_save'] / m['plain_save']:.2f}x")
    print(f"         then the SHA-256 of every file, added to the manifest in the background after the commit: "
          f"{m['dt_digest'] * 1e3:.1f} ms more (not blocking; timed outside the save)")
    print(f"  load   plain torch.load       {m['plain_load'] * 1e3:9.1f} ms {rate(m['plain_load'])} | dist_train "
          f"{m['dt_load'] * 1e3:9.1f} ms {rate(m['dt_load'])} | ratio {m['dt_load'] / m['plain_load']:.2f}x"
          "  (dist_train verifies every checksum)")
    print(f"  first  load into a fresh model and optimizer: plain {m['plain_first'] * 1e3:9.1f} ms | dist_train "
          f"{m['dt_first'] * 1e3:9.1f} ms | ratio {m['dt_first'] / m['plain_first']:.2f}x  (both just built, in this process)")
    if "dt_process" in m:
        print(f"  new process: one load after building the model: plain {m['plain_process'] * 1e3:9.1f} ms | "
              f"dist_train {m['dt_process'] * 1e3:9.1f} ms | ratio {m['dt_process'] / m['plain_process']:.2f}x  "
              f"(a user's resume; median of {m['fresh']} each)")
    print(f"  async  blocks training {m['async_block'] * 1e3:9.1f} ms (in save() and waiting before the next update), "
          f"committed after {m['async_total'] * 1e3:9.1f} ms "
          f"| blocking / dist_train sync save {m['async_block'] / m['dt_save']:.2f}x, "
          f"/ plain save {m['async_block'] / m['plain_save']:.2f}x")
    extra = m["async_step"] - m["fwd_bwd"]
    print(f"         the step carrying it: forward+backward (batch {m['batch']}) {m['fwd_bwd'] * 1e3:.1f} ms alone, "
          f"{m['async_step'] * 1e3:.1f} ms with the save: +{extra * 1e3:.1f} ms "
          f"({extra / m['dt_save']:.2f}x the sync save: the writer thread's copy and write share the cores)")
    lo_hi = ", ".join(f"{k} {lo * 1e3:.0f}-{hi * 1e3:.0f}" for k, (lo, hi) in m["spread"].items())
    print(f"  spread (ms): {lo_hi}")


def train_blocking(where: str, hidden: int, steps: int, every: int, async_save: bool) -> Dict[str, float]:
    """One real training run (one process): summary.json's checkpoint blocking per save."""
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        run_dir = os.path.join(tmp, "run")
        cmd = [sys.executable, "-m", "dist_train", "model.name=mlp", "data.name=digits", f"model.hidden={hidden}",
               "strategy.name=single", f"train.max_steps={steps}",
               f"checkpoint.every_steps={every}", f"checkpoint.async_save={str(async_save).lower()}",
               "eval.every_steps=0", "logging.mlflow.enabled=false", f"run.dir={run_dir}"]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            raise RuntimeError(f"training run failed ({out.returncode}): {out.stderr[-2000:]}")
        with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
            ckpt = json.load(f)["checkpoint"]
        # blocking_s: training held up by saves (the end-of-run wait for the last write is final_s)
        return {"saves": ckpt["saves"], "blocking_per_save": ckpt["blocking_s"] / max(ckpt["saves"], 1),
                "final_s": ckpt.get("final_s", 0.0)}


def bench_training(where: str, hidden: int, repeats: int) -> None:
    job, strategy = build(["model.name=mlp", "data.name=digits", f"model.hidden={hidden}", "strategy.name=single",
                           "logging.mlflow.enabled=false"])
    rows = []
    for _ in range(repeats):
        sync = train_blocking(where, hidden, 20, 5, False)
        asyn = train_blocking(where, hidden, 20, 5, True)
        with tempfile.TemporaryDirectory(dir=where) as tmp:
            plain = statistics.median(timed(lambda: plain_save(strategy, os.path.join(tmp, "p.pt"))) for _ in range(3))
        rows.append((sync["blocking_per_save"], asyn["blocking_per_save"], plain, asyn["final_s"]))
    print(f"training run (mlp hidden {hidden}, AdamW, one process, 20 steps, save every 5; "
          f"{state_bytes(strategy) / MB:.1f} MB of state), {repeats} round(s):")
    for s, a, p, f in rows:
        print(f"  blocking per save: sync {s * 1e3:7.1f} ms ({s / p:.2f}x plain torch.save+fsync {p * 1e3:.1f} ms), "
              f"async {a * 1e3:7.1f} ms ({a / s:.2f}x the sync save; then {f * 1e3:.0f} ms at the end of the run "
              "until the last write is committed)")


def main() -> None:
    if sys.argv[1:2] == ["--resume-once"]:  # (fresh_resume's process)
        resume_once(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="5,100,1000", help="state sizes in MB, comma-separated (the mlp)")
    p.add_argument("--models", default="resnet18",
                   help="built-in models to measure as well, comma-separated ('' for none): many small tensors")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
    p.add_argument("--smoke", action="store_true", help="smallest size, one round, no training run (CI)")
    p.add_argument("--train", dest="train", action="store_true", default=None,
                   help="also measure the blocking time in a real training run (default unless --smoke)")
    p.add_argument("--no-train", dest="train", action="store_false")
    p.add_argument("--train-hidden", type=int, default=2048)
    p.add_argument("--fresh", type=int, default=None,
                   help="resumes in new processes per size, each side (default 5; 1 with --smoke; 0: none)")
    args = p.parse_args()
    try:
        sizes = sorted(float(s) for s in args.sizes.split(",") if s.strip())
    except ValueError:
        p.error(f"--sizes must be numbers of MB separated by commas; got {args.sizes!r}")
    if not sizes or min(sizes) <= 0:
        p.error("--sizes needs at least one size > 0")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.smoke:
        sizes, args.repeats, models = sizes[:1], 1, []
    fresh = (1 if args.smoke else 5) if args.fresh is None else args.fresh
    if fresh < 0:
        p.error("--fresh must be >= 0")
    train = (not args.smoke) if args.train is None else args.train
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    for label, overrides in [mlp_case(mb) for mb in sizes] + [model_case(name) for name in models]:
        print_size(bench_case(label, overrides, args.repeats, args.dir, fresh), args.repeats)
    if train:
        bench_training(args.dir, args.train_hidden, args.repeats)


if __name__ == "__main__":
    main()
