"""Projectors from vision features to the LM's embedding space."""

from __future__ import annotations

import math

import torch
from torch import nn


class LinearProjector(nn.Module):
    def __init__(self, d_vision: int, d_lm: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_vision, d_lm)

    def forward(self, x):
        return self.linear_1(x)


class MLP2xGeluProjector(nn.Module):
    """LLaVA-1.5 ``mlp2x_gelu``; attribute names match transformers' LlavaMultiModalProjector."""

    def __init__(self, d_vision: int, d_lm: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_vision, d_lm)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d_lm, d_lm)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class PixelShuffleMLPProjector(nn.Module):
    """InternVL's pixel shuffle + MLP: each ``r x r`` block of patch features becomes one
    token of ``r*r`` times the width (so r=2 gives 4x fewer image tokens), then
    LayerNorm -> Linear -> GELU -> Linear."""

    def __init__(self, d_vision: int, d_lm: int, downsample: int):
        super().__init__()
        self.downsample = downsample
        d_in = d_vision * downsample**2
        self.norm = nn.LayerNorm(d_in)
        self.linear_1 = nn.Linear(d_in, d_lm)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d_lm, d_lm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, c = x.shape
        side, r = math.isqrt(tokens), self.downsample
        if side * side != tokens or side % r:
            raise ValueError(
                f"pixel shuffle needs a square grid divisible by {r}, got {tokens} tokens"
            )
        x = x.view(n, side // r, r, side // r, r, c).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(n, (side // r) ** 2, r * r * c)
        return self.linear_2(self.act(self.linear_1(self.norm(x))))


def build_projector(kind: str, d_vision: int, d_lm: int, downsample: int = 1) -> nn.Module:
    if kind == "linear":
        return LinearProjector(d_vision, d_lm)
    if kind == "mlp2x_gelu":
        return MLP2xGeluProjector(d_vision, d_lm)
    if kind == "pixel_shuffle_mlp":
        return PixelShuffleMLPProjector(d_vision, d_lm, downsample)
    raise ValueError(
        f"model.projector.type={kind!r}: expected linear, mlp2x_gelu or pixel_shuffle_mlp"
    )
