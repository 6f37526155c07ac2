"""A stage's checkpoints: written atomically, several kept, the newest usable one resumed.

* ``AtomicCheckpointIO`` writes each checkpoint beside its target and renames it
  (``vlmtrain.durable``), streaming ``torch.save`` into the file instead of
  buffering the whole checkpoint in memory first as Lightning's default does.
  Loads are always ``weights_only=True``: a checkpoint is tensors and plain
  containers, never code.
* ``checkpoint_callback`` keeps the ``trainer.keep_checkpoints`` newest, named
  by optimizer step (``step-0000150.ckpt``).
* ``CheckpointRecord`` stores in every checkpoint what it must be resumed
  with: the stage's identity (config, sources, data fingerprints) and the
  number of processes.
* ``choose_checkpoint`` picks, at resume, the newest checkpoint whose every
  entry passes its zip checksum and that loads weights-only; damaged newer
  ones are renamed ``*.damaged`` with a message. A checkpoint that loads but
  does not fit (another config, model shape or number of processes) is an
  error saying what to do, never a silent fresh start.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from vlmtrain.durable import atomic_write, remove_partial_files

STEP_NAME = re.compile(r"^step-(\d+)\.ckpt$")
LEGACY_NAME = "last.ckpt"  # what vlmtrain wrote before it kept several
DAMAGED_SUFFIX = ".damaged"
RECORD_KEY = "vlmtrain"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed; the message names it and says what to do."""


class DamagedCheckpoint(Exception):
    """Internal: this file is not a whole checkpoint (truncated, zeroed, bit-flipped)."""


# Tests set this to "<step>:<bytes>": SIGKILL the process once that many bytes of that
# step's checkpoint are written, as a pre-emption in the middle of a save would.
KILL_DURING_WRITE_ENV = "VLMTRAIN_KILL_DURING_CHECKPOINT_WRITE"


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        kill_at = _kill_point(checkpoint.get("global_step"))
        atomic_write(
            Path(path),
            lambda f: torch.save(checkpoint, f if kill_at is None else _KillMidWrite(f, kill_at)),
        )

    def load_checkpoint(self, path, map_location: Any = None, weights_only: Any = None) -> dict:
        # weights_only is forced: Lightning's default (None) lets torch decide.
        return load_weights_only(Path(path), map_location or "cpu")


def _kill_point(step: int | None) -> int | None:
    spec = os.environ.get(KILL_DURING_WRITE_ENV)
    if not spec:
        return None
    at_step, at_bytes = (int(x) for x in spec.split(":"))
    return at_bytes if step == at_step else None


class _KillMidWrite:
    """A file whose writer is SIGKILLed once ``limit`` bytes went through it."""

    def __init__(self, f, limit: int):
        self.f, self.limit, self.written = f, limit, 0

    def write(self, data) -> int:
        n = self.f.write(data)
        self.written += n
        if self.written >= self.limit:
            self.f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return n

    def flush(self) -> None:
        self.f.flush()


