"""The preemption flag's agreement: every rank stops at the same step, soon after one rank's
signal, while fast steps exchange the flag only every few steps (its all-reduce is not free);
and a preempted run under the launcher stops for good (no torchrun restart) and exits 3."""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, clean_env, free_port, read_summary, spawn



def _sigterm_self() -> None:
    """SIGTERM to this process, and time for its Python handler to run."""
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)


@contextlib.contextmanager
def _callers_handler():
    """A caller's own SIGTERM handler for the duration: yields the signals it received."""
    got = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, before)

def _agree(rank: int, world_size: int, signal_rank: int, signal_at: int, step_s: tuple) -> None:
    import torch.distributed as dist

    from dist_train.env.preemption import PreemptionWatcher

    watcher = PreemptionWatcher(torch.device("cpu"))
    watcher.AGREE_EVERY_S = 0.03
    stopped = None
    try:
        for step in range(1, 400):
            time.sleep(step_s[rank])  # the ranks' steps take different times, as real ones may
            if step == signal_at and rank == signal_rank:
                watcher._handle(signal.SIGTERM, None)
            if watcher.requested():
                stopped = step
                assert watcher.requested() and watcher.requested()  # and it stays so
                break
    finally:
        watcher.close()
        watcher.release()
    got = [None] * world_size
    dist.all_gather_object(got, (stopped, watcher.exchanges))
    stops = [g[0] for g in got]
    assert stops[0] is not None and len(set(stops)) == 1, got  # the same step on every rank
    stop = stops[0]
    assert signal_at < stop, got
    # At most two intervals after the signal: ~2 x 0.03 s of ~4 ms steps (the slower rank's), with
    # room for a loaded machine, and far fewer exchanges than steps.
    assert stop - signal_at <= 40, got
    if signal_at > 1:
        assert got[0][1] <= stop // 2, got


def test_ranks_stop_at_the_same_step_soon_after_one_rank_is_signalled():
    spawn(_agree, 2, 1, 60, (0.002, 0.004))


def test_a_signal_before_the_first_exchange_stops_every_rank():
    spawn(_agree, 2, 0, 1, (0.003, 0.001))


def _early_agreement(rank: int, world_size: int) -> None:
    from dist_train.env.preemption import EarlySignals, PreemptionWatcher

    early = EarlySignals()
    if rank == 1:
        _sigterm_self()  # (caught: rank 1 is preempted while its job is built)
        assert early.signal_name == "SIGTERM"
    watcher = PreemptionWatcher(torch.device("cpu"), early)  # collective: agrees on what early caught
    try:
        assert watcher.requested()  # the first step boundary, on every rank: no extra step to agree
    finally:
        watcher.close()
        watcher.release()


def test_a_signal_while_one_rank_builds_its_job_stops_every_rank_at_the_first_boundary():
    spawn(_early_agreement, 2)


def _agree_at_the_last_step(rank: int, world_size: int) -> None:
    from dist_train.env.preemption import PreemptionWatcher

    watcher = PreemptionWatcher(torch.device("cpu"))
    try:
        for _ in range(3):  # boundaries with an exchange in flight (interval 1: each starts one)
            assert not watcher.requested()
        assert not watcher.agree_now()  # nobody signalled: the final evaluation goes ahead
        assert not watcher.requested() and not watcher.requested()  # the periodic exchange goes on
        if rank == 1:
            watcher._handle(signal.SIGTERM, None)
        assert watcher.agree_now()  # at once, on every rank: no evaluation, and stop
        assert watcher.requested()
    finally:
        watcher.close()
        watcher.release()


def test_the_last_step_agrees_at_once_whether_to_run_the_final_evaluation():
    spawn(_agree_at_the_last_step, 2)


def test_one_process_needs_no_exchange():
    from dist_train.env.preemption import PreemptionWatcher

    watcher = PreemptionWatcher(torch.device("cpu"))  # no process group here
    try:
        assert not watcher.requested()
        watcher._handle(signal.SIGTERM, None)
        assert watcher.requested() and watcher.exchanges == 0
    finally:
        watcher.close()
        watcher.release()


