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


@pytest.mark.parametrize("override,key,guess", [
    ("train.max_step=3", "train.max_step", "did you mean train.max_steps?"),
    ("trian.lr=0.1", "trian", "did you mean train?"),
    ("strategy.fsdp.reshard_after_fwd=true", "strategy.fsdp.reshard_after_fwd",
     "did you mean strategy.fsdp.reshard_after_forward?"),
    ("train.batch_size=4", "train.batch_size", "did you mean data.batch_size?"),  # (not train.step_size)
    ("train.seed=1", "train.seed", "did you mean run.seed?"),
    ("max_steps=3", "max_steps", "did you mean train.max_steps?"),
    ("train.zzz=1", "train.zzz", None),
])
def test_a_misspelt_key_is_named_with_the_key_it_resembles(override, key, guess, capsys):
    assert cli.main(["--check", override]) == 2
    err = capsys.readouterr().err
    assert f"bad config: {key}: unknown key" in err and "Fix the name" in err, err
    assert (guess in err) if guess else ("did you mean" not in err), err


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
    ("[=nan", "["),                                    # OmegaConf's key parser: IndexError (found by fuzzing)
    ("model.freeze=[conv*,[fc*]]", "model.freeze[1]"),  # an item that is not text
    ("model.freeze=[nomatch*]", "model.freeze"),       # no parameter of the built-in cnn: before any rank starts
    ("train.lr_scale={head.9.*: 2}", "train.lr_scale"),
    ("data.augment=[hflip,{p: 1}]", "data.augment[1]"),
    ("train.max_steps=???", "train.max_steps"),        # OmegaConf's merge would keep the default
    ("model.args.hidden=8", "model.args"),             # the built-in cnn reads model.hidden: ignored
    ("data.args={n: 3}", "data.args"),                 # the built-in fashion_mnist reads no data.args
])
def test_bad_config_exits_2_naming_the_key(override, key, capsys, tmp_path):
    assert cli.main([override, f"run.dir={tmp_path}"]) == 2  # (a refusal writes summary.json to the run dir)
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


def test_a_usage_error_is_printed_by_rank_0_and_by_another_rank_only_after_its_grace(monkeypatch, capsys):
    """Rank 0 prints at once. Another rank waits (its launcher normally stops it once rank 0 has
    exited), then prints the problem itself, naming its rank: a problem of its own is never lost."""
    from dist_train.env.cluster import ClusterEnv

    slept = []
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    assert cli._usage_error("bad config: x", ClusterEnv("torchrun", rank=0, world_size=2)) == 2
    assert capsys.readouterr().err == "dist_train: error: bad config: x\n" and slept == []
    assert cli._usage_error("bad config: x", ClusterEnv("torchrun", rank=1, world_size=2)) == 2
    assert capsys.readouterr().err == "dist_train: error (rank 1): bad config: x\n"
    assert slept == [cli._USAGE_GRACE_S]


def test_overrides_merged_at_once_mean_what_they_mean_one_at_a_time():
    """The overrides are merged in one step (each merge copies the whole config); later keys win,
    sections merge, and a bad one is still named, among many good ones."""
    from omegaconf import OmegaConf

    from dist_train.config import load as load_mod
    from dist_train.config.schema import JobConfig

    overrides = ["model.args={a: 1, b: [1, 2]}", "model.args.b=[3]", "model.args.c=x", "train.lr=0.1",
                 "train.betas=[0.8,0.9]", "train.lr=0.2", "run.dir=r", "checkpoint.async=true",
                 "model.args.e={f: 1}", "model.args.e=5", "model.args.d=4", "data.augment=[hflip]"]
    trees = [load_mod._read_override(item)[1] for item in overrides]
    assert load_mod._combine(trees[:7]) is not None  # merged at once
    assert load_mod._combine(trees) is None  # model.args.e: a mapping, then a number: one at a time
    for n in (7, len(overrides)):
        cfg = OmegaConf.structured(JobConfig)
        for tree in trees[:n]:  # the reference: one merge per override, in order
            cfg = OmegaConf.merge(cfg, OmegaConf.create(tree))
        assert load_config(None, overrides[:n]) == OmegaConf.to_object(cfg)
    job = load_config(None, overrides[:7])
    assert job.model.args == {"a": 1, "b": [3], "c": "x"} and job.train.lr == 0.2
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.lr=0.1", "data.batch_size=4", "train.max_steps=abc", "run.seed=1"])
    assert err.value.key == "train.max_steps"


def test_config_yaml_is_what_omegaconf_writes_and_reads_back_as_the_same_job(tmp_path):
    """``to_yaml`` dumps the dataclasses with OmegaConf's own dumper: the same text as
    ``OmegaConf.to_yaml``, and strings that look like numbers or booleans stay strings."""
    from omegaconf import OmegaConf

    from dist_train.config import to_yaml

    job = load_config(None, ["model.args={a: '1e-3', b: 'true', c: [1, 'null'], d: {e: 2.5}}", "run.name='007'",
                             "data.args={path: /tmp/x y, n: 3}", "model.freeze=['layer*.weight']"])
    text = to_yaml(job)
    assert text == OmegaConf.to_yaml(OmegaConf.structured(job))
    (tmp_path / "config.yaml").write_text(text)
    again = load_config(str(tmp_path / "config.yaml"), [])
    assert again == job and again.model.args["a"] == "1e-3" and again.model.args["b"] == "true"
    assert again.model.args["c"] == [1, "null"] and again.run.name == "007"


