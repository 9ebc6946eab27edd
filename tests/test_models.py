"""Unit tests for dist_train.models: shapes, learning, causality, meta-device init, errors."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from dist_train.models import build_model, check_model_compatible, count_parameters, model_names


@dataclass(frozen=True)
class Info:
    """Stand-in for dist_train.data's DataInfo (duck-typed by the models)."""

    task: str
    input_shape: tuple
    num_classes: int
    seq_len: int | None = None


GRAY = Info("classification", (1, 28, 28), 10)
COLOR = Info("classification", (3, 32, 32), 10)
TEXT = Info("language_model", (16,), 256, 16)
TINY = Info("classification", (3, 8, 8), 10)  # keeps resnet18's forward passes cheap
IMAGE_MODELS = ["cnn", "mlp", "resnet18"]


def model_cfg(name: str, **overrides):
    """A model config section like the real one, small enough for fast tests.

    Overrides use ``__`` for nesting: ``gpt__n_head=3`` sets ``gpt.n_head``.
    """
    cfg = {
        "name": name,
        "dropout": 0.0,
        "hidden": 32,
        "gpt": {"n_layer": 2, "n_head": 2, "n_embd": 32, "tie_embeddings": True},
    }
    conf = OmegaConf.create(cfg)
    for key, value in overrides.items():
        OmegaConf.update(conf, key.replace("__", "."), value)
    return conf


def batch_for(info: Info, size: int = 4, seed: int = 0):
    """A fixed random (inputs, targets) batch for ``info``."""
    gen = torch.Generator().manual_seed(seed)
    if info.task == "language_model":
        tokens = torch.randint(0, info.num_classes, (size, info.seq_len + 1), generator=gen)
        return tokens[:, :-1], tokens[:, 1:]
    x = torch.randn(size, *info.input_shape, generator=gen)
    return x, torch.randint(0, info.num_classes, (size,), generator=gen)


def loss_of(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


ALL_CASES = [(n, GRAY) for n in IMAGE_MODELS] + [(n, COLOR) for n in IMAGE_MODELS] + [("gpt", TEXT)]
CASE_IDS = [f"{n}-{i.input_shape}" for n, i in ALL_CASES]


def test_registered_names():
    assert set(model_names()) >= {"cnn", "mlp", "resnet18", "gpt"}


@pytest.mark.parametrize("name,info", ALL_CASES, ids=CASE_IDS)
def test_forward_shape_and_contract(name, info):
    torch.manual_seed(0)
    model = build_model(model_cfg(name), info)
    x, _ = batch_for(info, size=2)
    out = model(x)
    expected = (2, info.seq_len, 256) if info.task == "language_model" else (2, info.num_classes)
    assert out.shape == expected
    assert model.block_classes and all(isinstance(c, type) for c in model.block_classes)
    # Every declared block class actually occurs in the model, so FSDP has something to wrap.
    assert any(isinstance(m, model.block_classes) for m in model.modules())
    assert count_parameters(model) > 0


@pytest.mark.parametrize("name,info", [(n, GRAY) for n in ["cnn", "mlp"]] + [("gpt", TEXT)])
def test_a_few_adamw_steps_lower_the_loss(name, info):
    torch.manual_seed(0)
    model = build_model(model_cfg(name), info)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = batch_for(info, size=8)
    losses = []
    for _ in range(5):
        loss = loss_of(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_resnet_learns_in_train_mode():
    # Separate from the loop above: BatchNorm makes train-mode loss the right thing to compare.
    torch.manual_seed(0)
    model = build_model(model_cfg("resnet18"), TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = batch_for(TINY, size=8)
    first = last = None
    for _ in range(4):
        loss = loss_of(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    assert last < first


def test_resnet_small_image_stem_and_channels():
    model = build_model(model_cfg("resnet18"), GRAY)
    assert model.conv1.in_channels == 1 and model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3)
    assert isinstance(model.maxpool, torch.nn.Identity)
    big = build_model(model_cfg("resnet18"), Info("classification", (1, 40, 40), 5))
    assert big.conv1.in_channels == 1 and big.conv1.stride == (2, 2)
    assert big(torch.randn(1, 1, 40, 40)).shape == (1, 5)


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = build_model(model_cfg("gpt"), TEXT).eval()
    x, _ = batch_for(TEXT, size=2)
    t = 7
    changed = x.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1], b[:, t + 1])


def test_gpt_tied_embeddings_share_one_parameter():
    tied = build_model(model_cfg("gpt"), TEXT)
    untied = build_model(model_cfg("gpt", gpt__tie_embeddings=False), TEXT)
    assert "lm_head.weight" not in tied.state_dict()
    assert count_parameters(untied) - count_parameters(tied) == 256 * 32
    # The tie survives the meta -> to_empty path (a second registration would be split by it).
    with torch.device("meta"):
        meta = build_model(model_cfg("gpt"), TEXT)
    meta.to_empty(device="cpu")
    assert len(list(meta.parameters())) == len(list(tied.parameters()))


@pytest.mark.parametrize("name,info", ALL_CASES, ids=CASE_IDS)
def test_meta_init_matches_cpu_init_bitwise(name, info):
    cfg = model_cfg(name, dropout=0.1)
    torch.manual_seed(123)
    cpu = build_model(cfg, info)
    with torch.device("meta"):
        meta = build_model(cfg, info)
    assert all(t.is_meta for t in meta.state_dict().values())
    meta.to_empty(device="cpu")
    torch.manual_seed(123)
    meta.init_weights()
    a, b = cpu.state_dict(), meta.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name,info", ALL_CASES, ids=CASE_IDS)
def test_init_weights_covers_every_tensor(name, info):
    # Poison every parameter and buffer: init_weights must overwrite all of them, or the
    # meta-device path would keep whatever memory to_empty() handed out.
    torch.manual_seed(5)
    reference = build_model(model_cfg(name), info).state_dict()
    model = build_model(model_cfg(name), info)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.fill_(7 if not tensor.is_floating_point() else float("nan"))
    torch.manual_seed(5)
    model.init_weights()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[key]), key