def test_a_signal_while_the_run_shuts_down_waits_for_the_summary():
    """torchrun SIGTERMs every worker when one fails: between the end of training and summary.json
    the signal is held off (logged), and release gives the handler from before back."""
    from dist_train.env.preemption import PreemptionWatcher

    with _callers_handler() as got:
        watcher = PreemptionWatcher(torch.device("cpu"))
        watcher.close()
        _sigterm_self()  # (default handling would end this process)
        assert watcher.late_signal == "SIGTERM" and watcher.signal_name is None and got == []
        watcher.release()
        _sigterm_self()
        assert got == [signal.SIGTERM]


def test_a_signal_while_the_job_is_built_stops_it_at_the_first_step_with_a_checkpoint(tmp_path):
    """A preemption during the build (rendezvous, data, model: possibly minutes) used to kill the
    process without summary.json and with "killed by signal" instead of "requeue me": it is caught
    from the start of the run, and the run stops after its first step, checkpointed, status
    preempted; the caller's handler is back afterwards."""
    import dist_train
    from torch.utils.data import TensorDataset

    class SignalledWhileBuilt(TensorDataset):
        sent = False

        def __len__(self):  # (asked while the job is built: the sampler, the loader)
            if not SignalledWhileBuilt.sent and any(f.function == "build_parts" for f in inspect.stack()):
                SignalledWhileBuilt.sent = True
                _sigterm_self()
            return super().__len__()

    with _callers_handler() as got:
        data = SignalledWhileBuilt(torch.randn(64, 4), torch.randint(0, 2, (64,)))
        summary = dist_train.fit(torch.nn.Linear(4, 2), data, overrides=[
            f"run.dir={tmp_path}", "train.max_steps=50", "data.batch_size=8", "data.num_workers=0",
            "logging.mlflow.enabled=false", "logging.progress_bar=off", "checkpoint.every_steps=0"])
        assert SignalledWhileBuilt.sent and got == []
        assert summary["status"] == "preempted" and summary["exit_code"] == 3 and summary["steps"] == 1
        # The step it stopped at has a record (off the cadence: every 10 steps), so the summary
        # has its loss; it had none (null), or an earlier logged step's.
        records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1] and summary["train_loss"] == records[0]["loss"], summary
        assert (tmp_path / "checkpoints" / "step_00000001" / "manifest.json").exists()
        _sigterm_self()
        assert got == [signal.SIGTERM]


def _signal_then(fn):
    def wrapped(*args, **kwargs):
        _sigterm_self()
        return fn(*args, **kwargs)
    return wrapped


def test_fit_hands_a_signal_it_held_off_to_the_callers_handler(tmp_path, monkeypatch):
    """A SIGTERM while fit wrote its summary, or while a job that then failed was built, was held
    off and then dropped: a script going on after fit (a sweep) never learnt of it. The run's
    outcome stands, and the caller's handler gets the signal afterwards."""
    import dist_train
    import dist_train.train.job as job_module
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    ov = ["train.max_steps=3", "data.batch_size=8", "data.num_workers=0", "logging.mlflow.enabled=false",
          "logging.progress_bar=off", "checkpoint.every_steps=0"]
    with _callers_handler() as got:
        with monkeypatch.context() as m:
            m.setattr(job_module, "_finish", _signal_then(job_module._finish))
            summary = dist_train.fit(torch.nn.Linear(4, 2), data, overrides=[f"run.dir={tmp_path / 'a'}", *ov])
        assert summary["status"] == "completed" and summary["steps"] == 3 and got == [signal.SIGTERM]

        def broken(*args, **kwargs):
            raise RuntimeError("the model could not be built")

        got.clear()
        with monkeypatch.context() as m:
            m.setattr(job_module, "build_parts", _signal_then(broken))
            with pytest.raises(dist_train.TrainingFailed, match="could not be built"):
                dist_train.fit(torch.nn.Linear(4, 2), data, overrides=[f"run.dir={tmp_path / 'b'}", *ov])
        assert got == [signal.SIGTERM]


