"""Experiment loggers; each continues the same run when a stage resumes."""

from __future__ import annotations

import csv
import hashlib
import os
import uuid
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from vlmtrain.durable import atomic_write
from vlmtrain.records import trainings_set_aside


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed stage must append."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def build_logger(cfg: DictConfig, stage_dir: Path, *, fresh_start: bool = False) -> list[Logger]:
    """The chosen logger, after a CSV logger that every stage keeps whatever the choice:
    summaries and the loss-curve plot read it, so they work with any logger. With
    ``fresh_start`` the stage trains from scratch (an earlier training's logs are about
    to be set aside, see vlmtrain.records): a new run for loggers that keep runs."""
    kind = cfg.logger.type
    # A fixed version directory: a resumed stage appends to the same metrics.csv.
    # Flushed every step: a killed job loses no logged row.
    csv_logger = ResumableCSVLogger(
        save_dir=stage_dir, name="logs", version="csv", flush_logs_every_n_steps=1
    )
    if kind == "csv":
        return [csv_logger]
    if kind == "tensorboard":
        return [
            csv_logger,
            TensorBoardLogger(save_dir=stage_dir, name="logs", version="tensorboard"),
        ]
    if kind == "wandb":
        wandb = WandbLogger(
            project=cfg.logger.project,
            name=f"{cfg.run_name}/{cfg.stage.name}",
            id=wandb_run_id(stage_dir, fresh_start),
            resume="allow",
            save_dir=str(stage_dir),
            mode=cfg.logger.mode,
        )
        return [csv_logger, wandb]
    raise ValueError(f"logger.type={kind!r}: expected csv, tensorboard or wandb")


WANDB_ID_FILE = "wandb_run_id"


def wandb_run_id(stage_dir: Path, fresh_start: bool) -> str:
    """The stage's wandb run id, kept in ``<stage>/wandb_run_id``: a resumed stage (a
    requeued job, a re-run command) continues the same wandb run, wherever the run
    directory has moved since; a stage trained from scratch starts a new run."""
    path = Path(stage_dir) / WANDB_ID_FILE
    if not fresh_start and path.is_file():
        return path.read_text().strip()
    if not fresh_start:
        # Begun by a vlmtrain that kept no id file: the id it derived from the directory.
        training = trainings_set_aside(stage_dir)
        key = f"{stage_dir.resolve()}#{training}" if training else str(stage_dir.resolve())
        run_id = hashlib.sha1(key.encode()).hexdigest()[:12]
    else:
        run_id = uuid.uuid4().hex[:12]
    if rank_zero_only.rank == 0:  # other ranks log nothing to wandb
        atomic_write(path, lambda f: f.write(run_id.encode()))
    return run_id


def log_location(logger: Logger) -> str:
    """Where a logger's records are, as a user would open them."""
    if isinstance(logger, CSVLogger):
        return str(Path(logger.log_dir) / "metrics.csv")
    if isinstance(logger, WandbLogger):
        run = logger.experiment
        url = getattr(run, "url", None)
        return url or str(Path(run.dir).parent)
    return str(logger.log_dir)
