"""Real SLURM: `sbatch slurm/train.sbatch ...` on a local single-host cluster (slurm/local_slurm.sh).

The cluster is real Slurm 22.05 (Debian packages, installed by `local_slurm.sh up` when missing,
which needs root), with one node or two simulated nodes on this host. Every subprocess has a
timeout; `sbatch --wait` has none of its own, so a job that outlives its timeout is cancelled.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

from conftest import REPO, clean_env, free_port, read_summary

LOCAL_SLURM = REPO / "slurm" / "local_slurm.sh"
SBATCH_SCRIPT = "slurm/train.sbatch"
QUICK = ["data.name=digits", "model.name=mlp", "data.num_workers=0", "logging.mlflow.enabled=false"]
UP_TIMEOUT = 600      # includes apt-get install on a fresh machine
JOB_TIMEOUT = 300


def _skip_reason() -> Optional[str]:
    if not sys.platform.startswith("linux"):
        return "local SLURM cluster needs Linux"
    if os.geteuid() != 0 and shutil.which("sbatch") is None and not os.path.exists("/usr/bin/sbatch"):
        return "SLURM is not installed and installing it (apt-get) needs root"
    return None


@dataclass
class Cluster:
    dir: Path
    nodes: int
    env: Dict[str, str]

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for log in sorted((self.dir / "log").glob("slurm*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)


@dataclass
class Job:
    rc: int
    output: str      # the job's own output file (batch script + every task)
    sbatch_out: str
    seconds: float

    def explain(self, cluster: Cluster) -> str:
        return (f"sbatch exit {self.rc} after {self.seconds:.0f} s\nsbatch: {self.sbatch_out}\n"
                f"JOB OUTPUT:\n{self.output[-8000:]}\nSLURM LOGS:\n{cluster.log_tail()}")


def _local_slurm(cmd: str, cluster_dir: Path, env: Dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LOCAL_SLURM), cmd, str(cluster_dir)], env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _start_cluster(nodes: int):
    """Bring up a cluster in a fresh short /tmp dir (munge's socket path must stay short); yield it;
    always tear it down."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    cluster_dir = Path(tempfile.mkdtemp(prefix="dt-slurm-", dir="/tmp"))
    cluster_dir.chmod(0o755)  # munged refuses a socket whose parent dirs are not world-executable
    ctld = free_port()  # (below the ephemeral range, never handed out twice: see conftest)
    env = clean_env({
        "LOCAL_SLURM_NODES": str(nodes),
        "LOCAL_SLURM_CTLD_PORT": str(ctld),
        "LOCAL_SLURM_SLURMD_PORT": str(free_port(nodes + 1)),
    })
    env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
    try:
        t0 = time.monotonic()
        up = _local_slurm("up", cluster_dir, env, UP_TIMEOUT)
        assert up.returncode == 0, f"local_slurm.sh up failed ({up.returncode}):\n{up.stderr[-6000:]}"
        print(f"[slurm] {nodes}-node cluster up in {time.monotonic() - t0:.1f} s at {cluster_dir}")
        env = dict(env, SLURM_CONF=str(cluster_dir / "etc" / "slurm.conf"),
                   DIST_TRAIN_PYTHON=sys.executable)  # the jobs run the python running these tests
        yield Cluster(cluster_dir, nodes, env)
    finally:
        down = _local_slurm("down", cluster_dir, env, 120)
        if down.returncode == 0:
            shutil.rmtree(cluster_dir, ignore_errors=True)
        else:
            print(f"[slurm] local_slurm.sh down failed, state kept in {cluster_dir}:\n{down.stderr}")


@pytest.fixture(scope="module")
def cluster1():
    yield from _start_cluster(1)


@pytest.fixture
def cluster2():
    yield from _start_cluster(2)


class RunningJob:
    """``sbatch --wait`` in the background, bounded by a timeout (the job is cancelled on expiry)."""

    def __init__(self, cluster: Cluster, args: List[str], output: Path, sbatch_opts: Sequence[str] = (),
                 script: str = SBATCH_SCRIPT, timeout: float = JOB_TIMEOUT):
        self.cluster, self.output, self.timeout = cluster, output, timeout
        self.name = f"dt-test-{uuid.uuid4().hex[:8]}"   # scancel by name: no need to parse the job id
        cmd = ["sbatch", "--wait", f"--job-name={self.name}", f"--output={output}", *sbatch_opts, script, *args]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, stdin=subprocess.DEVNULL)

    def remaining(self) -> float:
        return self.timeout - (time.monotonic() - self.t0)

    def scancel(self, *opts: str) -> None:
        subprocess.run(["scancel", *opts, f"--name={self.name}"], env=self.cluster.env, timeout=30,
                       capture_output=True)

    def output_text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def wait(self) -> Job:
        try:
            out, _ = self.proc.communicate(timeout=max(self.remaining(), 1))
        except subprocess.TimeoutExpired:
            self.scancel()
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=30)
            pytest.fail(f"job {self.name} did not finish within {self.timeout:.0f} s and was cancelled\n"
                        f"sbatch: {out}\nJOB OUTPUT:\n{self.output_text()[-8000:]}\n"
                        f"SLURM LOGS:\n{self.cluster.log_tail()}")
        return Job(self.proc.returncode, self.output_text(), out.strip(), time.monotonic() - self.t0)