@pytest.mark.parametrize("name,info", ALL_CASES, ids=CASE_IDS)
def test_no_dropout_means_train_equals_eval(name, info):
    model = build_model(model_cfg(name), info)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    x, _ = batch_for(info)
    if name == "resnet18":
        # BatchNorm differs between train and eval by design; compare two train-mode passes.
        x, _ = batch_for(TINY)
        model = build_model(model_cfg(name), TINY)
        with torch.no_grad():
            assert torch.equal(model(x), model(x))
        return
    with torch.no_grad():
        train_out = model.train()(x)
        eval_out = model.eval()(x)
    assert torch.equal(train_out, eval_out)


@pytest.mark.parametrize("name,info", [("cnn", GRAY), ("mlp", GRAY), ("gpt", TEXT)])
def test_dropout_acts_only_in_train_mode(name, info):
    model = build_model(model_cfg(name, dropout=0.5), info)
    x, _ = batch_for(info)
    with torch.no_grad():
        assert not torch.equal(model.train()(x), model.train()(x))
        assert torch.equal(model.eval()(x), model.eval()(x))


def test_unknown_model_names_the_key_and_choices():
    with pytest.raises(ValueError, match=r"model\.name.*'nope'.*cnn.*gpt"):
        build_model(model_cfg("nope"), GRAY)
    with pytest.raises(ValueError, match=r"model\.name"):
        check_model_compatible("nope", "classification")


@pytest.mark.parametrize(
    "name,info", [("gpt", GRAY), ("cnn", TEXT), ("mlp", TEXT), ("resnet18", TEXT)]
)
def test_incompatible_task_names_the_key_and_task(name, info):
    with pytest.raises(ValueError, match=rf"model\.name='{name}'.*'{info.task}'"):
        check_model_compatible(name, info.task)
    with pytest.raises(ValueError, match=rf"model\.name='{name}'.*'{info.task}'"):
        build_model(model_cfg(name), info)


def test_gpt_heads_must_divide_width():
    with pytest.raises(ValueError, match=r"model\.gpt\.n_head"):
        build_model(model_cfg("gpt", gpt__n_head=3), TEXT)


def test_cnn_needs_image_shape():
    with pytest.raises(ValueError, match=r"model\.name='cnn'.*\(C, H, W\)"):
        build_model(model_cfg("cnn"), Info("classification", (20,), 3))
