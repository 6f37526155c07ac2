"""Time the training loop spends waiting for its next batch.

``TimedLoader`` is the stage's ``StatefulDataLoader`` with each ``next()`` on its
iterator timed into a ``DataWait``; the objective logs the mean wait per step
since its last logged row as ``perf/data_wait_s``. Near zero means the loader
keeps up (workers, the encoded store); close to ``perf/step_time_s`` means the
model waits on data. Lightning fetches one batch ahead, so a wait shows up one
step early; the sum over a logging interval is exact.
"""

from __future__ import annotations

import time

from torchdata.stateful_dataloader import StatefulDataLoader


class DataWait:
    """Seconds waited and batches fetched since the last ``take``."""

    def __init__(self):
        self.seconds = 0.0
        self.batches = 0

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.batches += 1

    def take(self) -> float | None:
        """Mean wait per batch since the last call (None when no batch was fetched)."""
        mean = self.seconds / self.batches if self.batches else None
        self.seconds, self.batches = 0.0, 0
        return mean


class TimedLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` whose iterators time each batch into ``self.wait``
    (its saved and restored position is the parent's own)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.wait = DataWait()

    def __iter__(self):
        iterator = super().__iter__()
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.wait.add(time.perf_counter() - start)
            yield batch