def load_weights_only(path: Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's message advises weights_only=False, i.e. running whatever the file holds.
        detail = next(
            (ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "error:" in ln),
            str(e).splitlines()[0],
        )
        raise CheckpointError(
            f"checkpoint {path} holds more than tensors and plain containers ({detail}), so "
            "vlmtrain will not load it. It was not written by this version of vlmtrain: move "
            "it out of the checkpoints directory to resume from an older one, or delete that "
            "directory to train the stage from the start."
        ) from None


class KeepNewestCheckpoints(ModelCheckpoint):
    """Lightning never deletes the checkpoint a run resumed from (it may be the user's own
    file); ours are all in the stage's directory, so without this every requeue of a job
    would leave one more full checkpoint behind."""

    def _should_remove_checkpoint(self, trainer, previous: str, current: str) -> bool:
        return (
            previous != current
            and Path(self.dirpath).absolute() in Path(previous).absolute().parents
        )

    def save_now(self, trainer) -> str:
        """This step's checkpoint, saved now (a requeue's) and kept like a periodic one;
        its path. A step already saved is not saved again."""
        if self._last_global_step_saved != trainer.global_step:
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
        return self._last_checkpoint_saved


def checkpoint_callback(ckpt_dir: Path, every_n_steps: int, keep: int) -> ModelCheckpoint:
    if keep < 1:
        raise ValueError(f"trainer.keep_checkpoints={keep}: keep at least 1 checkpoint")
    return KeepNewestCheckpoints(
        dirpath=ckpt_dir,
        filename="step-{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=every_n_steps,
        monitor="step",  # "the newest k": Lightning adds the step to the monitored values
        mode="max",
        save_top_k=keep,
        save_last=False,
    )


class CheckpointRecord(Callback):
    """Writes into every checkpoint what a resume must match."""

    def __init__(self, identity: dict[str, Any], digest: str, strategy: str = "auto"):
        self.identity = identity  # as run_stage hashes it: config sections, sources, data
        self.digest = digest
        self.strategy = strategy  # trainer.strategy: whether another world size can resume

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[RECORD_KEY] = {
            "config_hash": self.digest,
            "identity": self.identity,
            "world_size": trainer.world_size,
            "strategy": self.strategy,
        }


def candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoints newest first: by step, then an older vlmtrain's ``last.ckpt`` (every
    step file in the same directory was written after it)."""
    if not ckpt_dir.is_dir():
        return []
    steps = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := STEP_NAME.match(p.name))]
    out = [p for _, p in sorted(steps, reverse=True)]
    if (ckpt_dir / LEGACY_NAME).is_file():
        out.append(ckpt_dir / LEGACY_NAME)
    return out


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's contents, memory-mapped (tensors are not read); every zip entry's
    CRC is checked first, which is the one read of the file that catches zeroed blocks
    and flipped bits, not only truncation. A sharded checkpoint (a directory, FSDP)
    gives its metadata file's contents and its tensors' shapes (``SHARDED_SHAPES``)."""
    if path.is_dir():
        from vlmtrain.directory_checkpoints import read_directory_checkpoint

        return read_directory_checkpoint(path)
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise DamagedCheckpoint(f"not a complete checkpoint file ({e})") from None
    if bad is not None:
        raise DamagedCheckpoint(f"its entry {bad!r} fails its checksum")
    try:
        return load_weights_only(path, mmap=True)
    except CheckpointError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise DamagedCheckpoint(f"it does not load ({str(e).splitlines()[0]})") from None


SHARDED_SHAPES = "vlmtrain_sharded_shapes"  # see vlmtrain.directory_checkpoints


def choose_checkpoint(ckpt_dir: Path, say: Callable[[str], None]) -> tuple[Path, dict] | None:
    """The newest checkpoint that reads back, with its contents (memory-mapped); damaged
    newer ones are set aside (renamed, by rank 0 only) and named. None when there is no
    checkpoint; an error when there are some and none reads back."""
    if rank_zero_only.rank == 0:
        for p in remove_partial_files(ckpt_dir):
            say(f"removed {p.name}, a checkpoint write cut short by a kill")
    damaged: list[tuple[Path, str]] = []
    for path in candidates(ckpt_dir):
        try:
            contents = read_checkpoint(path)
        except DamagedCheckpoint as e:
            damaged.append((path, str(e)))
            continue
        for bad, why in damaged:
            aside = bad.with_name(bad.name + DAMAGED_SUFFIX)
            if rank_zero_only.rank == 0:
                bad.rename(aside)
            say(f"checkpoint {bad} is damaged: {why}; set aside as {aside.name}")
        if damaged:
            say(f"resuming from the previous checkpoint, {path.name}")
        return path, contents
    if damaged:
        listed = "\n  ".join(f"{p}: {why}" for p, why in damaged)
        raise CheckpointError(
            f"no checkpoint in {ckpt_dir} reads back:\n  {listed}\n"
            f"To train the stage from its start, delete {ckpt_dir} (or move those files away)."
        )
    return None


