"""tests/scripts/gpu_session.sh, the one command a session lent a GPU machine runs, works: here in
its CPU mode (GPU_SESSION_CPU=1), where gpu_check.py runs its fp32/gloo fsdp case (a reference
run, a stop at two thirds and a bit-exact resume, async saves held by a fault), throughput.py times
the loop's parts, and step_overhead.py compares the ways of stepping. Functional only: no timing
is asserted."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, clean_env


@pytest.mark.slow
def test_gpu_session_script_runs_every_part_and_writes_its_reports(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = dict(clean_env(), GPU_SESSION_CPU="1", PYTHON=sys.executable, OUT=str(out), TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(REPO / "tests" / "scripts" / "gpu_session.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    # At most 8 files come back from a device machine's $OUT: one report per part, and the machine.
    assert sorted(os.listdir(out)) == ["env.txt", "gpu_check.txt", "step_overhead.txt", "throughput.txt"]
    assert "torch" in (out / "env.txt").read_text() and "omegaconf" in (out / "env.txt").read_text()
    check = (out / "gpu_check.txt").read_text()
    assert "PASS fsdp-fp32" in check and "all passed" in check, check
    assert "ratio dist_train/plain" in (out / "throughput.txt").read_text()
    overhead = (out / "step_overhead.txt").read_text()
    for variant in ("plain", "train_step", "train_step (no finite check)", "train_step + preemption flag"):
        assert f"  {variant} " in overhead, overhead
    assert proc.stdout.count("   exit 0 after") == 3, proc.stdout[-4000:]


def test_gpu_session_script_reports_a_failing_part_and_goes_on(tmp_path):
    """A part that fails (here: a Python without the project's packages) is reported with its exit
    status and output, the next parts still run, and the script exits with the first failure.
    (The script runs from a copy: the checkout's own .whl/, if any, would be installed first.)"""
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "tests" / "scripts" / "gpu_session.sh"
    script.parent.mkdir(parents=True)
    script.write_text((REPO / "tests" / "scripts" / "gpu_session.sh").read_text())
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'no such module' >&2\nexit 3\n")
    fake.chmod(0o755)
    env = dict(clean_env(), GPU_SESSION_CPU="1", PYTHON=str(fake), OUT=str(out))
    proc = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.count("   exit 3 after") == 3 and proc.stdout.count("no such module") >= 3, proc.stdout
