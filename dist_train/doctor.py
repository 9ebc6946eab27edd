"""``python -m dist_train.doctor``: check a machine, or a whole allocation, before training on it.

    python -m dist_train.doctor [--config FILE] [key=value ...]
    torchrun --nproc_per_node=N -m dist_train.doctor [--config FILE] [key=value ...]
    srun python -m dist_train.doctor [--config FILE] [key=value ...]

The same config and overrides as training (so it checks the run dir, dataset and MLflow store the
job will use). Every rank runs every check (dist_train/doctor_checks.py); rank 0 prints one table.
Exit 0 when every check passes, 1 when one fails, 2 for bad usage or a bad config.
"""
from __future__ import annotations

import argparse
import logging
import sys
import uuid
from typing import Any, Callable, List, Optional, Tuple

import torch.distributed as dist

from dist_train import doctor_checks as checks
from dist_train.config import ConfigError, load_config
from dist_train.env.cluster import ClusterEnv, detect

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
Row = Tuple[str, bool, str]
log = logging.getLogger("dist_train.doctor")


def _gather(obj: Any) -> List[Any]:
    """Every rank's ``obj``, indexed by rank (just ``[obj]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _local(fn: Callable, *args: Any) -> Any:
    """Run one rank's part of a check; an exception becomes the observation, so no rank skips a
    collective that the others enter."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return {"exception": f"{type(exc).__name__}: {exc}"}


def _judge(name: str, per_rank: List[Any], judge: Callable, *args: Any) -> Row:
    if any(isinstance(r, dict) and "exception" in r for r in per_rank):
        return name, False, checks.errors_by_message(per_rank, "exception")
    try:
        ok, detail = judge(per_rank, *args)
    except Exception as exc:  # noqa: BLE001 - a judge that cannot decide fails its check
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    return name, ok, detail


def run_checks(job, cluster: ClusterEnv, device) -> List[Row]:
    """Every check, in an order where each collective is entered by every rank."""
    rows: List[Row] = [_judge("versions", _gather(_local(checks.versions)), checks.judge_versions),
                       _judge("all-reduce", _gather(_local(checks.all_reduce, device, cluster)), checks.judge_all_reduce)]

    data = _local(checks.dataset, job)
    info = data.pop("info", None)
    data_all = _gather(data)
    rows.append(_judge("dataset", data_all, checks.judge_dataset, job.data.name))
    train_samples = min((d.get("train", 0) for d in data_all), default=0)
    rows.append(_judge("batch sizes", _gather(_local(checks.layout, cluster)), checks.judge_batches, job, train_samples))

    # Two checkpoints must fit: fp32 weights + AdamW moments, from the model built on meta.
    need = _local(checks.checkpoint_bytes, job, info) if info is not None else 0
    need = need if isinstance(need, int) else 0
    token = _gather(uuid.uuid4().hex)[0]  # rank 0's
    written = checks.write_probe(job.run.dir, cluster, token)
    _gather(None)  # a barrier: every probe is on disk before anyone looks for rank 0's
    seen = _gather(checks.read_probe(job.run.dir, cluster, token, written))
    checks.cleanup_run_dir(job.run.dir, cluster)
    rows.append(_judge("run dir", seen, checks.judge_run_dir, job.run.dir, need))

    rows.append(_judge("GPUs", _gather(_local(checks.gpus, device, cluster)), checks.judge_gpus))
    mlflow = _local(checks.mlflow, job.logging.mlflow, job.run.dir) if cluster.is_rank0 else None
    mlflow = _gather(mlflow)[0]  # only rank 0 logs to MLflow: its view is the one that counts
    rows.append(("MLflow", *mlflow) if isinstance(mlflow, tuple) else ("MLflow", False, mlflow["exception"]))
    rows.append(_judge("clock skew", _gather(_local(checks.clock, cluster)), checks.judge_clock))
    return rows


def format_table(rows: List[Row], cluster: ClusterEnv) -> str:
    width = max(len(name) for name, _, _ in rows)
    lines = [f"dist_train doctor: {cluster.world_size} rank(s) on {cluster.num_nodes} node(s) ({cluster.source})",
             f"{'CHECK'.ljust(width)}  RESULT  DETAIL"]
    lines += [f"{name.ljust(width)}  {'ok' if ok else 'FAIL':6}  {detail}" for name, ok, detail in rows]
    failed = [name for name, ok, _ in rows if not ok]
    lines.append(f"{len(failed)} check(s) failed: {', '.join(failed)}" if failed else f"all {len(rows)} checks passed")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dist_train.doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML preset merged over the defaults, as for training")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, as for training")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    cluster = detect()
    args, unknown = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    say = (lambda msg: print(msg, file=sys.stderr)) if cluster.is_rank0 else (lambda msg: None)
    if unknown:
        say(f"dist_train.doctor: error: unknown option(s) {' '.join(unknown)}; see --help")
        return EXIT_USAGE
    try:
        job = load_config(args.config, args.overrides)
        from dist_train.preflight import preflight

        preflight(job, cluster, machine=False)  # the run dir and the data are checks of the table
    except ConfigError as exc:
        say(f"dist_train.doctor: error: bad config: {exc.key}: {exc.reason}")
        return EXIT_USAGE
    from dist_train.env.process_group import process_group
    from dist_train.logging.console import setup_console

    setup_console(cluster, job.logging.level)
    try:
        with process_group(cluster, init_timeout_s=job.dist.init_timeout_s, backend=job.dist.backend) as device:
            rows = run_checks(job, cluster, device)
    except Exception as exc:  # the group never formed, or a collective broke: that is the finding
        rows = [("process group", False, f"rank {cluster.rank}: {type(exc).__name__}: {exc}")]
        print(format_table(rows, cluster), flush=True)  # every rank: rank 0 may be the one that is missing
        return EXIT_FAILED
    if cluster.is_rank0:
        print(format_table(rows, cluster), flush=True)
    return EXIT_OK if all(ok for _, ok, _ in rows) else EXIT_FAILED


if __name__ == "__main__":
    from dist_train.env.shutdown import exit_process

    exit_process(main())
