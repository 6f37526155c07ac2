"""Projectors from vision features to the LM's embedding space."""

from __future__ import annotations

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


PROJECTORS = {"linear": LinearProjector, "mlp2x_gelu": MLP2xGeluProjector}


def build_projector(kind: str, d_vision: int, d_lm: int) -> nn.Module:
    if kind not in PROJECTORS:
        raise ValueError(f"model.projector.type={kind!r}: expected one of {sorted(PROJECTORS)}")
    return PROJECTORS[kind](d_vision, d_lm)
