"""The examples run end to end, the way their READMEs say, and learn."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, clean_env, free_port, ok, read_summary  # noqa: F401

EXAMPLES = REPO / "examples"
QUIET = ["logging.mlflow.enabled=false", "logging.progress_bar=off"]


def torchrun(args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args],
                          cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_own_project_with_the_cli_under_ddp_and_with_fit_under_fsdp(tmp_path, ok):
    project = EXAMPLES / "own_project"
    cli_run, fit_run = tmp_path / "cli", tmp_path / "fit"
    ok(torchrun(["-m", "dist_train", "--config", "config.yaml", "strategy.name=ddp", "train.max_steps=150",
                 *QUIET, f"run.dir={cli_run}"], project))
    s = read_summary(cli_run)
    assert s["status"] == "completed" and s["strategy"] == "ddp" and s["eval_acc"] > 0.8, s  # chance: 1/3
    ok(torchrun([str(project / "train.py"), "strategy.name=fsdp", "train.max_steps=150", *QUIET,
                 f"run.dir={fit_run}"], tmp_path))
    s = read_summary(fit_run)
    assert s["status"] == "completed" and s["strategy"] == "fsdp" and s["eval_acc"] > 0.8, s


@pytest.mark.slow
def test_transfer_learning_from_a_local_resnet_file(tmp_path, ok):
    example = EXAMPLES / "transfer"
    weights = tmp_path / "pretrained.pt"
    ok(subprocess.run([sys.executable, str(example / "pretrain.py"), "8", str(weights)], cwd=tmp_path,
                      env=clean_env(), capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL))
    run = tmp_path / "finetune"
    proc = ok(torchrun(["-m", "dist_train", "--config", "config.yaml", f"model.init_from={weights}",
                        "train.max_steps=25", "eval.max_batches=4", *QUIET, f"run.dir={run}"], example))
    assert "shape differs: fc.bias, fc.weight" in proc.stderr and "model.freeze" in proc.stderr
    s = read_summary(run)
    assert s["status"] == "completed" and s["eval_accuracy"] > 0.4, s  # chance: 0.1
