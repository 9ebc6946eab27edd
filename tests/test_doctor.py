"""`python -m dist_train.doctor`: alone, under torchrun (2 gloo ranks), under srun, and failing checks."""
from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, clean_env, free_port
from dist_train import doctor_checks as checks

QUICK = ["data.name=digits", "model.name=mlp", "data.num_workers=0"]
ROWS = ["versions", "all-reduce", "dataset", "batch sizes", "run dir", "GPUs", "MLflow", "clock skew"]


def doctor(args, nproc: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "dist_train.doctor", *args]
    else:
        cmd = [sys.executable, "-m", "dist_train.doctor", *args]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def table(stdout: str) -> dict:
    """CHECK -> (RESULT, DETAIL) from the printed table."""
    rows = {}
    for line in stdout.splitlines():
        for name in ROWS:
            if line.startswith(name + " ") and line[len(name):].split()[0] in ("ok", "FAIL"):
                result, _, detail = line[len(name):].strip().partition(" ")
                rows[name] = (result, detail.strip())
    return rows


def test_alone_all_checks_pass(tmp_path, ok):
    proc = ok(doctor([*QUICK, f"run.dir={tmp_path / 'run'}"]))
    rows = table(proc.stdout)
    assert set(rows) == set(ROWS) and all(r == "ok" for r, _ in rows.values()), proc.stdout
    assert "1 rank(s) on 1 node(s) (single)" in proc.stdout and "all 8 checks passed" in proc.stdout
    assert rows["dataset"][1].startswith("digits: ") and "two checkpoints need" in rows["run dir"][1]
    assert not list((tmp_path / "run").glob(".doctor*"))  # the probes are removed


@pytest.mark.slow
def test_under_torchrun_two_ranks(tmp_path, ok):
    proc = ok(doctor([*QUICK, f"run.dir={tmp_path / 'run'}"], nproc=2))
    rows = table(proc.stdout)
    assert all(r == "ok" for r, _ in rows.values()) and len(rows) == 8, proc.stdout
    assert "2 rank(s) on 1 node(s) (torchrun)" in proc.stdout
    assert "bus bandwidth" in rows["all-reduce"][1] and "GB/s" in rows["all-reduce"][1]
    assert "on all 2 rank(s)" in rows["versions"][1] and "world 2 on 1 host(s)" in rows["batch sizes"][1]
    assert proc.stdout.count("dist_train doctor:") == 1  # one table, from rank 0


