"""Experiment loggers; each continues the same run when a stage resumes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig


def build_logger(cfg: DictConfig, stage_dir: Path) -> Logger:
    kind = cfg.logger.type
    if kind == "csv":
        # A fixed version directory: a resumed stage appends to the same metrics.csv.
        return CSVLogger(save_dir=stage_dir, name="logs", version="csv")
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
