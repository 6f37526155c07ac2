"""What a trainer config names: strategies Lightning knows, and the memory of a device.

Both are checked before anything is built: a misspelt strategy would otherwise fail deep
in Lightning, and a plan whose estimate exceeds the device's memory warns before a
cluster job is queued.
"""

from __future__ import annotations

from omegaconf import DictConfig

# GiB of memory of GPUs researchers train on (what `trainer.device_memory` may name).
KNOWN_GPUS_GIB = {
    "a100-40gb": 40,
    "a100-80gb": 80,
    "h100": 80,
    "h100-80gb": 80,
    "h200": 141,
    "b200": 180,
    "l40s": 48,
    "a10g": 24,
    "v100-16gb": 16,
    "v100-32gb": 32,
    "rtx4090": 24,
}
ASSUMED_GPU = "a100-80gb"  # when nothing says which GPU a plan is for


def known_strategies() -> list[str]:
    from lightning.pytorch.strategies import StrategyRegistry

    return ["auto", *sorted(StrategyRegistry.available_strategies())]


def check_strategy(name: str) -> None:
    known = known_strategies()
    if name not in known:
        raise ValueError(
            f"trainer.strategy={name!r} is not a strategy Lightning knows; one of: "
            + ", ".join(known)
        )


def device_memory_gib(trainer: DictConfig) -> tuple[float | None, str]:
    """(GiB per device, where that figure comes from); None for CPU training."""
    spec = trainer.device_memory
    if spec is not None:
        if isinstance(spec, int | float):
            return float(spec), "trainer.device_memory"
        key = str(spec).lower()
        if key not in KNOWN_GPUS_GIB:
            raise ValueError(
                f"trainer.device_memory={spec!r}: a number of GiB or one of "
                + ", ".join(KNOWN_GPUS_GIB)
            )
        return float(KNOWN_GPUS_GIB[key]), f"trainer.device_memory={key}"
    if trainer.accelerator == "cpu":
        return None, "cpu"
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory / 2**30, props.name
    return float(KNOWN_GPUS_GIB[ASSUMED_GPU]), f"assumed {ASSUMED_GPU}; set trainer.device_memory"
