"""AdamW's three CPU implementations on the tiny recipe's model, side by side.

    .venv/bin/python scripts/benchmark_optimizer.py [--steps 40] [--rounds 3] [overrides...]

The model's parameters (all trainable, in the optimizer's decay / no-decay groups per
component) get the same seeded gradients under each implementation in one process:
the per-tensor loop (torch's CPU default), ``foreach`` and ``fused`` (vlmtrain's
choice). The report gives the median seconds per ``step()``, the ratio to the loop,
and how far each one's parameters end from the loop's after all steps.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from vlmtrain.config import register_configs
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.objectives.optim import param_groups

CONF = Path(__file__).resolve().parents[1] / "conf"
IMPLS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()

    register_configs()
    overrides = ["recipe=tiny", "+model.lm.vocab_size=600", *args.overrides]
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", overrides)
    stage = cfg.stages.sft
    torch.manual_seed(0)
    model = VisionLanguageModel.build(cfg.model, None)
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=g) for p in model.parameters()] for _ in range(4)]

    runs = {}
    for name, kwargs in IMPLS.items():
        m = copy.deepcopy(model)
        params = list(m.parameters())
        groups = param_groups(m.components(), stage.optim, stage.trainable)
        opt = torch.optim.AdamW(groups, lr=stage.optim.lr, **kwargs)
        runs[name] = (params, opt, [])

    for r in range(args.rounds):
        for params, opt, times in runs.values():
            for i in range(args.steps):
                for p, grad in zip(params, grads[(r * args.steps + i) % len(grads)], strict=True):
                    p.grad = grad.clone()
                t0 = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t0)

    loop_params = runs["loop"][0]
    loop_time = statistics.median(runs["loop"][2])
    n = sum(p.numel() for p in loop_params)
    print(f"{n:,} parameters in {len(loop_params)} tensors, {args.rounds}x{args.steps} steps each")
    print("| implementation | ms per step | vs loop | max abs difference from loop |")
    print("|---|---|---|---|")
    for name, (params, _, times) in runs.items():
        t = statistics.median(times)
        diff = max((a - b).abs().max().item() for a, b in zip(params, loop_params, strict=True))
        print(f"| {name} | {t * 1e3:.2f} | {t / loop_time:.2f} | {diff:.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
