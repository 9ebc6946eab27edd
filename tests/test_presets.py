"""Presets run end to end under their strategy; impossible strategy combinations exit 2 with a reason."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import REPO, read_summary, run_cli  # noqa: E402
from dist_train import cli  # noqa: E402
from dist_train.config import load_config  # noqa: E402

QUICK = ["data.num_workers=0", "checkpoint.resume=never", "logging.mlflow.enabled=false", "logging.progress_bar=off",
         "eval.max_batches=2", "data.eval_batch_size=16"]

# preset -> (strategy written to summary.json, zero stage or None, overrides that shorten it)
# (bf16 matrix products and convolutions are emulated on a CPU without native bf16, 10-40x slower
# than fp32: a preset's own batch of 16 x 128 bytes took ~4 s per GPT step, and each 32x32 image
# ~0.4 s to evaluate; the model, strategy and precision stay the preset's, the batches shrink)
SMALL_LM = ["train.max_steps=4", "data.batch_size=4", "data.seq_len=32", "data.eval_batch_size=4"]
PRESETS = {
    "fsdp_gpt.yaml": ("fsdp", None, SMALL_LM),
    "deepspeed_zero2.yaml": ("deepspeed", 2, SMALL_LM),
    "deepspeed_zero3.yaml": ("deepspeed", 3, SMALL_LM),
    "ddp_resnet18.yaml": ("ddp", None, ["train.max_steps=2", "data.batch_size=1", "data.eval_batch_size=2",
                                        "eval.max_batches=1"]),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_only_overrides_known_keys_and_says_what_it_runs(preset):
    path = REPO / "configs" / preset
    text = path.read_text()
    assert text.lstrip().startswith("#"), f"{preset} must open with a comment saying what it runs and how long"
    job = load_config(str(path))  # unknown keys or bad values would raise here
    strategy, stage, _ = PRESETS[preset]
    assert job.strategy.name == strategy
    if stage is not None:
        assert job.strategy.zero_stage == stage


@pytest.mark.slow
def test_every_preset_runs_under_torchrun(tmp_path, ok):
    """Each preset, shortened, on 2 ranks: all four in one torchrun launch (one job after another,
    each with a fresh process group), which saves three launches' start-up."""
    from dist_train.train.job import cpu_has_native_bf16
    from test_parity import run_cli_batch

    jobs = [["--config", f"configs/{preset}", *QUICK, *shorten, f"run.dir={tmp_path / preset}"]
            for preset, (_, _, shorten) in sorted(PRESETS.items())]
    proc = ok(run_cli_batch(jobs, nproc=2, timeout=600))
    for preset, (strategy, stage, shorten) in sorted(PRESETS.items()):
        run_dir = tmp_path / preset
        summary = read_summary(run_dir)
        assert summary["status"] == "completed" and summary["strategy"] == strategy, (preset, summary)
        assert summary["world_size"] == 2 and summary["steps"] == int(shorten[0].split("=")[1]), preset
        resolved = (run_dir / "config.yaml").read_text()
        if stage is not None:
            assert f"zero_stage: {stage}" in resolved, preset
    # Every preset is bf16: on a CPU that emulates it, each run says so once (rank 0) and names fp32.
    emulated = "train.precision=bf16 on a CPU without native bf16"
    assert proc.stderr.count(emulated) == (0 if cpu_has_native_bf16() else len(PRESETS)), proc.stderr[-3000:]


def test_fsdp_and_deepspeed_run_as_one_process(tmp_path, ok):
    """World size 1 still gets a (1-rank) process group, so the sharded strategies run under `python -m`."""
    base = ["data.name=digits", "model.name=mlp", "train.max_steps=3", "train.warmup_steps=1", *QUICK]
    for name in ("fsdp", "deepspeed"):
        run_dir = tmp_path / name
        ok(run_cli([*base, f"strategy.name={name}", f"run.dir={run_dir}"], timeout=300))
        summary = read_summary(run_dir)
        assert summary["status"] == "completed" and summary["strategy"] == name and summary["world_size"] == 1


