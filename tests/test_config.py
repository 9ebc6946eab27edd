"""Config: merge order, validation naming the key, exit code 2 before any process group."""
from __future__ import annotations

import pytest

from conftest import run_cli
from dist_train import cli
from dist_train.config import ConfigError, load_config


def test_defaults_are_a_complete_job():
    job = load_config()
    assert job.model.name == "cnn" and job.data.name == "fashion_mnist"
    assert job.strategy.name == "auto" and job.run.dir == "runs/default"
    assert job.checkpoint.resume == "auto" and job.logging.mlflow.tracking_uri == ""


def test_merge_order_defaults_then_yaml_then_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  max_steps: 77\n  lr: 0.5\ndata:\n  batch_size: 8\ncheckpoint:\n  async: true\n")
    job = load_config(str(preset), ["train.max_steps=5", "run.name=x"])
    assert job.train.max_steps == 5          # override beats preset
    assert job.train.lr == 0.5               # preset beats default
    assert job.data.batch_size == 8
    assert job.train.grad_accum_steps == 1   # default kept
    assert job.checkpoint.async_save is True # alias checkpoint.async
    assert job.run.dir == "runs/x"


@pytest.mark.parametrize("override,key", [
    ("train.max_stepz=3", "train.max_stepz"),
    ("nosuch.key=1", "nosuch"),
    ("train.max_steps=abc", "train.max_steps"),
    ("data.batch_size=0", "data.batch_size"),
    ("train.grad_accum_steps=0", "train.grad_accum_steps"),
    ("strategy.name=magic", "strategy.name"),
    ("strategy.zero_stage=4", "strategy.zero_stage"),
    ("train.precision=fp8", "train.precision"),
    ("model.dropout=1.5", "model.dropout"),
    ("model.gpt.n_head=3", "model.gpt.n_head"),
    ("logging.every_steps=0", "logging.every_steps"),
    ("model.name=transformerxl", "model.name"),
    ("data.name=imagenet", "data.name"),
    ("train.precision=fp16", "train.precision"),       # no GPU on this machine
    ("model.name=gpt", "model.name"),                  # gpt cannot classify images
    ("checkpoint.resume=/no/such/ckpt", "checkpoint.resume"),
    ("train.max_steps", "train.max_steps"),            # not key=value
])
def test_bad_config_exits_2_naming_the_key(override, key, capsys):
    assert cli.main([override]) == 2
    err = capsys.readouterr().err
    assert f"bad config: {key}" in err, err
    assert "Traceback" not in err


def test_missing_preset_and_bad_yaml(tmp_path, capsys):
    assert cli.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "--config" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    assert cli.main(["--config", str(bad)]) == 2
    assert "cannot parse" in capsys.readouterr().err


def test_print_config_and_help(capsys):
    assert cli.main(["--print-config", "train.max_steps=9"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 9" in out and "strategy:" in out
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for key in ("run.dir", "train.max_steps", "checkpoint.resume", "logging.mlflow.tracking_uri", "strategy.zero_stage"):
        assert key in out
    assert cli.main(["--bogus"]) == 2


def test_config_error_carries_key():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["eval.every_steps=-1"])
    assert info.value.key == "eval.every_steps"


@pytest.mark.slow
def test_bad_config_under_torchrun_fails_fast_once(tmp_path):
    """Two ranks, a bad key: every rank exits 2 before any process group, one message, no run dir.

    torchrun itself turns the ranks' exit 2 into its own exit 1 and prints its launcher traceback;
    what we own is that no rank prints a traceback and the message is printed once.
    """
    proc = run_cli([f"run.dir={tmp_path / 'run'}", "data.batch_size=0"], nproc=2, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("bad config: data.batch_size") == 1, proc.stderr
    assert "exitcode  : 2" in proc.stderr
    assert "dist_train/cli.py" not in proc.stderr and "dist_train/config" not in proc.stderr  # no rank traceback
    assert not (tmp_path / "run").exists()
