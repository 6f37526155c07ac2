"""A stateful, sharded shuffling sampler whose order depends only on (seed, epoch).

torchdata's own RandomSampler chains one generator through the epochs; restored
mid-epoch, it gives the *next* epoch a different order than an uninterrupted run
would (seen with torchdata 0.11). Deriving each epoch's permutation from the
seed and the epoch number alone makes resume exact at every step, across epoch
boundaries, and lets every rank compute the same global order and take its own
shard of it, with no DistributedSampler wrapped around it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot be shared by {world_size} ranks")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.yielded = 0  # indices of the current epoch already handed out on this rank

    def __len__(self) -> int:
        return self.num_samples // self.world_size  # equal shards: no rank waits on another

    def _shard(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        return order[self.rank :: self.world_size][: len(self)]

    def __iter__(self) -> Iterator[int]:
        shard = self._shard()
        for i in range(self.yielded, len(shard)):
            self.yielded = i + 1
            yield shard[i]
        self.epoch += 1
        self.yielded = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("world_size", self.world_size) != self.world_size:
            raise ValueError(
                f"the checkpoint's data position was saved with {state['world_size']} ranks and "
                f"this run has {self.world_size}; resume with the same number of devices"
            )
        self.epoch = state["epoch"]
        self.yielded = state["yielded"]
