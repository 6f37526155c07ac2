"""Frozen-tower feature cache: a frozen vision tower's output, computed once per image.

In a stage whose tower does not train and whose images are deterministic (no
augmentation), the tower maps the same pixels to the same features every
epoch; caching them removes its forward pass from every later step.
``trainer.feature_cache`` picks where they are kept:

- ``memory``: in the process, on the device they were computed on;
- ``disk``: one safetensors file per image under ``<stage dir>/feature_cache/<tower>``,
  ``<tower>`` a digest of the tower's weights, so later runs and resumes of the same
  tower read them instead of recomputing.

Images are keyed by a digest of their pixel values (taken on the CPU before the batch
moves to the device), so any change of image or processing misses the cache. A
cached feature is the tower's output for that very image, computed with the other
new images of its batch: recomputation gives the same values (tested; batched
arithmetic may differ in the last bit).
The cache is refused where it would change training: a trainable tower, a tower with
dropout, or augmented images (those stages say why and run without it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

MODES = ("memory", "disk")


def pixel_keys(pixels: torch.Tensor | None) -> list[str]:
    """One digest per image of ``pixels`` (CPU)."""
    if pixels is None:
        return []
    flat = pixels.detach().cpu().contiguous()
    return [hashlib.blake2b(p.numpy().tobytes(), digest_size=16).hexdigest() for p in flat]


def weights_digest(module: nn.Module) -> str:
    digest = hashlib.blake2b(digest_size=8)
    for name, t in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def why_not_cacheable(tower: nn.Module, trainable: bool, augmented: bool) -> str | None:
    """The reason the tower's features may not be cached, or None."""
    if trainable or any(p.requires_grad for p in tower.parameters()):
        return "the vision tower trains"
    if augmented:
        return "the stage augments its images"
    config = getattr(tower, "config", None)
    drops = {k: v for k, v in (config.to_dict() if config else {}).items() if "dropout" in k}
    if tower.training and any(v for v in drops.values() if isinstance(v, (int, float))):
        return f"the tower has dropout ({drops}), so its output is random"
    return None


class FeatureCache:
    def __init__(self, mode: str, directory: Path | None = None):
        if mode not in MODES:
            raise ValueError(f"trainer.feature_cache={mode!r}; expected one of {MODES} or null")
        if mode == "disk" and directory is None:
            raise ValueError("trainer.feature_cache=disk needs a directory")
        self.mode = mode
        self.directory = directory
        self.memory: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def _get(self, key: str, device) -> torch.Tensor | None:
        if key in self.memory:
            return self.memory[key]
        if self.mode == "disk" and self._path(key).is_file():
            return load_file(self._path(key))["features"].to(device)
        return None

    def _put(self, key: str, features: torch.Tensor) -> None:
        if self.mode == "memory":
            self.memory[key] = features
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"features": features.contiguous().cpu()}, str(tmp))
        tmp.replace(path)  # atomic: a killed run leaves no half-written file

    @torch.no_grad()
    def tower_features(self, tower: nn.Module, pixels: torch.Tensor, keys: list[str]):
        """The tower's output for each image of ``pixels``: cached, or computed (the
        missing images of the batch in one forward pass) and cached."""
        if len(keys) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {len(keys)} cache keys")
        found = [self._get(key, pixels.device) for key in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = tower(pixels[missing])
            for i, features in zip(missing, computed, strict=True):
                found[i] = features.clone()  # not a view that keeps the batch alive
                self._put(keys[i], found[i])
        return torch.stack(found)
