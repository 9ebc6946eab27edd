"""Unit tests for ShardedBatchSampler: sharding, world-size invariance, resume, eval coverage."""

from collections import Counter

import pytest
import torch

from dist_train.data.sampler import ShardedBatchSampler, order_seed


def shards(n, b, w, seed=0, epoch=0, **kw):
    """Per-rank lists of micro-batches for world size w."""
    out = []
    for r in range(w):
        s = ShardedBatchSampler(n, b, r, w, seed, **kw)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


def global_batches(n, b, w, **kw):
    """Global micro-batches: the ranks' k-th micro-batches concatenated in rank order."""
    per_rank = shards(n, b, w, **kw)
    return [sum((per_rank[r][k] for r in range(w)), []) for k in range(len(per_rank[0]))]


def test_shards_are_disjoint_and_cover_each_global_batch():
    n, b, w = 103, 4, 3
    per_rank = shards(n, b, w)
    assert all(len(batches) == n // (b * w) for batches in per_rank)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(order_seed(0, 0))).tolist()
    for k in range(n // (b * w)):
        got = [per_rank[r][k] for r in range(w)]
        assert all(len(g) == b for g in got)
        flat = sum(got, [])
        assert len(set(flat)) == b * w  # disjoint
        assert flat == order[k * b * w : (k + 1) * b * w]  # exactly the global batch, in order


@pytest.mark.parametrize("seed,epoch", [(0, 0), (7, 3)])
def test_global_order_is_world_size_invariant(seed, epoch):
    n, k = 250, 8
    one = global_batches(n, 2 * k, 1, seed=seed, epoch=epoch)
    two = global_batches(n, k, 2, seed=seed, epoch=epoch)
    four = global_batches(n, k // 2, 4, seed=seed, epoch=epoch)
    assert one == two == four  # same concatenated order, hence same multiset per global batch
    assert len(one) == n // (2 * k)
    assert [Counter(g) for g in one] == [Counter(g) for g in four]


def test_consecutive_micro_batches_compose_for_grad_accumulation():
    # 2 ranks x micro-batch 4 x 2 accumulation steps == 1 rank x micro-batch 16, per optimizer step.
    n = 96
    big = global_batches(n, 16, 1)
    small = global_batches(n, 4, 2)
    assert [small[2 * i] + small[2 * i + 1] for i in range(len(big))] == big


def test_deterministic_per_seed_and_epoch_and_different_across_epochs():
    assert shards(100, 5, 2, seed=3, epoch=1) == shards(100, 5, 2, seed=3, epoch=1)
    assert shards(100, 5, 2, seed=3, epoch=1) != shards(100, 5, 2, seed=3, epoch=2)
    assert shards(100, 5, 2, seed=3, epoch=1) != shards(100, 5, 2, seed=4, epoch=1)


def test_no_shuffle_is_dataset_order():
    assert global_batches(20, 2, 2, shuffle=False) == [list(range(i, i + 4)) for i in range(0, 20, 4)]


def test_drop_last_drops_incomplete_global_batch():
    s = ShardedBatchSampler(50, 4, 0, 3, seed=0)
    assert s.global_batch_size == 12 and s.batches_per_epoch == 4 and len(s) == 4
    assert len(list(s)) == 4


def test_set_position_starts_at_the_right_sample_and_resets_after_pass():
    n, b, w = 120, 5, 2
    full = [shards(n, b, w, seed=1)[r] for r in range(w)]
    s = ShardedBatchSampler(n, b, 1, w, seed=1)
    s.set_position(30)  # 3 global batches of 10 already consumed
    assert len(s) == s.batches_per_epoch - 3 == 9
    assert list(s) == full[1][3:]
    # After the full pass the next pass starts at the epoch's beginning again.
    assert s.position == 0 and len(s) == 12
    assert list(s) == full[1]


def test_set_position_at_epoch_end_gives_empty_pass():
    s = ShardedBatchSampler(40, 5, 0, 2, seed=0)
    s.set_position(40)
    assert len(s) == 0 and list(s) == []


def test_set_position_rejects_non_multiple_and_out_of_range():
    s = ShardedBatchSampler(100, 4, 0, 2, seed=0)
    with pytest.raises(ValueError, match=r"12.*global batch size 8"):
        s.set_position(12)
    with pytest.raises(ValueError, match="outside"):
        s.set_position(104)
    with pytest.raises(ValueError, match="outside"):
        s.set_position(-8)


def test_position_is_world_size_invariant_on_resume():
    # 2 ranks x B=4 stop after 3 micro-batches; resume on 4 ranks x B=2: same remaining samples.
    n = 64
    before = ShardedBatchSampler(n, 4, 0, 2, seed=5)
    it = iter(before)
    for _ in range(3):
        next(it)
    state = {"epoch": 0, "position": 3 * before.global_batch_size}  # what TrainState records
    assert state == {"epoch": 0, "position": 24}
    rest = []
    for r in range(4):
        s = ShardedBatchSampler(n, 2, r, 4, seed=5)
        s.set_epoch(state["epoch"])
        s.set_position(state["position"])
        rest.append(list(s))
    resumed = [sum((rest[r][k] for r in range(4)), []) for k in range(len(rest[0]))]
    assert resumed == global_batches(n, 8, 1, seed=5)[3:]


def test_epoch_and_position_round_trip():
    s = ShardedBatchSampler(100, 5, 0, 2, seed=9)
    s.set_epoch(4)
    s.set_position(20)
    t = ShardedBatchSampler(100, 5, 0, 2, seed=9)
    t.set_epoch(s.epoch)
    t.set_position(s.position)
    assert (t.epoch, t.position) == (4, 20) and list(t) == list(s)


@pytest.mark.parametrize("n,b,w", [(10, 2, 4), (17, 3, 2), (8, 4, 2), (5, 8, 3), (0, 2, 2)])
def test_eval_mode_covers_every_sample_exactly_once(n, b, w):
    per_rank = shards(n, b, w, shuffle=False, drop_last=False)
    lens = {len(batches) for batches in per_rank}
    assert lens == {-(-n // (b * w))}  # every rank runs the same number of (maybe empty) batches
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert sorted(seen) == list(range(n))  # no duplicates, nothing missing
    for batches in per_rank:  # each rank's slice of a global batch is contiguous
        for batch in batches:
            assert len(batch) <= b
            if batch:
                assert batch == list(range(batch[0], batch[0] + len(batch)))


def test_len_matches_iteration():
    for n, b, w, drop in [(100, 3, 4, True), (100, 3, 4, False), (7, 1, 1, True)]:
        for r in range(w):
            s = ShardedBatchSampler(n, b, r, w, seed=0, drop_last=drop)
            assert len(s) == len(list(s)) == s.batches_per_epoch


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank 2"):
        ShardedBatchSampler(10, 2, 2, 2, seed=0)
    with pytest.raises(ValueError, match="micro_batch_size=0"):
        ShardedBatchSampler(10, 0, 0, 1, seed=0)


def test_neighbouring_seeds_and_epochs_give_unrelated_orders_and_old_checkpoints_keep_theirs():
    """Seeding an epoch with seed + epoch (order version 1) made run seed 0's epoch 1 run seed 1's
    epoch 0: a seed sweep's runs replayed each other's orders. Version 2 hashes (seed, epoch); a
    checkpoint written before the version existed resumes in its version-1 order."""
    from dist_train.train.state import TrainState

    def order(seed, epoch, version=None):
        s = ShardedBatchSampler(64, 4, 0, 1, seed)
        if version is not None:
            s.order_version = version
        s.set_epoch(epoch)
        return s.global_order().tolist()

    assert order(0, 1) != order(1, 0) and order(3, 0) != order(2, 1)
    assert order(0, 1, version=1) == order(1, 0, version=1)  # what old runs did
    assert order(5, 2, version=1) == torch.randperm(64, generator=torch.Generator().manual_seed(7)).tolist()
    fresh = TrainState()
    assert fresh.data_order == 2 and fresh.state_dict()["data_order"] == 2
    old = TrainState()
    old.load_state_dict({"step": 10, "epoch": 1, "position": 0, "samples_seen": 640})
    assert old.data_order == 1
    again = TrainState()
    again.load_state_dict(fresh.state_dict())
    assert again.data_order == 2
