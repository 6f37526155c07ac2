"""The training sampler: exact resume at any batch, across epochs, sharded by rank."""

from __future__ import annotations

import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

from vlmtrain.data.sampler import EpochShuffleSampler


def loader(n=40, batch=8, seed=0, rank=0, world=1, workers=0):
    return StatefulDataLoader(
        list(range(n)),
        batch_size=batch,
        sampler=EpochShuffleSampler(n, seed, rank, world),
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


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("cut", [1, 4, 5, 6, 9, 10, 11])  # 5 batches per epoch
def test_resume_at_any_batch_matches_uninterrupted(cut, workers):
    full = batches(loader(workers=workers), 15)
    dl = loader(workers=workers)
    head = batches(dl, cut)
    state = dl.state_dict()
    tail = batches(loader(workers=workers), 15 - cut, state)
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


def test_resuming_with_another_world_size_is_refused():
    dl = loader(world=2)
    batches(dl, 1)
    other = loader(world=1)
    other.load_state_dict(dl.state_dict())  # applied lazily, when iteration starts
    with pytest.raises(ValueError, match="same number of devices"):
        next(iter(other))
