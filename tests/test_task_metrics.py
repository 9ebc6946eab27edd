"""Numbers a task reports that were silently wrong (a review of data and evaluation): padded
tokens (ignore_index) counted in evaluation, a regression target of shape [B, 1] against a [B]
prediction broadcast to [B, B]; and run.seed_per_rank, each rank its own random stream (dropout masks)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import spawn
from dist_train.train.tasks import IGNORE_INDEX, Classification, LanguageModel, Regression


class _Fixed(torch.nn.Module):
    """Returns the logits (or predictions) it holds, whatever the input."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out


def test_padded_tokens_count_nowhere_in_evaluation_as_in_training():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    target = torch.randint(0, 7, (2, 4))
    target[0, 3] = target[1, 2] = IGNORE_INDEX
    model, batch = _Fixed(logits), (torch.zeros(2, 4, dtype=torch.long), target)
    task = LanguageModel()
    train_loss, _ = task.loss(model, batch)
    metrics = task.eval_metrics(task.eval_sums(model, batch))
    real = target != IGNORE_INDEX
    want_acc = (logits.argmax(-1)[real] == target[real]).double().mean().item()
    assert metrics["eval_loss"] == pytest.approx(train_loss.item(), rel=1e-6)
    assert metrics["eval_loss"] == pytest.approx(F.cross_entropy(logits[real], target[real]).item(), rel=1e-6)
    assert metrics["eval_accuracy"] == pytest.approx(want_acc)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-6)
    # Classification with an ignored label: same rule.
    labels = torch.tensor([1, IGNORE_INDEX, 2])
    out = Classification().eval_metrics(Classification().eval_sums(_Fixed(torch.eye(3) * 5), (torch.zeros(3), labels)))
    assert out["eval_accuracy"] == 0.5 and out["eval_loss"] == pytest.approx(
        F.cross_entropy(torch.eye(3)[[0, 2]] * 5, labels[[0, 2]]).item())


@pytest.mark.parametrize("pred_shape, target_shape", [((4,), (4, 1)), ((4, 1), (4,)), ((4,), (4,)), ((4, 1), (4, 1))])
def test_regression_drops_a_trailing_dimension_of_one_on_either_side(pred_shape, target_shape):
    pred = torch.tensor([0.0, 1.0, 2.0, 3.0])
    target = torch.tensor([0.5, 1.0, 1.0, 4.0])
    model, batch = _Fixed(pred.reshape(pred_shape)), (torch.zeros(4), target.reshape(target_shape))
    task = Regression()
    loss, _ = task.loss(model, batch)
    metrics = task.eval_metrics(task.eval_sums(model, batch))
    assert loss.item() == pytest.approx(0.5625) and metrics == pytest.approx({"eval_loss": 0.5625, "eval_mae": 0.625})


def test_regression_refuses_shapes_that_would_broadcast():
    with pytest.raises(ValueError, match=r"prediction has shape \(4, 3\) and the target \(4,\): different numbers"):
        Regression().loss(_Fixed(torch.zeros(4, 3)), (torch.zeros(4), torch.zeros(4)))


def _streams(rank, world, run_dir):
    from dist_train.config import load_config

    for per_rank in (True, False):
        job = load_config(None, ["data.name=synthetic_images", "data.synthetic_samples=64", "data.batch_size=4",
                                 "model.name=cnn", "model.dropout=0.5", "strategy.name=ddp", f"run.dir={run_dir}",
                                 f"run.seed_per_rank={str(per_rank).lower()}"])
        _drawn_on_each_rank(job, world, distinct=per_rank)


def _drawn_on_each_rank(job, world, distinct):
    import torch.distributed as dist

    from dist_train.env.cluster import detect
    from dist_train.train.build import build_parts

    parts = build_parts(job, detect(), torch.device("cpu"))
    try:
        weights = torch.cat([p.detach().flatten() for p in parts.strategy.model.parameters()])
        drawn = torch.rand(64)
        got = [torch.zeros_like(drawn) for _ in range(world)]
        dist.all_gather(got, drawn)
        # run.seed_per_rank: each its own (dropout masks); by default the same (random branches in step)
        assert torch.equal(got[0], got[1]) is not distinct
        same = [torch.zeros_like(weights) for _ in range(world)]
        dist.all_gather(same, weights)
        assert torch.equal(same[0], same[1])  # (the model itself is the same on every rank)
    finally:
        parts.close()


def test_run_seed_per_rank_gives_each_rank_its_own_stream_after_the_model_is_built(tmp_path):
    spawn(_streams, 2, str(tmp_path / "run"))


def test_a_squeezed_batch_of_one_is_no_error():
    """A model ending in .squeeze() gives () for a batch of one against a [1, 1] target: one rank's
    short last evaluation batch must not raise where the others do not (they would wait forever)."""
    loss, _ = Regression().loss(_Fixed(torch.tensor(2.0)), (torch.zeros(1), torch.tensor([[1.5]])))
    assert loss.item() == pytest.approx(0.25)


def test_class_labels_of_any_integer_dtype_train_and_evaluate(tmp_path):
    """Labels kept as uint8 or int32 (a NumPy array's, a TensorDataset's) failed in cross_entropy
    with "expected scalar type Long"; they are class indices like int64 ones."""
    import dist_train

    logits = torch.randn(6, 3)
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    task = Classification()
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert torch.equal(task.criterion(logits, labels.to(dtype)), task.criterion(logits, labels)), dtype
        assert torch.equal(task.eval_sums(_Fixed(logits), (None, labels.to(dtype))),
                           task.eval_sums(_Fixed(logits), (None, labels))), dtype
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g,
                                                                                          dtype=torch.int32))
    summary = dist_train.fit(torch.nn.Linear(4, 3), data, eval_data=data,
                             overrides=[f"run.dir={tmp_path}", "train.max_steps=2", "data.batch_size=8",
                                        "data.num_workers=0", "logging.mlflow.enabled=false"])
    assert summary["status"] == "completed" and math.isfinite(summary["eval_loss"]), summary


def test_token_class_probabilities_are_averaged_over_tokens():
    """[B, T, C] logits with [B, T, C] class-probability targets (soft labels per token) failed: the
    target was flattened to one dimension ("Expected input batch_size (6) to match target batch_size (30)")."""
    logits, soft = torch.randn(2, 3, 5), torch.softmax(torch.randn(2, 3, 5), dim=-1)
    torch.testing.assert_close(Classification().criterion(logits, soft),
                               F.cross_entropy(logits.flatten(0, 1), soft.flatten(0, 1)))


def test_what_is_taken_as_a_criterion_and_what_as_a_task():
    """``(prediction, target)`` losses are recognised by kind or by their first parameter; a task
    module (``forward(self, model, batch)``) and a ``task(model, batch)`` function stay tasks."""
    import torch.nn.functional as F
    from torch import nn

    from dist_train.train.tasks import CallableTask, CriterionTask, make_task

    class Focal(nn.Module):
        def forward(self, logits, target):
            return F.cross_entropy(logits, target)

    class TaskModule(nn.Module):
        def forward(self, model, batch):
            return model(batch[0]).sum()

    def task(model, batch):
        return model(batch[0]).sum()

    def loss(pred, target):
        return F.mse_loss(pred, target)

    for spec in (nn.CrossEntropyLoss(), F.cross_entropy, Focal(), loss, lambda logits, y: F.cross_entropy(logits, y)):
        assert type(make_task(spec)) is CriterionTask, spec
    for spec in (TaskModule(), task, lambda m, b: m(b[0]).sum()):
        assert type(make_task(spec)) is CallableTask, spec
