"""The checks of ``python -m dist_train.doctor``, one function each.

Every check runs on every rank and returns a picklable local observation (a dict); the doctor
gathers them and turns the list (index = rank) into a verdict with :func:`judge_*`. A check that
raises on one rank records the error instead, so every rank still reaches every collective.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist

from dist_train.data.loader import batch_too_large
from dist_train.env.cluster import ClusterEnv

Verdict = Tuple[bool, str]  # passed, one-line detail
HTTP_TIMEOUT_S = 5.0
MAX_SKEW_S = 2.0
ALLREDUCE_MIB = 16


def _group() -> bool:
    return dist.is_available() and dist.is_initialized()


def errors_by_message(per_rank: List[Any], key: str = "error") -> str:
    """``rank(s) 0, 1: <message>; rank 2: <other>`` for the ranks whose observation holds ``key``."""
    ranks_of: Dict[str, List[int]] = {}
    for rank, r in enumerate(per_rank):
        if isinstance(r, dict) and key in r:
            ranks_of.setdefault(r[key], []).append(rank)
    return "; ".join(f"rank(s) {', '.join(map(str, ranks))}: {msg}" for msg, ranks in ranks_of.items())


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# --- versions -----------------------------------------------------------------------------------

def versions() -> Dict[str, str]:
    def dist_version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    nccl = "-"
    if torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    return {"python": sys.version.split()[0], "torch": torch.__version__, "CUDA": torch.version.cuda or "-",
            "NCCL": nccl, "DeepSpeed": dist_version("deepspeed"), "dist_train": dist_version("dist_train")}


def judge_versions(per_rank: List[Dict[str, str]]) -> Verdict:
    differ = [key for key in per_rank[0] if len({r[key] for r in per_rank}) > 1]
    if differ:
        parts = [f"{key}: " + ", ".join(f"rank {i} {r[key]}" for i, r in enumerate(per_rank)) for key in differ]
        return False, "ranks differ: " + "; ".join(parts)
    first = per_rank[0]
    return True, ", ".join(f"{k} {first[k]}" for k in ("torch", "CUDA", "NCCL", "DeepSpeed")) + \
        f" on all {len(per_rank)} rank(s)"


# --- all-reduce ---------------------------------------------------------------------------------

def all_reduce(device: torch.device, cluster: ClusterEnv, mib: int = ALLREDUCE_MIB, iters: int = 5) -> Dict[str, Any]:
    """Sum a ``mib`` MiB fp32 tensor over all ranks; check the result; time it (bus bandwidth as
    nccl-tests define it: bytes * 2 (n-1) / n per second)."""
    if not _group():
        return {"skipped": "single process: no collective to test"}
    x = torch.full((mib * 2**20 // 4,), float(cluster.rank + 1), device=device)
    dist.all_reduce(x)  # warm-up (connections, NCCL communicators)
    want = cluster.world_size * (cluster.world_size + 1) / 2  # 1 + 2 + ... + n
    correct = bool(torch.all(x == want).item())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    sync()
    seconds = (time.perf_counter() - t0) / iters
    n = cluster.world_size
    return {"correct": correct, "seconds": seconds, "busbw": x.numel() * 4 * 2 * (n - 1) / n / seconds, "mib": mib}


def judge_all_reduce(per_rank: List[Dict[str, Any]]) -> Verdict:
    first = per_rank[0]
    if "skipped" in first:
        return True, first["skipped"]
    wrong = [i for i, r in enumerate(per_rank) if not r["correct"]]
    if wrong:
        return False, f"wrong sum on rank(s) {wrong}"
    slowest = min(r["busbw"] for r in per_rank)
    return True, f"bus bandwidth {slowest / 1e9:.2f} GB/s ({first['mib']} MiB fp32, {first['seconds'] * 1e3:.1f} ms)"


# --- run directory --------------------------------------------------------------------------------

def checkpoint_bytes(job, info) -> int:
    """Bytes of one checkpoint: fp32 parameters + AdamW's two moments (built on the meta device)."""
    from dist_train.models import build_model, count_parameters

    with torch.device("meta"):
        model = build_model(job.model, info)
    return count_parameters(model) * 4 * 3