def test_config_yaml_keeps_literal_interpolation_text(tmp_path):
    """A ``${`` the user escaped on the command line is a literal by the time the job is built:
    config.yaml escapes it again, so the file loads back to the same job (not an interpolation)."""
    from dist_train.config import to_yaml

    job = load_config(None, ["run.name=a\\${b}", "model.args={tag: 'x\\${y}z', pair: ['\\${', 1]}"])
    assert job.run.name == "a${b}" and job.model.args["tag"] == "x${y}z"
    (tmp_path / "config.yaml").write_text(to_yaml(job))
    again = load_config(str(tmp_path / "config.yaml"), [])
    assert again == job and again.run.dir == job.run.dir


@pytest.mark.parametrize("text", ["0x10", "010", "1:30", "on", "yes", "1e3", "2024"])
def test_a_text_key_keeps_the_text_of_an_override(text):
    """YAML 1.1 reads 0x10 as 16, 010 as 8, 1:30 as 90, on as true: run.name=0x10 named the run
    (and its directory) 16."""
    job = load_config(None, [f"run.name={text}", f"logging.mlflow.experiment={text}"])
    assert job.run.name == text and job.logging.mlflow.experiment == text


def test_a_preset_number_for_a_text_key_is_refused_naming_it(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("run:\n  name: 0x10\n")
    with pytest.raises(ConfigError, match=r"run.name.*YAML read the int 16 here: quote the value"):
        load_config(str(preset))
    preset.write_text("run:\n  name: '0x10'\n")
    assert load_config(str(preset)).run.name == "0x10"


def test_data_root_for_a_built_in_dataset_that_reads_no_folder_is_refused(capsys):
    assert cli.main(["--check", "data.name=digits", "model.name=mlp", "data.root=/tmp"]) == 2
    assert "bad config: data.root: the built-in dataset 'digits' reads no folder" in capsys.readouterr().err


def test_a_global_batch_larger_than_the_training_set_stops_before_the_run(tmp_path, capsys, monkeypatch):
    """It used to pass --check and stop only once every rank had built its loader (the run
    directory written): the built-ins' sizes and fit's dataset's len() are known up front."""
    import torch
    from torch.utils.data import TensorDataset

    import dist_train

    assert cli.main(["--check", "data.name=digits", "model.name=mlp", "data.batch_size=1439"]) == 2
    assert ("bad config: data.batch_size: a global batch of 1439 samples (world size 1 x data.batch_size 1439) "
            "is more than the 1438 training samples") in capsys.readouterr().err
    assert cli.main(["--check", "data.name=digits", "model.name=mlp", "data.batch_size=1438"]) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cli.main(["--check", "data.name=synthetic_images", "model.name=cnn", "data.synthetic_samples=100",
                     "data.batch_size=64"]) == 2
    assert "(world size 2 x data.batch_size 64) is more than the 100 training samples" in capsys.readouterr().err
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var)
    with pytest.raises(dist_train.ConfigError, match="data.batch_size: a global batch of 16 samples"):
        dist_train.fit(torch.nn.Linear(2, 2), TensorDataset(torch.randn(8, 2), torch.zeros(8, dtype=torch.long)),
                       overrides=[f"run.dir={tmp_path / 'run'}", "data.batch_size=16"])
    assert not (tmp_path / "run").exists()


def test_a_value_the_preset_leaves_at_missing_must_be_given(tmp_path):
    """``???`` in a preset means "the user gives this": without an override it stops naming the
    key (OmegaConf's merge kept the default under it, silently); a later override fills it."""
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  max_steps: ???\n  lr: ???\nrun:\n  name: ???\n")
    with pytest.raises(ConfigError, match=r"train.max_steps: is \?\?\?.*so are train.lr, run.name"):
        load_config(str(preset))
    with pytest.raises(ConfigError, match=r"^run.name: is \?\?\?"):
        load_config(str(preset), ["train.max_steps=9", "train={lr: 0.2}"])
    job = load_config(str(preset), ["train.max_steps=9", "train.lr=0.2", "run.name=given"])
    assert (job.train.max_steps, job.train.lr, job.run.name) == (9, 0.2, "given")
    with pytest.raises(ConfigError, match=r"^train.lr: is \?\?\?"):
        load_config({"train": {"lr": "???"}})


def test_a_builtin_task_that_does_not_fit_the_dataset_stops_before_the_run(capsys):
    """task.name=regression on digits passed --check and then failed mid-run (a shape error and a
    traceback), or trained a meaningless broadcast loss."""
    assert cli.main(["--check", "model.name=mlp", "data.name=digits", "task.name=regression"]) == 2
    err = capsys.readouterr().err
    assert "task.name: regression does not fit data.name='digits', a classification dataset" in err
    assert cli.main(["--check", "model.name=mlp", "data.name=digits", "task.name=classification"]) == 0


