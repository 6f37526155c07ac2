"""Optimizer over trainable parameters only, per-component learning rates, warmup + cosine."""

from __future__ import annotations

import math

import torch
from torch import nn

from vlmtrain.config import OptimConfig, TrainableConfig


def param_groups(
    components: dict[str, nn.Module], optim: OptimConfig, trainable: TrainableConfig
) -> list[dict]:
    """One group per (component, decay / no decay). Frozen parameters are never handed over,
    so they get no optimizer state. Biases and norms (1-D tensors) get no weight decay."""
    groups = []
    for name, module in components.items():
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            continue
        lr = optim.lr * float(trainable.lr_mult.get(name, 1.0))
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        for suffix, ps, wd in (("", decay, optim.weight_decay), ("_no_decay", no_decay, 0.0)):
            if ps:
                groups.append({"name": name + suffix, "params": ps, "lr": lr, "weight_decay": wd})
    if not groups:
        raise ValueError("stage.trainable leaves no trainable parameter")
    return groups


def build_optimizer(groups: list[dict], optim: OptimConfig) -> torch.optim.Optimizer:
    # Fused: one kernel over all parameters, on CPU as on GPU. torch's CPU default is a
    # per-tensor loop, 4-7x slower on the tiny model (scripts/benchmark_optimizer.py); the
    # results differ from it by float rounding only. Other devices keep torch's default.
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = devices <= {"cpu", "cuda"} or None
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), fused=fused)


def warmup_cosine(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """LR multiplier at step s: linear warmup from 0, then cosine down to ``min_lr_ratio``."""
    warmup = int(math.ceil(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
