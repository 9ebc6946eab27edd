"""torchrun with the config checked first, and one message when a worker fails.

    python -m dist_train.launch --nproc_per_node=N [torchrun options] [--config FILE] [key=value ...]
    (console script: dist-train-launch)

torchrun (torch.distributed.run) counts every worker that exits non-zero as a failure: it logs
the worker's exit, raises ``ChildFailedError`` (a screen of launcher traceback) and exits 1,
whatever the worker meant by its exit code. A bad config under plain torchrun therefore shows the
worker's one-paragraph message followed by that traceback, and exits 1 instead of 2 (and with
``--max-restarts`` it is retried K times first). No exit code of a worker avoids this: 0 is
success, anything else is a failure. So this wrapper:

1. validates the config and this machine once, before any worker starts, as rank 0 of the world
   torchrun is about to create (WORLD_SIZE = nodes x processes per node, so checks that depend on
   the world size, such as ``strategy.name=single`` or DeepSpeed's batch arithmetic, run too): a bad
   config exits 2 with the one message of ``python -m dist_train --check``;
2. runs torchrun in this process with ``-m dist_train`` and the same arguments; when a worker
   fails it prints one line in place of the launcher traceback and exits with the first failed
   worker's own exit code (2 bad config or checkpoint refused, 3 preempted, 1 failed; 128+N for a
   worker killed by signal N), so a scheduler can tell a preemption from a crash.

Torchrun options are told from dist_train's by torchrun's own option table; the first argument
that is not a torchrun option starts dist_train's arguments.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

EXIT_USAGE = 2
# Options that choose what torchrun starts: this wrapper always starts `-m dist_train`.
_ENTRYPOINT_OPTIONS = {"-m", "--module", "--no-python", "--no_python", "--run-path", "--run_path"}


def _torchrun_parser():
    from torch.distributed.run import get_args_parser

    return get_args_parser()


def split_args(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``(torchrun options, dist_train arguments)``: leading options torchrun knows (with their
    values) go to torchrun; the rest, from the first argument it does not know, to dist_train."""
    takes_value: Dict[str, bool] = {}
    for action in _torchrun_parser()._actions:  # argparse has no public option table
        for name in action.option_strings:
            if name not in ("-h", "--help"):  # -h shows dist_train's help (and this wrapper's)
                takes_value[name] = action.nargs != 0
    i = 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name not in takes_value:
            break
        i += 2 if takes_value[name] and "=" not in argv[i] else 1
    return list(argv[:i]), list(argv[i:])


def world_of(launch_args) -> Tuple[int, int]:
    """``(world size, processes per node)`` torchrun will start (the minimum number of nodes when
    the node count is elastic, MIN:MAX)."""
    from torch.distributed.run import determine_local_world_size, parse_min_max_nnodes

    min_nodes, _max_nodes = parse_min_max_nnodes(str(launch_args.nnodes))
    per_node = determine_local_world_size(str(launch_args.nproc_per_node))
    return int(min_nodes) * per_node, per_node


@contextlib.contextmanager
def _as_rank0(world: int, per_node: int) -> Iterator[None]:
    """The environment torchrun's rank 0 will see, for the duration of the check."""
    new = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(per_node)}
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _backend(job_args: Sequence[str]) -> str:
    """The job's ``dist.backend`` (its config was checked already)."""
    from dist_train import cli
    from dist_train.config import load_config

    ns = cli._parser().parse_args(list(job_args))
    return load_config(ns.config, ns.overrides).dist.backend


def _more_ranks_than_gpus(per_node: int, backend: str = "auto") -> str:
    """Why ``per_node`` ranks cannot run on this node's GPUs, or "": each rank trains on the GPU
    of its local rank, and NCCL refuses two ranks on one GPU ("Duplicate GPU detected") once every
    rank has started; gloo (``dist.backend=gloo``) lets ranks share one. (Under SLURM's one GPU per
    task each task sees one device: srun starts those, not this launcher.)"""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus or per_node <= gpus or backend == "gloo":
        return ""
    return (f"--nproc_per_node={per_node} starts {per_node} ranks on this node, which has {gpus} GPU(s) "
            f"visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): one rank per GPU, "
            f"so --nproc_per_node={gpus} or fewer (NCCL refuses two ranks on one GPU)")


