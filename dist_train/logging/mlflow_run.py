"""The MLflow calls that open a run: find or create the experiment, create a run or continue the
one a checkpoint names. Used by the writer process (``mlflow_writer.py``); no torch here.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Set, Tuple

from dist_train.logging.mlflow_buffer import sanitize_name

log = logging.getLogger("dist_train.mlflow")

ATTEMPTS_TAG = "dist_train.attempts"


class Permanent(Exception):
    """An error retrying will not fix (bad credentials, deleted experiment)."""


def _limit(name: str, default: int) -> int:
    try:
        from mlflow.utils import validation

        return int(getattr(validation, name))
    except Exception:
        return default


def is_permanent(exc: BaseException) -> bool:
    """A 4xx answer from the server (but not 408/429) or one of our own Permanent errors."""
    if isinstance(exc, Permanent):
        return True
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        code = exc.get_http_status_code()
        return 400 <= code < 500 and code not in (408, 429)
    return False


def experiment_id(client, name: str, artifact_location, uri: str) -> str:
    """The id of experiment ``name``, created when missing; a deleted one is a Permanent error."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as exc:  # another job created it meanwhile
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":
        raise Permanent(f"experiment {name!r} is deleted in {uri}; restore it or set logging.mlflow.experiment")
    return exp.experiment_id


def logged_steps(run) -> Dict[str, int]:
    """``{metric: the step of its latest point}`` in an MLflow run (from the run's latest-metric
    records: no history read)."""
    out: Dict[str, int] = {}
    for metric in getattr(run.data, "_metric_objs", None) or []:
        out[metric.key] = max(int(metric.step), out.get(metric.key, -1))
    return out


class SentPoints:
    """Which points a continued MLflow run holds already, so a resumed job sends none twice: up to
    the resumed step, everything up to each metric's latest step (the earlier attempts sent their
    points in step order); after it, exactly the steps of each metric's history there (the job
    trains those steps again, bit for bit; with a denser ``logging.every_steps`` it logs steps in
    between that the run lacks)."""

    def __init__(self, latest: Optional[Dict[str, int]] = None, resume_step: int = 0,
                 after: Optional[Dict[str, Set[int]]] = None):
        self.latest, self.resume_step, self.after = latest or {}, resume_step, after or {}

    def has(self, key: str, step: int) -> bool:
        if step <= self.resume_step:
            return step <= self.latest.get(key, -1)
        return step in self.after.get(key, ())

    @classmethod
    def of(cls, client, run, resume_step: int) -> "SentPoints":
        latest = logged_steps(run)
        after = {key: {int(m.step) for m in client.get_metric_history(run.info.run_id, key) if m.step > resume_step}
                 for key, step in latest.items() if step > resume_step}  # (only metrics logged past it)
        return cls(latest, resume_step, after)


def open_run(client, experiment: str, start: Dict[str, Any], uri: str) -> Tuple[str, List[Any], SentPoints]:
    """Continue ``start["resume_run_id"]`` (when it exists) or create a run; returns its id, the
    params and tags still to send, and (continued) the points it holds (``SentPoints``): a resumed
    job trains those steps again, bit for bit, and MLflow cannot delete points, so they are not
    sent twice. MLflow params are immutable: a value that changed on resume is recorded in the tag
    ``dist_train.changed_params``."""
    from mlflow.entities import Param, RunTag
    from mlflow.exceptions import MlflowException

    params = {sanitize_name(k): str(v)[:_limit("MAX_PARAM_VAL_LENGTH", 6000)] for k, v in start["params"].items()}
    tags = {sanitize_name(k): str(v)[:_limit("MAX_TAG_VAL_LENGTH", 8000)] for k, v in start["tags"].items()}
    run_name = tags.pop("mlflow.runName", None)
    run, resume = None, start.get("resume_run_id")
    if resume:
        try:
            run = client.get_run(resume)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        if run is None or run.info.lifecycle_stage == "deleted":
            log.warning("MLflow run %s (from the checkpoint) is not in %s; starting a new run", resume, uri)
            run = None
    steps = SentPoints()
    if run is not None:
        steps = SentPoints.of(client, run, int(start.get("resume_step") or 0))
        client.update_run(run.info.run_id, status="RUNNING")
        old = run.data.params
        changed = sorted(k for k in params if k in old and old[k] != params[k])
        if changed:
            note = "; ".join(f"{k}: {old[k]} -> {params[k]}" for k in changed)
            log.info("config changed on resume (%s); recorded in tag dist_train.changed_params", note)
            tags["dist_train.changed_params"] = note[:_limit("MAX_TAG_VAL_LENGTH", 8000)]
        params = {k: v for k, v in params.items() if k not in old}
        try:
            attempts = int(run.data.tags.get(ATTEMPTS_TAG, "1")) + 1
        except ValueError:
            attempts = 2
        log.info("continuing MLflow run %s (attempt %d)", run.info.run_id, attempts)
    else:
        run = client.create_run(experiment, run_name=run_name)
        attempts = 1
        log.info("MLflow run %s in experiment id %s at %s", run.info.run_id, experiment, uri)
    tags[ATTEMPTS_TAG] = str(attempts)
    return (run.info.run_id, [Param(k, v) for k, v in params.items()] + [RunTag(k, v) for k, v in tags.items()],
            steps)
