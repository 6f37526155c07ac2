"""A tower carried into a stage of another resolution: its position table is resized once.

A stage sets its resolution as part of its model (``stages.<name>.model.vision.
image_size``). A SigLIP/CLIP tower learned one absolute position embedding per patch
of its native grid; carried into a stage whose grid differs, that table is resized by
bicubic interpolation over the 2-D grid (in fp32, corners not aligned, as transformers'
``interpolate_pos_encoding`` does at every forward), with CLIP's class-token embedding
kept apart. A ``vit_hybrid`` tower (DPT's hybrid embedding) is resized as DPT itself
resizes it at a forward of another size: bilinear, its class token kept apart. It is
done once, when the stage loads the carried tower: the stage's model is built at the
new resolution, the resized table is its weight, and the artifact records that table
and that resolution, so later stages, ``eval`` and ``export`` load it as it is.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

# A tower's position table inside a VisionTower's state dict, by the end of its key, and
# the interpolation its transformers class applies to it: SigLIP and CLIP hold an
# (N, D) embedding weight, DPT's hybrid embedding a (1, N, D) parameter.
_TABLES = {
    "embeddings.position_embedding.weight": "bicubic",
    "embeddings.position_embeddings": "bilinear",
}


def position_table_mode(key: str) -> str | None:
    """How the position table at ``key`` is interpolated; None if it is not one."""
    return next((mode for end, mode in _TABLES.items() if key.endswith(end)), None)


def is_position_table(key: str) -> bool:
    return position_table_mode(key) is not None


def resize_position_table(
    table: torch.Tensor, positions: int, has_class_token: bool, mode: str = "bicubic"
):
    """``table`` (N, D), or (1, N, D), of a square patch grid (after a class-token row
    when ``has_class_token``) resized to ``positions`` rows of a square grid."""
    if table.dim() == 3:
        return resize_position_table(table[0], positions, has_class_token, mode)[None]
    extra = 1 if has_class_token else 0
    old, new = _side(table.shape[0] - extra), _side(positions - extra)
    if old is None or new is None:
        raise ValueError(
            f"position table of {table.shape[0]} rows cannot become {positions}: "
            "only square patch grids are interpolated"
        )
    if old == new:
        return table.clone()
    cls, grid = table[:extra], table[extra:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode=mode, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new * new, dim).to(table.dtype)
    return torch.cat([cls, grid]) if extra else grid


def _side(n: int) -> int | None:
    side = math.isqrt(n) if n > 0 else 0
    return side if side and side * side == n else None
