"""The shell entry points in launch/: each runs from any working directory, by a relative or an
absolute path, and hands its arguments to dist_train (``--print-config`` shows the job it would
run without starting one)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, clean_env

LAUNCH = REPO / "launch"
SCRIPTS = {"debug.sh": "name: auto", "local.sh": "name: auto", "deepspeed.sh": "name: deepspeed",
           "multinode.sh": "name: auto"}


def run(script: str, cwd, path: str, extra_env=None):
    env = clean_env({"PY": sys.executable, "NPROC": "2", "NNODES": "2", "MASTER_ADDR": "127.0.0.1", **(extra_env or {})})
    return subprocess.run(["bash", path, "--print-config", "train.max_steps=7"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_launch_script_runs_from_anywhere(script, tmp_path):
    for cwd, path in ((LAUNCH, f"./{script}"), (tmp_path, str(LAUNCH / script)), (REPO, f"launch/{script}")):
        proc = run(script, cwd, path)
        assert proc.returncode == 0, (cwd, path, proc.stderr[-2000:])
        assert SCRIPTS[script] in proc.stdout and "max_steps: 7" in proc.stdout, (cwd, path, proc.stdout[-2000:])


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_launch_script_runs_in_the_callers_directory(script, tmp_path):
    """As `python -m dist_train` does: a relative --config is the caller's (the scripts changed to
    the repository first, so a project's own config, run dirs and builder modules were not found)."""
    (tmp_path / "mine.yaml").write_text("train:\n  max_steps: 9\n")
    env = clean_env({"PY": sys.executable, "NPROC": "2", "NNODES": "2", "MASTER_ADDR": "127.0.0.1"})
    proc = subprocess.run(["bash", str(LAUNCH / script), "--config", "mine.yaml", "--print-config"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and "max_steps: 9" in proc.stdout, (proc.stdout, proc.stderr[-2000:])


def test_multinode_names_what_it_needs():
    env = clean_env({"PY": sys.executable})
    env.pop("MASTER_ADDR", None)
    proc = subprocess.run(["bash", str(LAUNCH / "multinode.sh"), "--print-config"], env={**env, "NNODES": "2"},
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "set MASTER_ADDR to the address of the first node" in proc.stderr, proc.stderr
    assert os.access(LAUNCH / "multinode.sh", os.X_OK)


def test_deepspeed_script_takes_a_config_file_after_its_own_overrides():
    """Its usage line: ``ZERO=3 launch/deepspeed.sh --config FILE key=value``: the script's overrides
    come first on the command line, the user's options after them."""
    env = clean_env({"PY": sys.executable, "NPROC": "2", "ZERO": "3"})
    proc = subprocess.run(["bash", str(LAUNCH / "deepspeed.sh"), "--config", "configs/debug.yaml", "--print-config",
                           "train.max_steps=5"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "name: deepspeed" in proc.stdout and "zero_stage: 3" in proc.stdout and "max_steps: 5" in proc.stdout
