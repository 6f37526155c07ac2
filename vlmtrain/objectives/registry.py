"""The objectives a stage can name (``stage.objective``), each one module and one entry here.

Each module exposes ``OBJECTIVE``, an ``Objective``: how to check the stage's
config before any model work, how to build its LightningModule and the data
it trains on, and what it adds to the plan's memory estimate. ``train.py`` and
``plan.py`` know objectives only through this registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

OBJECTIVES = {
    "next_token": "vlmtrain.objectives.next_token",
    "preference": "vlmtrain.objectives.preference_module",
    "aim": "vlmtrain.objectives.aim",
    "grpo": "vlmtrain.objectives.grpo",
    "generate": "vlmtrain.objectives.generate",
}


def _nothing_to_check(cfg: Any) -> None:
    return None


def _no_extra_memory(cfg: Any, counts: dict[str, tuple[int, int]], bytes_per_param: int) -> dict:
    return {}


@dataclass(frozen=True)
class Objective:
    # (cfg, model, tokenizer, encoder, stage_dir) -> (LightningModule, LightningDataModule);
    # ``encoder`` is the stage's SampleEncoder (tokenizer, image processor, max length).
    build: Callable[..., tuple[Any, Any]]
    # Fails at start, naming the config keys, on a combination the objective cannot run.
    check: Callable[[Any], None] = _nothing_to_check
    # Sequences the LM runs per sample (a preference pair runs chosen and rejected; 0: the
    # objective never runs the LM, as AIM pretraining of the tower).
    sequences_per_sample: int = 1
    # Extra per-device memory in bytes by name (e.g. a reference model), for plan=true.
    extra_memory: Callable[..., dict[str, float]] = _no_extra_memory
    # Whether its data module and loss honour stage.packing (vlmtrain.data.packing).
    packing: bool = False

    def check_stage(self, cfg: Any) -> None:
        """``check``, after refusing stage.packing where the objective cannot pack."""
        if cfg.stage.get("packing") and not self.packing:
            raise ValueError(
                f"stage.packing=true is not supported by stage.objective="
                f"{cfg.stage.objective!r} (stage {cfg.stage.name!r}); only next_token packs. "
                "Set stage.packing=false."
            )
        self.check(cfg)


def objective_for(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"stage.objective={name!r}; expected one of {sorted(OBJECTIVES)}")
    return importlib.import_module(OBJECTIVES[name]).OBJECTIVE