def check_compatible(
    path: Path,
    contents: dict,
    world_size: int,
    expected_shapes: dict[str, tuple[int, ...]] | None,
    config_diff: Callable[[dict], list[str]],
    stage_dir: Path,
) -> list[str]:
    """Raise CheckpointError when the chosen checkpoint cannot continue this run: another
    number of processes (the data position is per process), another stage config (it would
    be half applied: the schedule and data order were fixed at the start), or another model
    shape. Returns notes for a checkpoint written before these were recorded."""
    restart = (
        f"To train the stage from its start with this config, delete {stage_dir / 'checkpoints'}; "
        "or use another run_name."
    )
    record = contents.get(RECORD_KEY)
    notes = []
    if record is None:
        notes.append(f"{path.name} predates checkpoint records: its config was not checked")
    else:
        if record["world_size"] != world_size and (why := reshard_refusal(record)):
            raise CheckpointError(
                f"checkpoint {path} was written by a run of {record['world_size']} processes; "
                f"this run has {world_size}. {why} " + restart
            )
        changes = config_diff(record)
        if changes:
            shown = "\n  ".join(changes[:12]) + (
                f"\n  ... {len(changes) - 12} more" if len(changes) > 12 else ""
            )
            raise CheckpointError(
                f"stage {stage_dir.name!r} is unfinished in {stage_dir}, and its checkpoint "
                f"{path.name} was written with another config; what changed:\n  {shown}\n"
                "Run it with the values it started with to resume it. " + restart
            )
    if expected_shapes is None:  # checked before the model exists
        return notes
    state = contents.get("state_dict")
    if state is None and SHARDED_SHAPES not in contents:
        return notes  # a DeepSpeed checkpoint: DeepSpeed checks its partitions on load
    if state is None:
        state = {
            k: torch.empty(shape, device="meta") for k, shape in contents[SHARDED_SHAPES].items()
        }
    state = state or {}
    problems = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {shape}"
        for k, shape in expected_shapes.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    problems += [f"{k}: missing from the checkpoint" for k in expected_shapes if k not in state]
    problems += [
        f"{k}: in the checkpoint, not in the model" for k in state if k not in expected_shapes
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint {path} holds another model shape:\n  "
            + "\n  ".join(problems[:12])
            + (f"\n  ... {len(problems) - 12} more" if len(problems) > 12 else "")
            + "\n"
            + restart
        )
    return notes


def reshard_refusal(record: dict) -> str | None:
    """Why the checkpoint ``record`` describes cannot resume on another number of
    processes, with what to do; None when it can: the data position is kept as the
    global number of samples consumed (EpochShuffleSampler), a single-file checkpoint
    holds full tensors, and a distributed (FSDP) one is resharded on load."""
    from vlmtrain.engines import reshard_refusal as strategy_refusal

    return strategy_refusal(record.get("strategy", "auto"))


SPLIT_KEYS = ("stage.accumulate", "stage.batch_size")  # how a step splits over devices


def step_samples(stage: dict, world_size: int) -> int:
    """Samples of one optimizer step over all processes."""
    return stage["batch_size"] * stage["accumulate"] * world_size


def world_size_of(trainer: DictConfig) -> int:
    """The number of processes a trainer config asks for, before any Trainer exists."""
    devices = trainer.devices
    if isinstance(devices, int) and devices > 0:
        per_node = devices
    elif OmegaConf.is_list(devices) or isinstance(devices, list | tuple):
        per_node = len(devices)
    elif str(devices) in ("auto", "-1") and trainer.accelerator in ("gpu", "cuda"):
        per_node = max(torch.cuda.device_count(), 1)
    else:
        per_node = int(devices) if str(devices).isdigit() else 1
    return per_node * trainer.num_nodes


def resume_point(
    chosen: tuple[Path, dict] | None,
    stage_dir: Path,
    identity: dict,
    world_size: int,
    shapes: dict[str, tuple[int, ...]] | None,
    say: Callable[[str], None] | None = None,
) -> str | None:
    """The chosen checkpoint's path once checked against this run: its stage identity
    (config, sources, data), number of processes and, given ``shapes``, model shapes. An
    incompatible one raises CheckpointError before anything is written; ``say`` gets the
    notes and the resume message."""
    if chosen is None:
        return None
    from vlmtrain.artifacts import same_stage
    from vlmtrain.config import schema_defaults

    path, contents = chosen

    def config_diff(record: dict) -> list[str]:
        old = {"config_hash": record["config_hash"], **record["identity"]}
        old["config"] = record["identity"]
        same, why = same_stage(old, identity, schema_defaults())
        # On another number of processes the per-device split of a step may change
        # (stage.global_batch_size derives stage.accumulate): what must not is the
        # number of samples per optimizer step.
        why = [] if same else [w for w in why if w.split(":")[0] not in SPLIT_KEYS]
        old_step = step_samples(record["identity"]["stage"], record["world_size"])
        new_step = step_samples(identity["stage"], world_size)
        if old_step != new_step:
            why.append(
                f"samples per optimizer step: {old_step} -> {new_step} (set "
                f"stage.global_batch_size={old_step} to keep the step on {world_size} processes)"
            )
        return why

    notes = check_compatible(path, contents, world_size, shapes, config_diff, stage_dir)
    if say is not None:
        for note in notes:
            say(note)
        say(f"resuming from {path}")
    return str(path)