def sbatch_wait(cluster: Cluster, args: List[str], output: Path, **kw) -> Job:
    return RunningJob(cluster, args, output, **kw).wait()


# ------------------------------------------------------------------------------------------- tests

@pytest.mark.slurm
def test_one_node_two_tasks_ddp(cluster1, tmp_path):
    run = tmp_path / "run"
    job = sbatch_wait(cluster1, [*QUICK, "train.max_steps=30", f"run.dir={run}"], tmp_path / "job.out")
    assert job.rc == 0, job.explain(cluster1)
    s = read_summary(run)
    assert s["status"] == "completed" and s["world_size"] == 2 and s["strategy"] == "ddp", s
    assert s["num_nodes"] == 1 and s["steps"] == 30
    assert "config OK" in job.output and "2 task(s) on 1 node(s)" in job.output
    assert "step 30/30" in job.output and "[rank1] INFO" not in job.output
    print(f"[slurm] 1 node x 2 tasks: {job.seconds:.1f} s")


@pytest.mark.slurm
def test_bad_config_fails_fast_with_exit_2(cluster1, tmp_path):
    run = tmp_path / "run"
    job = sbatch_wait(cluster1, [*QUICK, "train.max_steps=0", f"run.dir={run}"], tmp_path / "job.out", timeout=120)
    assert job.rc == 2, job.explain(cluster1)
    assert "bad config: train.max_steps" in job.output and "must be in [1," in job.output, job.output
    assert "Traceback" not in job.output
    # Stopped in the batch script: no task started, no run directory.
    assert "[rank" not in job.output and "task(s) on" not in job.output and not run.exists()
    print(f"[slurm] bad config: {job.seconds:.1f} s")


@pytest.mark.slurm
@pytest.mark.skipif("preempted" not in (REPO / "dist_train" / "train" / "job.py").read_text(),
                    reason="the run has no preemption support yet (dist_train/train/job.py)")
def test_usr1_checkpoints_requeues_and_resumes(cluster1, tmp_path):
    """--signal=B:USR1 stand-in: USR1 to the batch shell after the first checkpoint. The tasks
    checkpoint and exit "preempted", the job requeues itself under the same job id, and the second
    attempt resumes in the same default run dir (runs/slurm-<job id>, relative to the submit dir)."""
    workdir = tmp_path / "submit"
    workdir.mkdir()
    # Slow enough steps that the first checkpoint comes well before the end.
    args = [*QUICK, "model.hidden=1024", "data.batch_size=256", "train.max_steps=160",
            "checkpoint.every_steps=20", "logging.every_steps=20"]
    running = RunningJob(cluster1, args, tmp_path / "job.out", sbatch_opts=[f"--chdir={workdir}"],
                         script=str(REPO / SBATCH_SCRIPT), timeout=420)
    latest = None
    while latest is None and running.proc.poll() is None and running.remaining() > 0:
        found = sorted(workdir.glob("runs/slurm-*/checkpoints/latest"))
        latest = found[0] if found else None
        time.sleep(0.2)
    assert latest is not None, running.wait().explain(cluster1)
    running.scancel("--signal=USR1", "--batch")
    job = running.wait()
    assert job.rc == 0, job.explain(cluster1)
    run = latest.parents[1]
    s = read_summary(run)
    assert s["status"] == "completed" and s["steps"] == 160 and s["world_size"] == 2, s
    assert s["resumed_from_step"] is not None and 0 < s["resumed_from_step"] < 160, s
    assert "got SIGUSR1" in job.output and "requeueing job" in job.output, job.output
    assert "(restart 1)" in job.output, job.output
    job_id = run.name.split("-", 1)[1]
    assert f"job {job_id} (restart 0)" in job.output
    print(f"[slurm] preempt + requeue + resume from step {s['resumed_from_step']}: {job.seconds:.1f} s")


@pytest.mark.slurm
def test_two_nodes_one_task_each(cluster2, tmp_path):
    """Two simulated nodes; rendezvous on the first host of the node list (n1). Submitted with a
    bare environment (--export=VAR): the tasks must still get the batch script's environment."""
    run = tmp_path / "run"
    export = f"--export=DIST_TRAIN_PYTHON={sys.executable},PATH={cluster2.env['PATH']}"
    job = sbatch_wait(cluster2, [*QUICK, "train.max_steps=30", f"run.dir={run}"], tmp_path / "job.out",
                      sbatch_opts=["--nodes=2", "--ntasks-per-node=1", export])
    assert job.rc == 0, job.explain(cluster2)
    s = read_summary(run)
    assert s["status"] == "completed" and s["world_size"] == 2 and s["num_nodes"] == 2, s
    assert s["strategy"] == "ddp" and s["steps"] == 30
    assert "2 task(s) on 2 node(s) [n[1-2]]" in job.output, job.output
    print(f"[slurm] 2 nodes x 1 task: {job.seconds:.1f} s")


def test_sbatch_knows_the_preempted_exit_code():
    """train.sbatch hard-codes the run's "preempted" exit code (importing it would cost a torch import)."""
    checkpoint = pytest.importorskip("dist_train.env.preemption")
    text = (REPO / SBATCH_SCRIPT).read_text()
    assert f"PREEMPTED_EXIT=${{DIST_TRAIN_PREEMPTED_EXIT:-{checkpoint.EXIT_PREEMPTED}}}" in text
