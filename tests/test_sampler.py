"""The training sampler: exact resume at any batch, across epochs, sharded by rank,
optionally grouping samples of like length into the same steps."""

from __future__ import annotations

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from vlmtrain.data.sampler import GROUP_WINDOW_STEPS, EpochShuffleSampler


def seeded_lengths(n, seed=0):
    return torch.randint(1, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def loader(n=40, batch=8, seed=0, rank=0, world=1, workers=0, lengths=None):
    return StatefulDataLoader(
        list(range(n)),
        batch_size=batch,
        sampler=EpochShuffleSampler(n, seed, rank, world, lengths, batch * world),
        drop_last=True,
        num_workers=workers,
    )


def batches(dl, count, state=None):
    if state is not None:
        dl.load_state_dict(state)
    out = []
    while len(out) < count:
        for b in dl:
            out.append(b.tolist())
            if len(out) == count:
                break
    return out


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("cut", [1, 4, 5, 6, 9, 10, 11])  # 5 batches per epoch
def test_resume_at_any_batch_matches_uninterrupted(cut, workers, grouped):
    lengths = seeded_lengths(40) if grouped else None
    full = batches(loader(workers=workers, lengths=lengths), 15)
    dl = loader(workers=workers, lengths=lengths)
    head = batches(dl, cut)
    state = dl.state_dict()
    tail = batches(loader(workers=workers, lengths=lengths), 15 - cut, state)
    assert head + tail == full


def test_each_epoch_is_a_permutation_and_epochs_differ():
    b = batches(loader(), 10)
    first, second = sum(b[:5], []), sum(b[5:], [])
    assert sorted(first) == sorted(second) == list(range(40))
    assert first != second


def test_ranks_get_disjoint_equal_shards_of_one_order():
    shards = [sum(batches(loader(n=42, batch=3, rank=r, world=2), 7), []) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 21
    assert not set(shards[0]) & set(shards[1])


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 4)])
def test_resume_on_another_world_size_continues_at_the_same_global_sample(before, after, grouped):
    """A global step of 8 samples, checkpointed after 3 steps (one epoch is 5) on
    ``before`` ranks, continues on ``after`` ranks with exactly the samples the
    uninterrupted run would take, over the epoch boundary: nothing repeated or skipped."""
    lengths = seeded_lengths(40) if grouped else None

    def steps(world, count, state=None):
        ranks = [
            loader(batch=8 // world, rank=r, world=world, lengths=lengths) for r in range(world)
        ]
        per_rank = [batches(dl, count, state) for dl in ranks]
        return [sorted(sum(parts, [])) for parts in zip(*per_rank, strict=True)], ranks[0]

    full, _ = steps(1, 7)
    head, rank0 = steps(before, 3)
    tail, _ = steps(after, 4, rank0.state_dict())  # rank 0's state: every rank's position
    assert head + tail == full


def test_a_position_that_does_not_split_over_the_ranks_is_refused():
    dl = loader(n=42, batch=3, world=1)
    batches(dl, 1)
    other = loader(n=42, batch=3, world=2)
    other.load_state_dict(dl.state_dict())  # applied lazily, when iteration starts
    with pytest.raises(ValueError, match="does not split over 2 ranks"):
        next(iter(other))


def spans_overlap(steps, lengths):
    """Whether any two steps' [shortest, longest] length ranges overlap."""
    spans = sorted((min(lengths[i] for i in s), max(lengths[i] for i in s)) for s in steps)
    return any(hi > lo for (_, hi), (lo, _) in zip(spans, spans[1:], strict=False))


@pytest.mark.parametrize("world", [1, 2])
def test_length_grouping_gives_steps_of_like_length_samples_on_every_rank(world):
    batch = 4
    step = batch * world
    n = step * GROUP_WINDOW_STEPS + 3  # one whole window and three samples no step takes
    lengths = seeded_lengths(n)
    per_rank = [
        batches(loader(n, batch, rank=r, world=world, lengths=lengths), 50) for r in range(world)
    ]
    steps = [sum((per_rank[r][k] for r in range(world)), []) for k in range(50)]
    # Within one window the steps are cut from one sorted list: their ranges never overlap ...
    assert not spans_overlap(steps, lengths)
    taken = sorted(sum(steps, []))
    assert len(taken) == len(set(taken)) == step * 50
    # ... while ungrouped steps overlap, and pad far more.
    plain_per_rank = [batches(loader(n, batch, rank=r, world=world), 50) for r in range(world)]
    plain = [sum((plain_per_rank[r][k] for r in range(world)), []) for k in range(50)]
    assert spans_overlap(plain, lengths)

    def padding(steps):
        return sum(len(s) * max(lengths[i] for i in s) - sum(lengths[i] for i in s) for s in steps)

    assert padding(steps) < 0.1 * padding(plain)
    # Long and short steps come in random order, not sorted.
    longest = [max(lengths[i] for i in s) for s in steps]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


def test_length_grouped_epochs_are_permutations_with_the_leftover_last():
    n, step = 8 * GROUP_WINDOW_STEPS * 2 + 5, 8
    sampler = EpochShuffleSampler(n, 0, lengths=seeded_lengths(n), step_samples=step)
    first = sampler.epoch_order()
    sampler.epoch = 1
    second = sampler.epoch_order()
    assert sorted(first) == sorted(second) == list(range(n)) and first != second
    # The 5 samples the shuffle left after the last whole step close the epoch, where
    # drop_last leaves them, instead of shifting every later step off its boundary.
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    assert set(first[-5:]) == set(shuffled[-5:])


def test_length_grouping_checks_its_arguments():
    with pytest.raises(ValueError, match="3 lengths for 4 samples"):
        EpochShuffleSampler(4, 0, lengths=[1, 2, 3], step_samples=2)
    with pytest.raises(ValueError, match="step of 3 samples cannot split over 2 ranks"):
        EpochShuffleSampler(4, 0, 0, 2, lengths=[1, 2, 3, 4], step_samples=3)
