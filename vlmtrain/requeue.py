"""Requeue on a signal: a cluster job warned of its end saves at the next optimizer step
and exits to be requeued; the requeued job runs the same command and resumes exactly.

SLURM sends a signal some time before a job's time limit (``sbatch --signal``) and when
it is pre-empted. The handler only sets a flag: a checkpoint taken inside a signal
handler would catch the step half done. ``RequeueAtStepBoundary`` acts on the flag once
the optimizer step in progress is complete, saves the checkpoint through the stage's
checkpoint callback (atomic, counted among the kept ones, with the stage's identity) and
raises ``RequeueRequested``; ``requeue_on_signal`` (around the whole command) then
requeues the job:

* under submitit (``cluster=slurm``), through submitit's own protocol: the handler it had
  installed for the signal is called, which asks the launcher for its ``checkpoint``
  (a ``DelayedSubmission`` of the same job), requeues it and exits;
* under plain ``sbatch``/``srun``, with ``scontrol requeue $SLURM_JOB_ID``;
* elsewhere, by exiting with ``EXIT_REQUEUE`` and a message: run the same command again.

Lightning's own SLURM auto-requeue is turned off (``slurm_plugins``): it saves from
inside its signal handler, mid-step, to an ``hpc_ckpt_*.ckpt`` that Lightning resumes on
its own, beside vlmtrain's checked checkpoints; both handling one signal would save twice
and requeue twice.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

EXIT_REQUEUE = 75  # EX_TEMPFAIL: a temporary failure, to be retried by running it again

_asked: list[int] = []  # the signals received since the handler was installed


class RequeueRequested(Exception):
    """Raised at the step boundary after the requeue checkpoint is saved."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: checkpoint saved at step {step} ({checkpoint})")


def signal_number(name: str) -> int:
    """``SIGUSR1``, ``USR1`` or a number -> the signal's number; a clear error otherwise."""
    text = str(name).strip().upper()
    if text.isdigit():
        return int(text)
    try:
        return signal.Signals[text if text.startswith("SIG") else "SIG" + text].value
    except KeyError:
        raise ValueError(
            f"trainer.requeue_signal={name!r} is not a signal name (e.g. SIGUSR1, SIGUSR2)"
        ) from None


def requested() -> int | None:
    return _asked[0] if _asked else None


@contextlib.contextmanager
def requeue_on_signal(name: str | None):
    """Around a command: the configured signal sets the flag the training acts on, and a
    ``RequeueRequested`` coming out of it requeues the job (see the module's doc)."""
    if not name or threading.current_thread() is not threading.main_thread():
        yield
        return
    signum = signal_number(name)
    previous = signal.signal(signum, lambda s, frame: _asked.append(s))
    try:
        yield
    except RequeueRequested as e:
        _requeue(e, previous)
    finally:
        signal.signal(signum, previous)
        _asked.clear()


def _requeue(e: RequeueRequested, previous) -> None:
    rank = rank_zero_only.rank
    if rank == 0:
        print(f"vlmtrain: {e}", file=sys.stderr, flush=True)
    if _is_submitit(previous):
        # Rank 0 dumps the launcher's DelayedSubmission, requeues the job and exits; on
        # the other ranks submitit's handler does nothing.
        previous(e.signum, None)
        sys.exit(0)
    job = _slurm_job_id()
    if job is not None and rank != 0:
        sys.exit(0)  # a failed task could make srun stop rank 0 before it requeues the job
    if job is not None:
        try:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            failure = done.stderr.strip() if done.returncode else None
        except OSError as err:
            failure = str(err)
        if failure is None:
            print(f"vlmtrain: requeued SLURM job {job}", file=sys.stderr)
            sys.exit(EXIT_REQUEUE)
        print(f"vlmtrain: `scontrol requeue {job}` failed: {failure}", file=sys.stderr)
    if rank == 0:
        print("vlmtrain: run the same command again to resume", file=sys.stderr)
    sys.exit(EXIT_REQUEUE)


def _is_submitit(handler) -> bool:
    owner = getattr(handler, "__self__", None)
    return owner is not None and type(owner).__module__.startswith("submitit.")


def _slurm_job_id() -> str | None:
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def slurm_plugins() -> list:
    """Under SLURM, its cluster environment with Lightning's auto-requeue off (see above)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


class RequeueAtStepBoundary(Callback):
    """Acts on a received requeue signal once an optimizer step is complete (never between
    the micro-batches of one step): every rank saves the checkpoint together, then stops."""

    def __init__(self, signal_name: str):
        self.signum = signal_number(signal_name)
        self.last_step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.last_step = trainer.global_step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.last_step:  # inside a gradient accumulation
            return
        self.last_step = trainer.global_step
        asked = requested() is not None
        if trainer.world_size > 1:  # ranks may get the signal at different steps
            asked = trainer.strategy.reduce_boolean_decision(asked, all=False)
        if not asked:
            return
        path = trainer.checkpoint_callback.save_now(trainer)
        raise RequeueRequested(self.signum, trainer.global_step, path)
