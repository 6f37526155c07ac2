"""The ``vlmtrain`` command.

``vlmtrain [hydra overrides]`` trains (Hydra app: ``--cfg job``, ``-m`` and all
overrides work); ``vlmtrain generate-shapes ...`` writes the shapes data set;
``vlmtrain export`` / ``vlmtrain chat`` export an artifact to transformers and talk to it.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vlmtrain.config import register_configs

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

register_configs()

# Known-harmless noise from dependencies; everything else still shows.
for pattern in (
    ".*set_vital.*",
    ".*LeafSpec.*",
    ".*pre-optimization state.*",
    ".*litlogger.*",
    ".*Experiment logs directory.*",
):
    warnings.filterwarnings("ignore", message=pattern)


def _quiet_lightning() -> None:
    """Lightning installs its own console handler; Hydra already logs to console and
    file, so without this every Lightning line shows twice."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def train_main(cfg: DictConfig) -> None:
    from vlmtrain.recipe import run_recipe

    _quiet_lightning()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.plan:
        from vlmtrain.plan import plan_recipe

        plan_recipe(cfg, run_dir)
        return
    run_recipe(cfg, run_dir)


SUBCOMMANDS = {
    "generate-shapes": "vlmtrain.data.shapes",
    "eval": "vlmtrain.eval.cli",
    "export": "vlmtrain.export",
    "chat": "vlmtrain.chat",
}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        import importlib

        name = sys.argv[1]
        sys.exit(importlib.import_module(SUBCOMMANDS[name]).main(sys.argv[2:]))
    train_main()


if __name__ == "__main__":
    main()