# Combinations that cannot work here: (overrides, key the message must name, words of the reason).
REJECTED = [
    (["strategy.name=fsdp", "strategy.fsdp.cpu_offload=true"], "strategy.fsdp.cpu_offload", "no GPU"),
    (["strategy.name=fsdp", "train.precision=fp16"], "train.precision", "GPU"),
    (["strategy.name=fsdp", "strategy.fsdp.reduce_dtype=bf16"], "strategy.fsdp.reduce_dtype", "fp32"),
    (["strategy.name=fsdp", "train.precision=bf16", "strategy.fsdp.reduce_dtype=fp16"], "strategy.fsdp.reduce_dtype",
     "compute dtype"),
    (["strategy.name=deepspeed", "train.precision=fp16"], "train.precision", "GPU"),
    (["strategy.name=deepspeed", "strategy.deepspeed.offload_optimizer=true"], "strategy.deepspeed.offload_optimizer",
     "no GPU"),
    (["strategy.name=deepspeed", "strategy.zero_stage=3", "strategy.deepspeed.offload_param=true"],
     "strategy.deepspeed.offload_param", "no GPU"),
    (["strategy.name=deepspeed", "strategy.zero_stage=2", "strategy.deepspeed.offload_param=true"],
     "strategy.deepspeed.offload_param", "stage 3"),
    (["strategy.name=deepspeed", "strategy.zero_stage=0"], "strategy.zero_stage", "1, 2 or 3"),
    (["strategy.name=deepspeed", "strategy.deepspeed.config.train_batch_size=100"],
     "strategy.deepspeed.config.train_batch_size", "contradicts"),
    (["strategy.name=deepspeed", "strategy.deepspeed.config.gradient_accumulation_steps=4"],
     "strategy.deepspeed.config.gradient_accumulation_steps", "train.grad_accum_steps"),
    (["strategy.name=deepspeed", "strategy.deepspeed.config.gradient_clipping=5.0"],
     "strategy.deepspeed.config.gradient_clipping", "train.grad_clip"),
    (["strategy.name=deepspeed", "strategy.zero_stage=2", "strategy.deepspeed.config.zero_optimization.stage=3"],
     "strategy.deepspeed.config.zero_optimization.stage", "strategy.zero_stage"),
    (["strategy.name=deepspeed", "strategy.deepspeed.config.zero_optimization.stage=7"],
     "strategy.deepspeed.config.zero_optimization.stage", "strategy.zero_stage"),
    (["strategy.name=deepspeed", "strategy.deepspeed.config.bf16.enabled=true"],
     "strategy.deepspeed.config.bf16.enabled", "train.precision"),
    (["strategy.name=deepspeed", "strategy.deepspeed.config.optimizer.type=Adam"],
     "strategy.deepspeed.config.optimizer", "train.optimizer"),
    (["strategy.name=deepspeed", "strategy.deepspeed.config.scheduler.type=WarmupLR"],
     "strategy.deepspeed.config.scheduler", "schedule"),
    (["strategy.name=deepspeed", "strategy.deepspeed.config.zero_optimisation.stage=2"],
     "strategy.deepspeed.config.zero_optimisation", "not a DeepSpeed config key"),
    (["strategy.name=deepspeed", "strategy.deepspeed.config.zero_optimization.offload_optimizer.device=cpu"],
     "strategy.deepspeed.config.zero_optimization.offload_optimizer", "no GPU"),
    # DeepSpeed's own schema, reached only for entries that pass our checks.
    (["strategy.name=deepspeed", "strategy.deepspeed.config.zero_optimization.reduce_bucket_sise=5"],
     "strategy.deepspeed.config.zero_optimization.reduce_bucket_sise", "DeepSpeed rejects it"),
]


@pytest.mark.parametrize("overrides,key,reason", REJECTED, ids=[r[1] + ":" + r[2] for r in REJECTED])
def test_impossible_combinations_exit_2_with_the_reason(overrides, key, reason, capsys):
    assert cli.main(["--check", *overrides]) == 2
    err = capsys.readouterr().err
    assert f"bad config: {key}:" in err, err
    assert reason in err, err
    assert "Traceback" not in err


def test_extra_deepspeed_settings_that_agree_are_accepted(capsys):
    ok_extra = ["strategy.name=deepspeed", "data.batch_size=8", "train.grad_accum_steps=2",
                "strategy.deepspeed.config.train_batch_size=16",  # 8 x 2 x world size 1
                "strategy.deepspeed.config.zero_optimization.reduce_bucket_size=100000",
                "strategy.deepspeed.config.steps_per_print=1000"]
    assert cli.main(["--check", *ok_extra]) == 0, capsys.readouterr().err


def test_generated_deepspeed_config_follows_ours():
    from dist_train.strategy.base import StepPlan
    from dist_train.strategy.deepspeed_config import deepspeed_config

    job = load_config(None, ["strategy.name=deepspeed", "strategy.zero_stage=3", "train.precision=bf16",
                             "strategy.deepspeed.config.zero_optimization.reduce_bucket_size=1000"])
    ds = deepspeed_config(job.strategy, StepPlan(8, 4, 0.7), "bf16", world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 64 and ds["gradient_clipping"] == 0.7
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000}
    assert "optimizer" not in ds and "scheduler" not in ds  # ours are passed to deepspeed.initialize
    json.dumps(ds)  # DeepSpeed takes it as JSON