@pytest.mark.slow
def test_failing_checks_exit_1_and_name_the_problem(tmp_path, ok):
    """An unwritable run dir (its parent is a file) and a missing dataset root, on 2 ranks."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = ok(doctor(["data.name=fashion_mnist", f"data.root={tmp_path / 'missing'}", f"run.dir={blocker / 'run'}",
                      "logging.mlflow.enabled=false"], nproc=2), 1)
    rows = table(proc.stdout)
    assert rows["run dir"][0] == "FAIL" and f"{blocker / 'run'} is not writable" in rows["run dir"][1], proc.stdout
    assert "rank(s) 0, 1: Not a directory" in rows["run dir"][1]
    assert rows["dataset"][0] == "FAIL" and str(tmp_path / "missing") in rows["dataset"][1]
    assert rows["versions"][0] == rows["all-reduce"][0] == "ok"
    assert "2 check(s) failed: dataset, run dir" in proc.stdout


def test_bad_config_exits_2_without_traceback(ok):
    proc = ok(doctor(["data.batch_size=0"]), 2)
    assert "bad config: data.batch_size" in proc.stderr and "Traceback" not in proc.stderr


# --- the judges, on hand-made observations -----------------------------------------------------

def test_versions_that_differ_between_ranks_fail():
    same = {"python": "3.11", "torch": "2.14.1", "CUDA": "13.0", "NCCL": "2.27", "DeepSpeed": "0.19.8"}
    assert checks.judge_versions([same, dict(same)])[0]
    passed, detail = checks.judge_versions([same, dict(same, torch="2.13.0")])
    assert not passed and "torch: rank 0 2.14.1, rank 1 2.13.0" in detail


def test_run_dir_that_is_not_shared_or_too_full_fails():
    fine = {"free": 10 * 2**30, "sees_rank0": True}
    assert checks.judge_run_dir([fine, fine], "/r", 2**30)[0]
    passed, detail = checks.judge_run_dir([fine, dict(fine, sees_rank0=False)], "/r", 2**30)
    assert not passed and "rank(s) [1] do not see rank 0's files" in detail
    passed, detail = checks.judge_run_dir([fine, fine], "/r", 6 * 2**30)
    assert not passed and "10.00 GiB free, two checkpoints need 12.00 GiB" in detail


def test_checkpoint_estimate_is_params_plus_adamw_moments():
    from dist_train.config import load_config
    from dist_train.data import build_datasets
    from dist_train.models import build_model, count_parameters

    job = load_config(None, QUICK)
    info = build_datasets(job.data)[2]
    assert checks.checkpoint_bytes(job, info) == 12 * count_parameters(build_model(job.model, info))


def test_batches_world_gpus_and_clock_judges():
    job = SimpleNamespace(data=SimpleNamespace(batch_size=64), train=SimpleNamespace(grad_accum_steps=4))
    ranks = [{"rank": r, "world": 2, "local": 2, "nodes": 1, "host": "a"} for r in range(2)]
    assert checks.judge_batches(ranks, job, 10_000)[0]
    # As the loader: a micro-batch of all ranks must fit the training set; an accumulated step may
    # span epochs (2 x 64 x 4 = 512 over 500 samples trains), 2 x 64 = 128 over 100 cannot.
    passed, detail = checks.judge_batches(ranks, job, 500)
    assert passed and "global batch 512" in detail
    passed, detail = checks.judge_batches(ranks, job, 100)
    assert not passed and "global batch of 128" in detail and "more than the 100 training samples" in detail
    assert not checks.judge_batches([ranks[0], dict(ranks[1], world=3)], job, 10_000)[0]

    gpu = {"cuda": True, "host": "a", "count": 1, "uuid": "GPU-1", "local": 2}
    passed, detail = checks.judge_gpus([gpu, dict(gpu)])
    assert not passed and "ranks 0 and 1 share GPU GPU-1 on a" in detail
    assert checks.judge_gpus([gpu, dict(gpu, uuid="GPU-2")])[0]

    clocks = [{"host": "a", "times": [100.0, 101.0]}, {"host": "b", "times": [105.0, 101.5]}]
    passed, detail = checks.judge_clock(clocks, max_skew_s=2.0)
    assert passed and detail.startswith("0.500 s across 2 hosts")
    assert not checks.judge_clock(clocks, max_skew_s=0.1)[0]


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server API
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


def test_mlflow_reachability(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = SimpleNamespace(enabled=True, tracking_uri=f"http://127.0.0.1:{server.server_port}")
        assert checks.mlflow(cfg, str(tmp_path)) == (True, f"{cfg.tracking_uri} answered (200)")
    finally:
        server.shutdown()
        server.server_close()
    passed, detail = checks.mlflow(SimpleNamespace(enabled=True, tracking_uri=f"http://127.0.0.1:{free_port()}"), ".")
    assert not passed and "does not answer" in detail
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert checks.mlflow(SimpleNamespace(enabled=True, tracking_uri=""), str(tmp_path / "run"))[0]
    passed, detail = checks.mlflow(SimpleNamespace(enabled=True, tracking_uri=f"sqlite:///{blocker}/x/mlflow.db"), ".")
    assert not passed and "is not a writable folder" in detail


# --- under srun ----------------------------------------------------------------------------------

@pytest.fixture
def slurm_one_node():
    test_slurm = pytest.importorskip("test_slurm")
    yield from test_slurm._start_cluster(1)


@pytest.mark.slurm
def test_under_srun(slurm_one_node, tmp_path):
    """`srun python -m dist_train.doctor` in a 2-task job: ranks from the SLURM variables."""
    cluster = slurm_one_node
    out = tmp_path / "job.out"
    env = dict(cluster.env, MASTER_PORT=str(free_port()))
    wrap = f"srun {sys.executable} -m dist_train.doctor {' '.join(QUICK)} run.dir={tmp_path / 'run'}"
    proc = subprocess.run(["sbatch", "--wait", "--ntasks=2", f"--output={out}", f"--chdir={REPO}", "--wrap", wrap],
                          env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    text = Path(out).read_text() if out.exists() else ""
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{text}"
    assert "2 rank(s) on 1 node(s) (slurm)" in text and "all 8 checks passed" in text, text