def _exit_code(failure_code: int) -> int:
    """A worker's exit code as a shell reports it (a signal N as 128 + N)."""
    return 128 - failure_code if failure_code < 0 else failure_code


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dist_train import cli

    argv = sys.argv[1:] if argv is None else list(argv)
    launch, job_args = split_args(argv)
    if any(a in ("-h", "--help", "--print-config") for a in job_args):
        if any(a in ("-h", "--help") for a in job_args):
            print("usage: python -m dist_train.launch [torchrun options] [--config FILE] [key=value ...]\n"
                  "Checks the config once, then runs torchrun ... -m dist_train with the same arguments.\n")
        return cli.main(job_args)
    bad = sorted(set(a.split("=", 1)[0] for a in launch) & _ENTRYPOINT_OPTIONS)
    if bad:
        print(f"dist_train.launch: error: {', '.join(bad)}: this launcher always runs -m dist_train", file=sys.stderr)
        return EXIT_USAGE
    parser = _torchrun_parser()
    args = parser.parse_args([*launch, "-m", "dist_train", *job_args])  # bad options: usage, exit 2
    try:
        world, per_node = world_of(args)
    except (ValueError, RuntimeError) as exc:  # torchrun's own parsers raise both
        print(f"dist_train.launch: error: --nnodes/--nproc_per_node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with _as_rank0(world, per_node):
        code = cli.main(["--check", *job_args], record_refusal=True)  # (summary.json: never an older outcome)
    if code != 0:
        return code
    problem = _more_ranks_than_gpus(per_node, _backend(job_args))
    if problem:
        print(f"dist_train.launch: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    _graceful_defaults(args, launch)
    return _run_torchrun(args, _summary_path(job_args))


# Signals torchrun forwards to its workers (its default list, plus SLURM's --signal=USR1@T: without
# it torchrun dies of SIGUSR1 and leaves its workers behind), and how long it waits for them to
# exit after forwarding one before it kills them (torchrun's default, 30 s, is less than a large
# checkpoint takes: the preemption checkpoint was lost).
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
SHUTDOWN_TIMEOUT_S = 300


def _graceful_defaults(args, launch: Sequence[str]) -> None:
    """Our defaults for the options above, unless given on the command line (or torchrun's own
    environment variable for the timeout)."""
    given = {a.split("=", 1)[0].replace("_", "-") for a in launch}
    # (torch before 2.9 has neither option: its torchrun dies of SIGUSR1 and gives 30 s)
    if "--signals-to-handle" not in given and hasattr(args, "signals_to_handle"):
        args.signals_to_handle = FORWARDED_SIGNALS
    if ("--shutdown-timeout" not in given and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ
            and hasattr(args, "shutdown_timeout")):
        # (slurm/train.sbatch's knob, read here: as a torchrun option it would break an older torch)
        args.shutdown_timeout = int(os.environ.get("DIST_TRAIN_SHUTDOWN_TIMEOUT") or SHUTDOWN_TIMEOUT_S)


def _summary_path(job_args: Sequence[str]) -> Optional[str]:
    """Where the job's summary.json will be (None when the arguments do not load: the check said why)."""
    from dist_train import cli
    from dist_train.config import load_config

    try:
        parsed, _unknown = cli._parser().parse_known_intermixed_args(list(job_args))
        return os.path.join(load_config(parsed.config, parsed.overrides).run.dir, "summary.json")
    except Exception:  # noqa: BLE001
        return None


def _preempted(summary: Optional[str], since: float) -> bool:
    """Whether this launch's run wrote a summary.json that says it was preempted."""
    import json

    try:
        if summary is None or os.path.getmtime(summary) < since:
            return False
        with open(summary, encoding="utf-8") as f:
            return json.load(f).get("status") == "preempted"
    except (OSError, ValueError, AttributeError):
        return False


def _run_torchrun(args, summary: Optional[str] = None) -> int:
    """torchrun's ``run`` (not its ``main``, whose decorator is what turns a failed worker into a
    logged traceback); a failed worker becomes one line and its own exit code. A run that was
    preempted exits 3 however torchrun ended: stopped by the signal itself, or by its workers
    (``keep_launcher_from_restarting``)."""
    import time

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    from dist_train.env.preemption import EXIT_PREEMPTED

    started = time.time()
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = _exit_code(failure.exitcode)
        print(f"dist_train.launch: rank {rank} failed first, with exit code {failure.exitcode} (its message is "
              f"above); exiting {code}", file=sys.stderr)
        return code
    except SignalException as exc:
        if _preempted(summary, started):
            print(f"dist_train.launch: stopped by signal {exc.sigval.name} after the run was preempted "
                  f"(checkpoint saved); exiting {EXIT_PREEMPTED}", file=sys.stderr)
            return EXIT_PREEMPTED
        print(f"dist_train.launch: stopped by signal {exc.sigval.name}", file=sys.stderr)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    from dist_train.env.shutdown import exit_process

    exit_process(main())
