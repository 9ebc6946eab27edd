"""Command line: argv -> config -> preflight -> run; exit codes of the contract.

    python -m dist_train [--config FILE] [--print-config] [--check] [key=value ...]

Exit 0 on success, 2 on bad usage or bad config (one paragraph naming the key, no traceback,
printed once: by rank 0; see ``_usage_error``), any other non-zero for a failed run.
"""
from __future__ import annotations

import argparse
import re
import sys
import textwrap
import time
from typing import List, Optional

from dist_train.config import ConfigError, describe_fields, load_config, to_yaml
from dist_train.env.cluster import ClusterEnv, detect

EXIT_OK, EXIT_USAGE = 0, 2


def _help_text() -> str:
    lines = [
        "usage: python -m dist_train [--config FILE] [--print-config] [--check] [key=value ...]",
        "       torchrun --nproc_per_node=N -m dist_train [--config FILE] [key=value ...]",
        "",
        "Train with the built-in defaults, a YAML preset (--config) and key=value overrides",
        "(merged in that order). Exit codes: 0 success, 2 bad usage or config, 3 preempted",
        "(checkpoint saved: rerun to resume), 130 Ctrl-C, other: failed run.",
        "",
        "options:",
        "  --config FILE     YAML preset merged over the defaults",
        "  --print-config    print the resolved config and exit",
        "  --check           validate config and environment (exit 0 or 2), train nothing",
        "  -h, --help        this text",
        "",
        "config keys (default: meaning):",
    ]
    for key, default, help_ in describe_fields():
        lines.append(f"  {key} = {default!r}")
        lines.append(textwrap.indent(textwrap.fill(help_, 90), "      "))
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist_train", add_help=False)
    p.add_argument("--config", default=None)
    p.add_argument("--print-config", action="store_true")
    p.add_argument("--check", action="store_true")
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("overrides", nargs="*")
    return p


# How long another rank with the same bad input waits for its launcher to stop it (rank 0 found
# the same problem, printed it and exited) before it prints the problem itself.
_USAGE_GRACE_S = 5.0


def _usage_error(message: str, cluster: ClusterEnv) -> int:
    """Print ``message`` once for the whole job, and return exit code 2.

    Every rank checks the same command line, so rank 0 prints. The other ranks must not exit
    first: a launcher stops the ranks that are still running when one fails, and rank 0 could be
    stopped before it printed (torchrun does, within 0.1 s). So they wait, and are normally
    stopped by their launcher once rank 0 has exited; one whose problem rank 0 does not share (a
    check of this rank's own machine) prints it itself after the wait, naming its rank."""
    if cluster.is_rank0:
        print(f"dist_train: error: {message}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    time.sleep(_USAGE_GRACE_S)
    print(f"dist_train: error (rank {cluster.rank}): {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def _what_to_fix(exc: ConfigError) -> str:
    if exc.key.startswith("-"):  # (--config: the option itself, not a key)
        return f"Fix the {exc.key} option"
    if exc.reason.startswith("overrides are written"):
        return "Fix the override"
    if exc.reason.startswith("unknown key"):
        return "Fix the name in the YAML preset or the override"
    return f"Fix it in the YAML preset or override it with {_override_hint(exc.key)}"


def _override_hint(key: str) -> str:
    """How to override ``key`` on the command line: a list item (``data.augment[1]``) is set by
    giving the whole list (an override of one item is refused)."""
    key = key.split(" ")[0]
    whole = re.sub(r"(\[\d+\])+$", "", key)
    return f"{whole}=[...] (the whole list)" if whole != key else f"{key}=VALUE"


def _record_refused(job, args, cluster: ClusterEnv, exc: ConfigError) -> None:
    """summary.json of a run refused for its config, in its run dir if that exists (a run dir's
    summary never tells of an older attempt). When the config itself did not load, the run dir is
    taken from the preset and the ``run.*`` overrides alone, if those load."""
    from dist_train.train.job import record_refused

    partial = job is None
    if partial:
        try:
            job = load_config(args.config, [o for o in args.overrides if o.strip().startswith("run.")])
        except (ConfigError, OSError):
            return
    record_refused(job, cluster, exc, partial=partial)


def main(argv: Optional[List[str]] = None, record_refusal: Optional[bool] = None) -> int:
    """``python -m dist_train``. ``record_refusal``: a config refused writes summary.json into the
    run dir, if that exists (default: unless --check or --print-config; dist_train.launch's check
    records it, as the run it stands for would)."""
    argv = sys.argv[1:] if argv is None else argv
    cluster = detect()
    # Intermixed: overrides may come before and after options (launch/deepspeed.sh puts its own first).
    args, unknown = _parser().parse_known_intermixed_args(argv)
    if args.help:
        if cluster.is_rank0:
            sys.stdout.write(_help_text())
        return EXIT_OK
    if unknown:
        return _usage_error(f"unknown option(s) {' '.join(unknown)}; see --help", cluster)
    job = None
    try:
        job = load_config(args.config, args.overrides)
        if args.print_config:
            if cluster.is_rank0:
                sys.stdout.write(to_yaml(job))
            return EXIT_OK
        from dist_train.preflight import preflight

        preflight(job, cluster)
        if args.check:
            if cluster.is_rank0:
                print(f"dist_train: config OK (run dir {job.run.dir})")
            return EXIT_OK
    except ConfigError as exc:
        if record_refusal if record_refusal is not None else not (args.check or args.print_config):
            _record_refused(job, args, cluster, exc)
        return _usage_error(f"bad config: {exc.key}: {exc.reason}. {_what_to_fix(exc)}; `python -m dist_train "
                            "--help` lists every key.", cluster)
    from dist_train.train.job import run_job

    try:
        return run_job(job, cluster)
    except KeyboardInterrupt:  # (summary.json and the log say where; a traceback would add nothing)
        return 130