def test_the_config_reference_in_docs_is_the_schemas():
    """docs/config.md is generated from the schema: a key added, removed or re-documented without
    regenerating it (python -m dist_train.config.reference > docs/config.md) fails here."""
    from pathlib import Path

    from dist_train.config.load import describe_fields
    from dist_train.config.reference import markdown
    from dist_train.config.schema import FAULTS

    text = (Path(__file__).resolve().parent.parent / "docs" / "config.md").read_text(encoding="utf-8")
    assert text == markdown(), "docs/config.md is stale: python -m dist_train.config.reference > docs/config.md"
    assert all(f"| `{key}` |" in text for key, _, _ in describe_fields())
    faults_help = next(help_ for key, _, help_ in describe_fields() if key == "debug.faults")
    assert all(name in faults_help for name in FAULTS), faults_help


def test_a_config_refused_before_the_run_replaces_the_run_dirs_old_summary(tmp_path, capsys):
    """A run dir's summary.json said "completed" (exit 0) of an attempt whose config was then
    refused (exit 2): a script deciding about a requeue would believe it. A dry --check writes
    nothing; a run dir that does not exist is not made."""
    import json

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "exit_code": 0}))
    (run_dir / "summary.rank1.json").write_text("{}")
    assert cli.main(["--check", "train.lr=-1", f"run.dir={run_dir}"]) == 2
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert cli.main(["train.lr=-1", f"run.dir={run_dir}"]) == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["exit_code"] == 2 and "train.lr" in summary["error"], summary
    assert sorted(p.name for p in run_dir.iterdir()) == ["summary.json"]
    assert cli.main(["train.lr=-1", f"run.dir={tmp_path / 'new'}"]) == 2 and not (tmp_path / "new").exists()
    # fit's refusal likewise
    import dist_train
    import torch

    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "exit_code": 0}))
    with pytest.raises(ConfigError, match="^task: unknown task"):
        dist_train.fit(torch.nn.Linear(2, 2), torch.utils.data.TensorDataset(torch.randn(4, 2), torch.zeros(4).long()),
                       task="nope", overrides=[f"run.dir={run_dir}"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["model"] == "fit:Linear" and "unknown task" in summary["error"]


def test_progress_lines_without_a_bar(capsys):
    """logging.progress_bar=off dropped the step log lines too, though its help said only "auto (a bar
    on a terminal, log lines otherwise), on or off": lines asks for the lines alone, off for neither."""
    import logging

    from dist_train.logging.progress import Progress

    seen = {}
    for mode in ("lines", "off"):
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logger = logging.getLogger("dist_train")
        logger.addHandler(handler)
        level, logger.level = logger.level, logging.INFO
        try:
            progress = Progress(4, 0, mode, every=1, enabled=True)
            for step in range(1, 5):
                progress.update(step, {"loss": 1.0})
            progress.close()
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        seen[mode] = [r.getMessage() for r in records if "step" in r.getMessage()]
    assert len(seen["lines"]) >= 2 and seen["off"] == [], seen


def test_the_check_refuses_what_the_run_would_and_hints_at_a_whole_list(capsys):
    """--check passed data.augment=[color_jitter] on synthetic_images (standardised values, no
    pixels), which the run then refused; and a bad list item's hint said `data.augment[1]=VALUE`,
    an override that is itself refused."""
    assert cli.main(["--check", "data.name=synthetic_images", "data.augment=[color_jitter]"]) == 2
    assert "data.augment: color_jitter needs [0, 1] pixels" in capsys.readouterr().err
    assert cli.main(["--check", "data.name=synthetic_images", "data.augment=[hflip]"]) == 0
    capsys.readouterr()
    assert cli.main(["--check", "data.augment=[random_crop,blur]"]) == 2
    err = capsys.readouterr().err
    assert "data.augment[1]: unknown augmentation 'blur'" in err and "override it with data.augment=[...] (the whole list)" in err


def test_the_fix_hint_names_an_option_or_override_not_a_key(capsys, tmp_path):
    """A missing --config file was told to "override it with --config=VALUE", an override
    without a key to "override it with =5=VALUE"."""
    assert cli.main(["--check", "--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Fix the --config option;" in err and "--config=VALUE" not in err, err
    assert cli.main(["--check", "=5"]) == 2
    err = capsys.readouterr().err
    assert "Fix the override;" in err and "=5=VALUE" not in err, err


def test_a_fit_runs_own_optimizer_name_is_refused_without_the_object(capsys):
    """A fit run's config.yaml records train.optimizer=fit:SGD; run again by the CLI (which has no
    such object) it passed --check and failed once the run had started."""
    assert cli.main(["--check", "train.optimizer=fit:SGD"]) == 2
    assert "bad config: train.optimizer: fit:SGD names the optimizer a dist_train.fit call passed" in capsys.readouterr().err
    assert cli.main(["--check", "train.schedule=fit:StepLR"]) == 2
    assert "train.schedule: fit:StepLR names the scheduler" in capsys.readouterr().err
