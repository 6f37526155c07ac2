"""A stateful, sharded shuffling sampler whose order depends only on (seed, epoch).

torchdata's own RandomSampler chains one generator through the epochs; restored
mid-epoch, it gives the *next* epoch a different order than an uninterrupted run
would (seen with torchdata 0.11). Deriving each epoch's permutation from the
seed and the epoch number alone makes resume exact at every step, across epoch
boundaries, and lets every rank compute the same global order and take its own
shard of it, with no DistributedSampler wrapped around it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

# Length grouping sorts windows of this many steps (transformers' LengthGroupedSampler
# uses 50 batches too): wide enough to find like-length partners, narrow enough that
# which samples share an epoch's stretch stays random.
GROUP_WINDOW_STEPS = 50


class EpochShuffleSampler(Sampler[int]):
    """With ``lengths`` (one per sample) and ``step_samples`` (samples of one optimizer
    step over all ranks), every step's samples have similar lengths: less padding."""

    def __init__(
        self,
        num_samples: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        lengths: Sequence[int] | None = None,
        step_samples: int = 1,
    ):
        if num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot be shared by {world_size} ranks")
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"{len(lengths)} lengths for {num_samples} samples")
        if step_samples % world_size:
            raise ValueError(
                f"a step of {step_samples} samples cannot split over {world_size} ranks"
            )
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.lengths = lengths
        self.step_samples = step_samples
        self.epoch = 0
        self.yielded = 0  # indices of the current epoch already handed out on this rank

    def __len__(self) -> int:
        return self.num_samples // self.world_size  # equal shards: no rank waits on another

    def epoch_order(self) -> list[int]:
        """The global order of this epoch, before sharding."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        if self.lengths is None:
            return order
        return group_by_length(order, self.lengths, self.step_samples, g)

    def _shard(self) -> list[int]:
        # A step's samples are consecutive in the global order and step_samples is a
        # multiple of world_size, so striding hands each rank its part of every step.
        return self.epoch_order()[self.rank :: self.world_size][: len(self)]

    def __iter__(self) -> Iterator[int]:
        shard = self._shard()
        for i in range(self.yielded, len(shard)):
            self.yielded = i + 1
            yield shard[i]
        self.epoch += 1
        self.yielded = 0

    def state_dict(self) -> dict[str, int]:
        # ``consumed``: samples of this epoch handed out over all ranks, what a resume on
        # another number of ranks continues from (``yielded`` is kept for older readers).
        return {
            "epoch": self.epoch,
            "yielded": self.yielded,
            "world_size": self.world_size,
            "consumed": self.yielded * self.world_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at the same global position, on any number of ranks: every step's
        samples are consecutive in the global order, so a position at a step boundary
        splits evenly over any world size that splits a step."""
        consumed = state.get("consumed", state["yielded"] * state.get("world_size", 1))
        if consumed % self.world_size:
            raise ValueError(
                f"the checkpoint's data position ({consumed} samples into epoch "
                f"{state['epoch']}) does not split over {self.world_size} ranks; resume with "
                f"{state.get('world_size')} ranks, or a number that divides {consumed}"
            )
        self.epoch = state["epoch"]
        self.yielded = consumed // self.world_size


def group_by_length(
    order: list[int], lengths: Sequence[int], step: int, generator: torch.Generator
) -> list[int]:
    """Reorder a shuffled epoch into steps of like-length samples, steps in random order.

    Each window of ``GROUP_WINDOW_STEPS`` steps is sorted by length and cut into steps
    (LLaVA's ``group_by_modality_length``); the full steps are then shuffled so long
    and short steps alternate at random rather than in a fixed rhythm. The few samples
    that fill no whole step stay last, where ``drop_last`` leaves them.
    """
    window = step * GROUP_WINDOW_STEPS
    steps: list[list[int]] = []
    for lo in range(0, len(order), window):
        part = sorted(order[lo : lo + window], key=lengths.__getitem__)
        steps.extend(part[i : i + step] for i in range(0, len(part), step))
    rest = steps.pop() if steps and len(steps[-1]) < step else []
    shuffled = [steps[k] for k in torch.randperm(len(steps), generator=generator).tolist()]
    return [i for s in shuffled for i in s] + rest
