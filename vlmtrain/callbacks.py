"""The stage's own Lightning callbacks: its clock, its last metrics, and the kill switch
tests use to interrupt a run exactly as a pre-empted cluster job is."""

from __future__ import annotations

import os
import signal
import time

import lightning as L
from lightning.pytorch.callbacks import Callback

# Tests set this to interrupt a run exactly as a pre-empted cluster job is, while the
# command line stays the same for the resume.
KILL_ENV = "VLMTRAIN_KILL_AFTER_STEP"


class KillAfterStep(Callback):
    """SIGKILL the process (no clean-up) once the given optimizer step is done."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class StageClock(Callback):
    """A stage's training time over all its runs: checkpoints carry the time so far, so a
    resumed stage adds its earlier runs' time up to their last checkpoint (steps redone
    after a kill count once, at their redo)."""

    def __init__(self):
        self.before = 0.0  # from the checkpoint resumed
        self.start: float | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return self.before + (time.perf_counter() - self.start if self.start is not None else 0.0)

    def state_dict(self) -> dict[str, float]:
        return {"elapsed_s": self.elapsed()}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.before = state["elapsed_s"]


class LastMetrics(Callback):
    """The stage's last logged metrics (final loss, ...), kept in every checkpoint: a stage
    re-run after its last step was checkpointed trains no step and logs nothing, yet its
    artifact must still report its final loss."""

    def __init__(self):
        self.restored: dict[str, float] = {}
        self.trainer: L.Trainer | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.trainer = trainer

    def metrics(self) -> dict[str, float]:
        current = self.trainer.callback_metrics if self.trainer is not None else {}
        return {**self.restored, **{k: float(v) for k, v in current.items()}}

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {"metrics": self.metrics()}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        self.restored = dict(state["metrics"])
