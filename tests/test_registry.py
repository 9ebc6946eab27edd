"""The strategy registry is the one source of strategy names: a strategy registered from outside
the package is accepted by the config and trains through the CLI like a built-in one."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest

from conftest import ok, read_summary, run_cli  # noqa: F401  (ok is a fixture)
from dist_train import cli
from dist_train.strategy import register_strategy, strategy_names
from dist_train.strategy.ddp import DDPStrategy

TINY = ["model.name=mlp", "data.name=digits", "data.num_workers=0", "train.max_steps=6", "train.warmup_steps=1",
        "logging.every_steps=1", "logging.mlflow.enabled=false", "logging.progress_bar=off", "checkpoint.resume=never"]


class CountingDDP(DDPStrategy):
    """DDP under another name, counting its optimizer steps."""

    name = "counting_ddp"
    steps = 0

    def step(self, *args, **kwargs):
        CountingDDP.steps += 1
        return super().step(*args, **kwargs)


def test_config_accepts_exactly_the_registered_names(capsys):
    assert cli.main(["strategy.name=counting_ddp", *TINY, "--check"]) == 2
    assert "strategy.name" in capsys.readouterr().err
    register_strategy("counting_ddp", CountingDDP)
    assert "counting_ddp" in strategy_names()
    assert cli.main(["strategy.name=counting_ddp", *TINY, "--check"]) == 0
    with pytest.raises(ValueError):
        register_strategy("auto", CountingDDP)


def test_a_strategy_registered_in_process_trains_through_the_cli(tmp_path):
    register_strategy("counting_ddp", CountingDDP)
    CountingDDP.steps = 0
    assert cli.main(["strategy.name=counting_ddp", *TINY, f"run.dir={tmp_path / 'run'}"]) == 0
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "completed" and summary["strategy"] == "counting_ddp" and summary["steps"] == 6
    assert CountingDDP.steps == 6
    meta = json.loads((tmp_path / "run/checkpoints/step_00000006/meta.json").read_text())
    assert meta["strategy"] == "counting_ddp"


SCRIPT = """
import json, os, sys
from dist_train import cli
from dist_train.strategy import register_strategy
from dist_train.strategy.ddp import DDPStrategy

class CountingDDP(DDPStrategy):
    name = "counting_ddp"
    steps = 0
    def step(self, *args, **kwargs):
        CountingDDP.steps += 1
        return super().step(*args, **kwargs)

register_strategy("counting_ddp", CountingDDP)
code = cli.main(sys.argv[1:])
with open(os.path.join(sys.argv[-1].split("=", 1)[1], f"steps.rank{os.environ['RANK']}"), "w") as f:
    f.write(str(CountingDDP.steps))
sys.exit(code)
"""


@pytest.mark.slow
def test_a_registered_strategy_trains_on_two_ranks_under_torchrun(tmp_path, ok):
    import subprocess

    from conftest import clean_env, free_port

    script = tmp_path / "train_toy.py"
    script.write_text(textwrap.dedent(SCRIPT))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script),
                           "strategy.name=counting_ddp", *TINY, f"run.dir={run}"],
                          env=clean_env(), capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    ok(proc)
    summary = read_summary(run)
    assert summary["strategy"] == "counting_ddp" and summary["world_size"] == 2 and summary["steps"] == 6
    assert [(run / f"steps.rank{r}").read_text() for r in (0, 1)] == ["6", "6"]
