"""The class-balanced sampler: equal quotas, permutation draws, per-epoch and per-rank redraws."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.sampler import ClassBalancedSampler

# Class sizes 50, 3, 20, 7, 1, 100, 9 and no Other, plus a few -1 items.
SIZES = [50, 3, 20, 7, 1, 100, 9, 0]


def make_labels() -> np.ndarray:
    labels = np.concatenate([np.full(size, label) for label, size in enumerate(SIZES)] + [np.full(5, -1)])
    return np.random.default_rng(0).permutation(labels)


def test_equal_class_counts_and_missing_classes():
    labels = make_labels()
    sampler = ClassBalancedSampler(labels, samples_per_epoch=100, seed=1)
    assert sampler.missing_classes == (7,)
    assert sampler.classes == (0, 1, 2, 3, 4, 5, 6)
    drawn = sampler.indices(0)
    assert len(drawn) == 100 == len(sampler)
    counts = np.bincount(labels[drawn], minlength=8)
    assert counts[7] == 0 and set(counts[:7]) <= {14, 15} and counts.sum() == 100
    assert (labels[drawn] >= 0).all()


def test_every_item_seen_before_any_repeats():
    labels = make_labels()
    sampler = ClassBalancedSampler(labels, samples_per_epoch=700, seed=2)
    drawn = sampler.indices(3)
    for label, size in enumerate(SIZES[:7]):
        items = np.flatnonzero(labels == label)
        of_class = drawn[labels[drawn] == label]
        times = np.array([np.count_nonzero(of_class == item) for item in items])
        # Quota 100 over `size` items: each item floor(100/size) or one more time.
        assert times.min() == 100 // size and times.max() - times.min() <= 1, (label, times)
    big = ClassBalancedSampler(labels, samples_per_epoch=70, seed=2).indices(0)
    of_largest = big[labels[big] == 5]
    assert len(of_largest) == len(set(of_largest.tolist())) == 10


def test_within_a_class_permutations_are_concatenated():
    labels = np.array([0, 0, 0, 1])
    sampler = ClassBalancedSampler(labels, samples_per_epoch=14, seed=4)
    # Quota 7 over 3 items is two whole permutations plus one item: counts 2, 2, 3, never 1, 3, 3.
    drawn = sampler.indices(1)
    assert np.count_nonzero(labels[drawn] == 0) == 7
    assert sorted(np.bincount(drawn[labels[drawn] == 0])) == [2, 2, 3]


def test_redrawn_per_epoch_and_rank_reproducible_for_same_triple():
    labels = make_labels()
    rank0 = ClassBalancedSampler(labels, 200, seed=7, rank=0, world_size=2)
    rank1 = ClassBalancedSampler(labels, 200, seed=7, rank=1, world_size=2)
    assert not np.array_equal(rank0.indices(0), rank0.indices(1))
    assert not np.array_equal(rank0.indices(0), rank1.indices(0))
    again = ClassBalancedSampler(labels, 200, seed=7, rank=0, world_size=2)
    np.testing.assert_array_equal(rank0.indices(4), again.indices(4))
    other_seed = ClassBalancedSampler(labels, 200, seed=8, rank=0, world_size=2)
    assert not np.array_equal(rank0.indices(0), other_seed.indices(0))


def test_remainder_rotates_with_the_epoch():
    labels = np.array([0, 1, 2] * 5)
    sampler = ClassBalancedSampler(labels, samples_per_epoch=10, seed=0)
    favoured = [max(sampler.class_quotas(epoch).items(), key=lambda item: item[1])[0]
                for epoch in range(3)]
    assert sorted(favoured) == [0, 1, 2]
    for epoch in range(3):
        assert sorted(np.bincount(labels[sampler.indices(epoch)]).tolist()) == [3, 3, 4]


def test_torch_sampler_protocol_and_state_round_trip():
    labels = make_labels()
    sampler = ClassBalancedSampler(labels, 50, seed=3, rank=1, world_size=4)
    sampler.set_epoch(5)
    items = list(sampler)
    assert len(items) == 50 and all(type(item) is int for item in items)
    assert items == sampler.indices(5).tolist()
    state = sampler.state_dict()
    assert state == {"epoch": 5, "seed": 3, "rank": 1}
    restored = ClassBalancedSampler(labels, 50, seed=0, rank=1, world_size=4)
    restored.load_state_dict(state)
    assert list(restored) == items
    # A rank-0 checkpoint restored on rank 2 keeps rank 2's own draw.
    elsewhere = ClassBalancedSampler(labels, 50, seed=0, rank=2, world_size=4)
    elsewhere.load_state_dict({"epoch": 5, "seed": 3, "rank": 0})
    assert elsewhere.rank == 2 and elsewhere.epoch == 5
    assert list(elsewhere) != items


def test_imbalanced_labels_give_balanced_and_well_mixed_batches():
    sizes = [10_000, 3_000, 500, 200, 5_000, 1_000, 50, 5]
    labels = np.random.default_rng(1).permutation(
        np.concatenate([np.full(size, label) for label, size in enumerate(sizes)]))
    sampler = ClassBalancedSampler(labels, samples_per_epoch=8_000, seed=11)
    batch = 80
    statistics = []
    for epoch in range(5):
        drawn = labels[sampler.indices(epoch)]
        assert np.bincount(drawn, minlength=8).tolist() == [1_000] * 8
        # Shuffled, each batch of 80 should look like a draw from 8 equal classes: the chi-square
        # statistic against 10 per class averages about its 7 degrees of freedom; an unshuffled
        # (class after class) stream would score in the hundreds.
        counts = np.stack([np.bincount(chunk, minlength=8) for chunk in drawn.reshape(-1, batch)])
        statistics.append((((counts - batch / 8) ** 2) / (batch / 8)).sum(axis=1))
    mean = float(np.concatenate(statistics).mean())
    assert 5.5 < mean < 8.5, mean


@pytest.mark.parametrize("labels, message", [
    (np.array([0, 1, 8]), "labels must lie"),
    (np.array([0, -2]), "labels must lie"),
    (np.array([-1, -1]), "no class has items"),
    (np.array([], dtype=np.int64), "no class has items"),
    (np.array([0.0, 1.0]), "integers"),
])
def test_bad_labels_are_clear_errors(labels, message):
    with pytest.raises(ValueError, match=message):
        ClassBalancedSampler(labels, 10, seed=0)


def test_bad_arguments():
    labels = np.array([0, 1])
    with pytest.raises(ValueError, match="rank"):
        ClassBalancedSampler(labels, 10, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="samples_per_epoch"):
        ClassBalancedSampler(labels, 0, seed=0)
    with pytest.raises(ValueError, match="epoch"):
        ClassBalancedSampler(labels, 10, seed=0).set_epoch(-1)
