"""model.init: the scheme's statistics hold, and FSDP's meta-device build gives the same weights."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dist_train.config import load_config
from dist_train.config.schema import INIT_SCHEMES
from dist_train.models import build_model
from dist_train.models.init import SCHEMES, apply_init
from tests.conftest import spawn

DIGITS = SimpleNamespace(task="classification", input_shape=(1, 8, 8), num_classes=10, seq_len=None)
TEXT = SimpleNamespace(task="language_model", input_shape=(16,), num_classes=256, seq_len=16)


def model_cfg(*overrides: str):
    return load_config(None, ["model.hidden=64", *overrides]).model


def layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def test_schema_and_schemes_agree():
    assert set(INIT_SCHEMES) == {"default", *SCHEMES}


def test_default_keeps_the_models_own_init():
    torch.manual_seed(0)
    a = build_model(model_cfg(), DIGITS)
    torch.manual_seed(0)
    b = build_model(model_cfg("model.init=default"), DIGITS)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert any(layer.bias.abs().sum() > 0 for layer in layers(a))  # PyTorch's default bias is not zero


def test_orthogonal_rows_are_orthonormal():
    torch.manual_seed(0)
    model = build_model(model_cfg("model.name=mlp", "model.init=orthogonal"), DIGITS)
    for layer in layers(model):
        w = layer.weight.detach().double().flatten(1)
        rows, cols = w.shape
        gram = w @ w.T if rows <= cols else w.T @ w  # the smaller side is orthonormal
        assert torch.allclose(gram, torch.eye(min(rows, cols), dtype=torch.float64), atol=1e-5)
        assert torch.count_nonzero(layer.bias) == 0


@pytest.mark.parametrize("scheme", ["xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"])
def test_scheme_statistics(scheme):
    """Each weight's spread is the scheme's: std = gain * sqrt(2 / (fan_in + fan_out)) for Xavier,
    sqrt(2 / fan_in) for He (ReLU); uniform schemes stay inside their bound; biases are zero."""
    layer = nn.Linear(400, 300)
    apply_init(layer, scheme)
    w = layer.weight.detach()
    fan_in, fan_out = 400, 300
    std = math.sqrt(2.0 / (fan_in + fan_out)) if scheme.startswith("xavier") else math.sqrt(2.0 / fan_in)
    assert abs(float(w.std()) / std - 1) < 0.02, (float(w.std()), std)
    assert abs(float(w.mean())) < 0.01 * std * 10
    if scheme.endswith("uniform"):
        assert float(w.abs().max()) <= math.sqrt(3) * std + 1e-7
    else:
        assert float(w.abs().max()) > math.sqrt(3) * std  # a normal's tails reach past the uniform bound
    assert torch.count_nonzero(layer.bias) == 0


def test_conv_layers_are_covered():
    torch.manual_seed(0)
    model = build_model(model_cfg("model.name=cnn", "model.init=kaiming_normal"), DIGITS)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert abs(float(conv.weight.detach().std()) - math.sqrt(2 / fan_in)) < 0.15 * math.sqrt(2 / fan_in)
    assert torch.count_nonzero(conv.bias) == 0


def test_init_weights_reapplies_the_scheme_after_to_empty():
    """The contract FSDP's meta-device build relies on: meta build + to_empty + seeded
    init_weights() == a plain build, with the scheme included."""
    cfg = model_cfg("model.name=cnn", "model.init=orthogonal")
    torch.manual_seed(3)
    plain = build_model(cfg, DIGITS)
    with torch.device("meta"):
        meta = build_model(cfg, DIGITS)
    meta.to_empty(device="cpu")
    torch.manual_seed(3)
    meta.init_weights()
    for (name, p), q in zip(plain.named_parameters(), meta.parameters()):
        assert torch.equal(p, q), name


FSDP_CASES = [("orthogonal", "mlp"), ("xavier_uniform", "cnn"), ("kaiming_normal", "gpt")]


def _fsdp_matches_single(rank: int, world_size: int) -> None:
    for scheme, name in FSDP_CASES:
        _check_fsdp_case(world_size, scheme, name)


def _check_fsdp_case(world_size: int, scheme: str, name: str) -> None:
    from dist_train.env.cluster import detect
    from dist_train.strategy import StepPlan, build_strategy
    from dist_train.train.optim import make_optimizer_factory, make_scheduler_factory

    job = load_config(None, ["strategy.name=fsdp", f"model.name={name}", f"model.init={scheme}",
                             "model.gpt.n_layer=2", "model.gpt.n_embd=32", "model.gpt.n_head=2", "model.hidden=64"])
    info = TEXT if name == "gpt" else DIGITS
    torch.manual_seed(7)
    strategy = build_strategy(job.strategy, detect(), torch.device("cpu"), "fp32", StepPlan(4, 1, 1.0))
    with strategy.init_context():
        model = build_model(job.model, info)
    assert all(p.is_meta for p in model.parameters())  # meta_init: the shards are filled in setup
    strategy.setup(model, make_optimizer_factory(job.train), make_scheduler_factory(job.train))
    torch.manual_seed(7)
    plain = build_model(job.model, info)
    sharded = dict(strategy.model.named_parameters())
    for pname, p in plain.named_parameters():
        assert sharded[pname].to_local().numel() < p.numel() or p.shape[0] < world_size, pname
        assert torch.equal(sharded[pname].full_tensor(), p), f"{scheme}: {pname} differs under fsdp"
    strategy.teardown()


def test_fsdp_meta_init_equals_single():
    """2 gloo ranks: FSDP2 shards built on the meta device and filled by init_weights() hold
    exactly the weights of a single-process build with the same scheme (mlp, cnn, gpt)."""
    spawn(_fsdp_matches_single, 2)