def test_an_error_after_the_preemption_checkpoint_leaves_the_run_preempted(tmp_path, monkeypatch):
    """Telling torchrun not to restart (or the group's teardown) can fail after the preemption
    checkpoint is committed: the run stays preempted (exit 3, requeue me), not failed."""
    import dist_train
    import dist_train.train.job as job_module
    from torch.utils.data import TensorDataset

    def gone(*args, **kwargs):
        raise ProcessLookupError("no such process")

    monkeypatch.setattr(job_module, "keep_launcher_from_restarting", gone)
    watcher_class = job_module.PreemptionWatcher

    def signalled_watcher(device, early):
        watcher = watcher_class(device, early)
        watcher._handle(signal.SIGTERM, None)
        return watcher

    monkeypatch.setattr(job_module, "PreemptionWatcher", signalled_watcher)
    summary = dist_train.fit(torch.nn.Linear(4, 2), TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,))),
                             overrides=[f"run.dir={tmp_path}", "train.max_steps=50", "data.batch_size=8",
                                        "data.num_workers=0", "logging.mlflow.enabled=false",
                                        "logging.progress_bar=off"])
    assert summary["status"] == "preempted" and summary["exit_code"] == 3 and summary["steps"] == 1
    assert (tmp_path / "checkpoints" / "step_00000001" / "manifest.json").exists()


JOB = ["data.name=digits", "model.name=mlp", "model.hidden=32", "data.batch_size=16", "data.num_workers=0",
       "train.max_steps=400", "logging.every_steps=1", "eval.every_steps=0", "eval.max_batches=1",
       "checkpoint.every_steps=0", "logging.mlflow.enabled=false", "logging.progress_bar=off",
       "debug.faults=step_sleep=0.05"]


def _launch(run: Path, *torchrun: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dist_train.launch", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *torchrun, *JOB, f"run.dir={run}"]
    return subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)


def _logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    return sum(1 for line in open(path) if '"loss"' in line) if path.exists() else 0


def _worker(parent: int, local_rank: int) -> int:
    """The pid of the torchrun worker of ``local_rank`` started by ``parent``."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"LOCAL_RANK={local_rank}".encode() in env:
            return int(name)
    raise AssertionError(f"no worker of local rank {local_rank} under pid {parent}")


def _until_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 180) -> None:
    end = time.time() + timeout
    while _logged(run) < step:
        if proc.poll() is not None or time.time() > end:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"the run ended or stalled before step {step}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the workers through /proc")
@pytest.mark.parametrize("target", ["one worker", "the launcher"])
def test_a_preempted_run_under_the_launcher_stops_for_good_and_exits_3(target, tmp_path):
    """SIGUSR1 to one worker under --max-restarts=2: torchrun used to count the workers' exit 3 as a
    failure and restart them (the run trained on to its end). SIGTERM to the launcher itself: it
    exited 143. Both now stop at the agreed step with the checkpoint saved, and exit 3."""
    run = tmp_path / "run"
    proc = _launch(run, "--max-restarts=2")
    _until_step(proc, run, 5)
    if target == "one worker":
        os.kill(_worker(proc.pid, 1), signal.SIGUSR1)
    else:
        proc.send_signal(signal.SIGTERM)
    try:
        out = proc.communicate(timeout=180)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    summary = read_summary(run)
    assert proc.returncode == 3, (proc.returncode, summary, out[-4000:])
    assert summary["status"] == "preempted" and summary["steps"] < 400, summary
    assert summary["restarts"] == 0 and "formed again" not in out, out[-4000:]
    assert _logged(run) == summary["steps"]  # (nothing trained after the stop)
    assert (run / "checkpoints" / f"step_{summary['steps']:08d}").is_dir()


def test_ctrl_c_exits_130_and_the_summary_says_so(tmp_path):
    """SIGINT (Ctrl-C) is not a preemption: no checkpoint, exit 130 without a traceback, and
    summary.json says it was interrupted (it said exit_code 1 with no error, while the process
    exited 130)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dist_train", *JOB, f"run.dir={run}"], cwd=REPO, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _until_step(proc, run, 3)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    summary = read_summary(run)
    assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
    assert summary["status"] == "failed" and summary["exit_code"] == 130, summary
    assert "interrupted (KeyboardInterrupt, Ctrl-C)" in summary["error"], summary
