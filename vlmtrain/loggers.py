"""Experiment loggers; each continues the same run when a stage resumes."""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig


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


def build_logger(cfg: DictConfig, stage_dir: Path) -> Logger:
    kind = cfg.logger.type
    if kind == "csv":
        # A fixed version directory: a resumed stage appends to the same metrics.csv.
        # Flushed every step: a killed job loses no logged row.
        return ResumableCSVLogger(
            save_dir=stage_dir, name="logs", version="csv", flush_logs_every_n_steps=1
        )
    if kind == "tensorboard":
        return TensorBoardLogger(save_dir=stage_dir, name="logs", version="tensorboard")
    if kind == "wandb":
        # The id comes from the stage directory, so a re-run continues the same wandb run.
        run_id = hashlib.sha1(str(stage_dir.resolve()).encode()).hexdigest()[:12]
        return WandbLogger(
            project=cfg.logger.project,
            name=f"{cfg.run_name}/{cfg.stage.name}",
            id=run_id,
            resume="allow",
            save_dir=str(stage_dir),
            mode=cfg.logger.mode,
        )
    raise ValueError(f"logger.type={kind!r}: expected csv, tensorboard or wandb")
