"""train.loss_average=tokens: a step's loss is one mean over every counted target of the global
batch (padding, -100, weighs nothing; a micro-batch or a rank with fewer targets weighs less),
under gradient accumulation and on every strategy; micro_batch (the default) averages the
micro-batches' own means, as a plain loop does."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import spawn

COMMON = ["model.name=mlp", "model.hidden=16", "data.name=digits", "train.optimizer=sgd", "train.momentum=0",
          "train.weight_decay=0", "train.lr=0.5", "train.warmup_steps=0", "train.schedule=constant",
          "train.grad_clip=0", "train.grad_accum_steps=2", "data.batch_size=8"]


def _micro_batches(seed: int, ignored):
    """Two micro-batches of 8 digits-shaped samples, ``ignored[i]`` labels of micro-batch i set to -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in ignored:
        y = torch.randint(0, 10, (8,), generator=g)
        y[:n] = -100
        out.append((torch.randn(8, 1, 8, 8, generator=g), y))
    return out


def _full_state(strategy):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float().clone()
            for k, v in strategy.unwrapped_model.state_dict().items()}


def _reference(job, info, start, batches):
    """One SGD step of a plain module on the mean over every counted label of ``batches``."""
    from dist_train.models import build_model

    model = build_model(job.model, info)
    model.load_state_dict(start)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    loss = F.cross_entropy(model(x), y)  # (ignore_index -100: the mean over counted labels)
    loss.backward()
    with torch.no_grad():
        return loss.item(), {k: (p - job.train.lr * p.grad) for k, p in model.named_parameters()}


def _step(strategy_name, average, batches, world):
    from dist_train.config import load_config
    from dist_train.data.registry import DataInfo
    from dist_train.env.cluster import detect
    from dist_train.train.build import build_training
    from dist_train.train.step import train_step

    job = load_config(None, [f"strategy.name={strategy_name}", f"train.loss_average={average}", *COMMON])
    info = DataInfo("classification", (1, 8, 8), 10)
    torch.manual_seed(0)
    strategy = build_training(job, detect(), torch.device("cpu"), info)
    start = _full_state(strategy)
    try:
        out = train_step(strategy, iter(batches), job.train)
        loss = out.loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(loss)
            loss /= world
        return job, info, start, float(loss), _full_state(strategy)
    finally:
        strategy.teardown()


def test_tokens_is_the_mean_over_every_counted_target_of_the_step():
    batches = _micro_batches(0, ignored=(1, 6))  # 7 and 2 counted labels
    job, info, start, loss, after = _step("single", "tokens", batches, 1)
    ref_loss, ref = _reference(job, info, start, batches)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, value in ref.items():
        torch.testing.assert_close(after[name], value, rtol=1e-5, atol=1e-6)
    # The default weighs each micro-batch's mean alike: the 2 labels of the second count as much as
    # the 7 of the first (not what one mean over the global batch gives).
    _, _, _, loss_mb, after_mb = _step("single", "micro_batch", batches, 1)
    assert abs(loss_mb - ref_loss) > 1e-3
    assert any(not torch.allclose(after_mb[k], v, rtol=1e-4, atol=1e-5) for k, v in ref.items())


def _across_ranks(rank: int, world: int) -> None:
    # Rank 0 counts 7 + 2 labels, rank 1 counts 8 + 5: a rank's share of the mean follows its count.
    mine = {0: (1, 6), 1: (0, 3)}
    everyone = [b for r in range(world) for b in _micro_batches(r, mine[r])]
    for name in ("ddp", "fsdp", "deepspeed"):
        job, info, start, loss, after = _step(name, "tokens", _micro_batches(rank, mine[rank]), world)
        ref_loss, ref = _reference(job, info, start, everyone)
        assert loss == pytest.approx(ref_loss, rel=1e-5), name
        for key, value in ref.items():
            torch.testing.assert_close(after[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {key}: {m}")


@pytest.mark.slow
def test_tokens_weighs_every_rank_by_its_counted_targets_on_every_strategy():
    spawn(_across_ranks, 2)


def test_tokens_needs_a_task_that_sums_its_loss():
    from dist_train.api import fit
    from dist_train.config.schema import ConfigError

    def my_loss(model, batch):
        return model(batch[0]).sum()

    with pytest.raises(ConfigError, match="train.loss_average.*task 'my_loss'"):
        fit(torch.nn.Linear(2, 2), torch.utils.data.TensorDataset(torch.randn(4, 2), torch.randn(4, 2)),
            task=my_loss, overrides=["train.loss_average=tokens"])


def test_the_summed_losses_are_the_means_times_their_counts():
    from dist_train.train.tasks import Classification, LanguageModel, Regression

    g = torch.Generator().manual_seed(0)
    logits, tokens = torch.randn(2, 5, 7, generator=g), torch.randint(0, 7, (2, 5), generator=g)
    tokens[0, :3] = -100
    for task, pred, target in ((LanguageModel(), logits, tokens), (Classification(), logits[:, 0], tokens[:, 0]),
                               (Regression(), torch.randn(4, generator=g), torch.randn(4, 1, generator=g))):
        count = task.target_count((None, target))
        total = task.criterion_sum(pred, target)
        assert float(count) == float((target != -100).sum()) and float(total / count) == pytest.approx(
            float(task.criterion(pred, target)), rel=1e-6), task.name


def test_a_micro_batch_of_padding_only_adds_nothing_instead_of_nan():
    # Under the default micro_batch average, a micro-batch whose every label is padding had the
    # mean 0/0 = NaN, and train.nonfinite dropped the whole step on every rank.
    batches = _micro_batches(0, ignored=(0, 8))  # 8 and 0 counted labels
    job, info, start, loss, after = _step("single", "micro_batch", batches, 1)
    ref_loss, ref = _reference(job, info, start, batches[:1])  # the first micro-batch's mean...
    assert loss == pytest.approx(ref_loss / 2, rel=1e-5)  # ...over 2 micro-batches
    for name, value in ref.items():
        half = start[name] + (value - start[name]) / 2
        torch.testing.assert_close(after[name], half, rtol=1e-5, atol=1e-6)
    from dist_train.train.tasks import Classification, LanguageModel

    logits = torch.randn(2, 5, 7, requires_grad=True)
    padding = torch.full((2, 5), -100)
    for task, pred, target in ((LanguageModel(), logits, padding), (Classification(), logits[:, 0], padding[:, 0])):
        value = task.criterion(pred, target)
        value.backward()
        assert float(value.detach()) == 0.0 and torch.all(logits.grad == 0), task.name