def write_probe(path: str, cluster: ClusterEnv, token: str) -> Dict[str, Any]:
    """Create the run dir and write + fsync a probe file in it (removed by :func:`cleanup_run_dir`)."""
    try:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, f".doctor.rank{cluster.rank}"), "w") as f:
            f.write(token)
            f.flush()
            os.fsync(f.fileno())
        return {"free": shutil.disk_usage(path).free}
    except OSError as exc:
        return {"error": f"{exc.strerror or exc}: {exc.filename or path}"}


def read_probe(path: str, cluster: ClusterEnv, token: str, written: Dict[str, Any]) -> Dict[str, Any]:
    """After every rank wrote (a barrier): does this rank see rank 0's probe, i.e. the same folder?"""
    if "error" in written or cluster.rank == 0:
        return dict(written, sees_rank0=True)
    try:
        with open(os.path.join(path, ".doctor.rank0")) as f:
            return dict(written, sees_rank0=f.read() == token)
    except OSError:
        return dict(written, sees_rank0=False)


def cleanup_run_dir(path: str, cluster: ClusterEnv) -> None:
    try:
        os.remove(os.path.join(path, f".doctor.rank{cluster.rank}"))
    except OSError:
        pass


def judge_run_dir(per_rank: List[Dict[str, Any]], path: str, need: int) -> Verdict:
    if any("error" in r for r in per_rank):
        return False, f"{path} is not writable: " + errors_by_message(per_rank)
    blind = [i for i, r in enumerate(per_rank) if not r["sees_rank0"]]
    if blind:
        return False, f"rank(s) {blind} do not see rank 0's files in {path}: the run dir must be a shared filesystem"
    free = min(r["free"] for r in per_rank)
    if need and free < 2 * need:
        return False, f"{path}: {_gib(free)} free, two checkpoints need {_gib(2 * need)} ({_gib(need)} each)"
    room = f"; two checkpoints need {_gib(2 * need)}" if need else ""
    return True, f"{path} writable from every rank, {_gib(free)} free{room}"


# --- dataset, batch sizes, devices ------------------------------------------------------------------

def dataset(job) -> Dict[str, Any]:
    from dist_train.data import build_datasets

    try:
        train, held_out, info = build_datasets(job.data)
    except Exception as exc:  # noqa: BLE001 - any builder error is this check's verdict
        return {"error": f"{type(exc).__name__}: {exc}", "info": None}
    return {"train": len(train), "eval": len(held_out), "info": info}


def judge_dataset(per_rank: List[Dict[str, Any]], name: str) -> Verdict:
    if any("error" in r for r in per_rank):
        return False, f"{name}: " + errors_by_message(per_rank)
    return True, f"{name}: {per_rank[0]['train']} train / {per_rank[0]['eval']} held-out samples on every rank"


def layout(cluster: ClusterEnv) -> Dict[str, Any]:
    return {"rank": cluster.rank, "world": cluster.world_size, "local": cluster.local_world_size,
            "nodes": cluster.num_nodes, "host": socket.gethostname()}


def judge_batches(per_rank: List[Dict[str, Any]], job, train_samples: int) -> Verdict:
    world = per_rank[0]["world"]
    ranks = sorted(r["rank"] for r in per_rank)
    if ranks != list(range(len(per_rank))) or any(r["world"] != world for r in per_rank):
        return False, f"ranks {ranks} do not form a world of size {world} on every rank"
    hosts = {r["host"] for r in per_rank}
    global_batch = job.data.batch_size * world * job.train.grad_accum_steps
    # The loader's own rule (its micro-batches run on across epochs: accumulation may span them).
    problem = batch_too_large(job.data.batch_size, world, train_samples) if train_samples else ""
    if problem:
        return False, problem
    return True, (f"world {world} on {len(hosts)} host(s); global batch {global_batch} = {job.data.batch_size} "
                  f"x {world} rank(s) x {job.train.grad_accum_steps} accumulation step(s)")


def gpus(device: torch.device, cluster: ClusterEnv) -> Dict[str, Any]:
    if device.type != "cuda":
        return {"cuda": False}
    return {"cuda": True, "host": socket.gethostname(), "count": torch.cuda.device_count(),
            "uuid": str(torch.cuda.get_device_properties(device).uuid), "local": cluster.local_world_size}


def judge_gpus(per_rank: List[Dict[str, Any]]) -> Verdict:
    if not per_rank[0]["cuda"]:
        return True, "no CUDA: CPU ranks with gloo"
    seen: Dict[Tuple[str, str], int] = {}
    for rank, r in enumerate(per_rank):
        if (r["host"], r["uuid"]) in seen:
            return False, f"ranks {seen[(r['host'], r['uuid'])]} and {rank} share GPU {r['uuid']} on {r['host']}"
        seen[(r["host"], r["uuid"])] = rank
    # Fewer GPUs than local ranks shows up above (rank i takes GPU local_rank % count).
    counts = {f"{r['count']} GPU(s) for {r['local']} local rank(s)" for r in per_rank}
    return True, "; ".join(sorted(counts)) + ", a GPU of its own for every rank"


# --- MLflow, clocks ---------------------------------------------------------------------------------

def mlflow(cfg, run_dir_path: str) -> Verdict:
    """Rank 0 only: a sqlite store's folder is writable, or an http server answers its health check."""
    if not cfg.enabled:
        return True, "disabled (logging.mlflow.enabled=false)"
    uri = cfg.tracking_uri or f"sqlite:///{os.path.abspath(os.path.join(run_dir_path, 'mlflow.db'))}"
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HTTP_TIMEOUT_S) as response:
                return True, f"{uri} answered ({response.status})"
        except urllib.error.HTTPError as exc:  # it answered, with an error page: a server is there
            return exc.code < 500, f"{uri} answered HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            return False, f"{uri} does not answer within {HTTP_TIMEOUT_S:.0f} s: {getattr(exc, 'reason', exc)}"
    if uri.startswith(("sqlite:///", "file:")):
        # sqlite:///<path of the db file>; file:<folder of the store>
        folder = os.path.dirname(uri[len("sqlite:///"):]) if uri.startswith("sqlite") else urllib.parse.urlparse(uri).path
        existing = os.path.abspath(folder or ".")
        while not os.path.exists(existing):  # the nearest existing parent decides
            existing = os.path.dirname(existing)
        if os.path.isdir(existing) and os.access(existing, os.W_OK):
            return True, f"{uri} (folder writable)"
        return False, f"{uri}: {folder} is not a writable folder"
    return True, f"{uri}: not checked (only http, sqlite and file stores are)"


def clock(cluster: ClusterEnv, rounds: int = 3) -> Dict[str, Any]:
    if not _group():
        return {"skipped": True}
    samples = []
    for _ in range(rounds):
        dist.barrier()
        samples.append(time.time())
    return {"host": socket.gethostname(), "times": samples}


def judge_clock(per_rank: List[Dict[str, Any]], max_skew_s: float = MAX_SKEW_S) -> Verdict:
    if per_rank[0].get("skipped"):
        return True, "single process"
    hosts = {r["host"] for r in per_rank}
    if len(hosts) == 1:
        return True, "one host: one clock"
    # The smallest spread over the rounds: scheduling delays after a barrier only add to it.
    skew = min(max(r["times"][i] for r in per_rank) - min(r["times"][i] for r in per_rank)
               for i in range(len(per_rank[0]["times"])))
    return skew <= max_skew_s, f"{skew:.3f} s across {len(hosts)} hosts (limit {max_skew_s:g} s)"
