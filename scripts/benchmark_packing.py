"""Packed vs unpacked steps of one stage's mixture, side by side in one run.

    PYTHONPATH=. .venv/bin/python scripts/benchmark_packing.py [--steps 20] [--rounds 3]
        [--capacities 128 256 512] [--recipe tiny --stage sft] [overrides...]

The multitask mixture (text-only lines, VQA, captions, boxes, OCR) at 128 px:

    ... scripts/benchmark_packing.py --recipe tiny_multitask --stage multitask
        --capacities 320 640 1280 +stages.multitask.model.vision.image_size=128

By default, the tiny recipe's ``sft`` stage (VQA 0.6 / captions 0.2 / chats 0.2, 32 samples a
step, square loss averaging, every component training, the conv stem) from fresh
weights, one thread. The first ``--steps`` step batches of its sampler are encoded
once (at the stage's max_length, 128); each variant then lays out the very same
samples its own way and runs the step as ``NextTokenModule`` does (micro-batches of
``batch_size`` rows, forward, backward, AdamW step):

- unpacked: each step's 32 samples right-padded to the longest;
- packed at C: first-fit decreasing into rows of at most C tokens
  (``stage.packing=true stage.max_length=C``; C above 128 truncates nothing more here
  when no sample reaches 128, which the report checks).

Variants alternate within each round; the report gives the median over rounds of
supervised tokens (targets of the loss) per second of this process's CPU time (one
thread; wall-time speed-ups beside it), the padding fraction of the token cells
the LM ran on, and the largest relative difference of a step's loss from the
unpacked one (AdamW runs at lr 0, so every variant sees the same weights).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from vlmtrain.config import register_configs
from vlmtrain.data.encode import collate
from vlmtrain.data.module import StageDataModule
from vlmtrain.data.packing import pack_collate, padding_fraction
from vlmtrain.objectives.next_token import (
    loss_normalizer,
    micro_batch_loss,
    micro_batches,
    reduction_exponent,
    supervised_targets,
)
from vlmtrain.recipe import stage_config
from vlmtrain.train import build_model, make_encoder, prepare_data, resolve_init

CONF = Path(__file__).resolve().parents[1] / "conf"


def stage_from_fresh(recipe: str, stage: str, overrides: list[str]):
    """The root config of one stage of a recipe, every component starting fresh."""
    register_configs()
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", [f"recipe={recipe}", *overrides])
    cfg = stage_config(cfg, stage, cfg.stages[stage])
    with open_dict(cfg):
        for component in ("vision", "projector", "lm"):
            cfg.stage.init[component] = "fresh"
    return cfg


def run_step(model, optimizer, batch, rows: int, exponent: float) -> tuple[float, int]:
    """One optimizer step as NextTokenModule takes it; (loss, token cells run)."""
    optimizer.zero_grad(set_to_none=True)
    total = loss_normalizer(batch["labels"], exponent, batch.get("sample_index"))
    loss, cells = 0.0, 0
    for mb in micro_batches(batch, rows):
        sums = micro_batch_loss(model, mb, exponent, flatten=False)
        (sums.sum() / total).backward()
        loss += float(sums.sum().detach())
        cells += mb["attention_mask"].numel()
    optimizer.step()
    return loss / float(total), cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="step batches per variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--capacities", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--recipe", default="tiny")
    parser.add_argument("--stage", default="sft", help="a next-token stage of the recipe")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()
    torch.set_num_threads(1)

    cfg = stage_from_fresh(args.recipe, args.stage, args.overrides)
    prepare_data(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, model = build_model(cfg, resolve_init(cfg.stage, cfg.model, Path(tmp)))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    exponent = reduction_exponent(cfg.stage.loss_reduction)
    dm = StageDataModule(cfg.data, cfg.stage, make_encoder(cfg, model, tokenizer), cfg.seed)
    dm.setup("fit")
    sampler_order = iter(dm.train_dataloader().sampler)
    step_samples = cfg.stage.batch_size * cfg.stage.accumulate
    steps = [
        [dm.train_set[next(sampler_order)] for _ in range(step_samples)] for _ in range(args.steps)
    ]
    longest = max(len(s["input_ids"]) for step in steps for s in step)
    cut = sum(s["truncated"] for step in steps for s in step)

    pad = tokenizer.pad_token_id
    variants = {"unpacked": [collate(s, pad) for s in steps]}
    for c in args.capacities:
        variants[f"packed at {c}"] = [pack_collate(s, pad, c) for s in steps]
    supervised = sum(int(supervised_targets(b["labels"]).sum()) for b in variants["unpacked"])
    tokens = sum(int(b["attention_mask"].sum()) for b in variants["unpacked"])
    for name, batches in variants.items():
        assert sum(int(supervised_targets(b["labels"]).sum()) for b in batches) == supervised, name

    # CPU time of this (one-thread) process: on a shared machine, wall time measures the
    # neighbours as much as the step. Wall time is reported beside it.
    times: dict[str, list[float]] = {n: [] for n in variants}
    walls: dict[str, list[float]] = {n: [] for n in variants}
    losses: dict[str, list[float]] = {}
    cells: dict[str, int] = {}
    rows = cfg.stage.batch_size
    for _ in range(args.rounds):
        for name, batches in variants.items():
            run_step(model, optimizer, batches[0], rows, exponent)  # warm-up
            t0, w0 = time.process_time(), time.perf_counter()
            out = [run_step(model, optimizer, b, rows, exponent) for b in batches]
            times[name].append(time.process_time() - t0)
            walls[name].append(time.perf_counter() - w0)
            losses[name] = [loss for loss, _ in out]
            cells[name] = sum(c for _, c in out)

    base = statistics.median(times["unpacked"])
    base_wall = statistics.median(walls["unpacked"])
    print(
        f"{args.recipe} recipe, stage {args.stage}, mixture {dict(cfg.stage.mixture)}: "
        f"{args.steps} steps of {step_samples} samples "
        f"({tokens} tokens, {supervised} supervised; longest {longest}, {cut} cut at "
        f"max_length {cfg.stage.max_length}), {args.rounds} rounds, "
        f"{torch.get_num_threads()} thread, loss_reduction={cfg.stage.loss_reduction}"
    )
    print(
        "| layout | rows/step | padding | CPU s/step (rounds' min-max) "
        "| supervised tok/CPU-s | speed-up (CPU) | speed-up (wall) | max loss diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, batches in variants.items():
        t = statistics.median(times[name])
        diff = max(
            abs(a - b) / abs(b) for a, b in zip(losses[name], losses["unpacked"], strict=True)
        )
        n_rows = statistics.mean(b["input_ids"].shape[0] for b in batches)
        print(
            f"| {name} | {n_rows:.1f} | {padding_fraction(cells[name], tokens):.3f} | "
            f"{t / args.steps:.3f} ({min(times[name]) / args.steps:.3f}-"
            f"{max(times[name]) / args.steps:.3f}) | "
            f"{supervised / t:.0f} | {base / t:.2f}x | "
            f"{base_wall / statistics.median(walls[name]):.2f}x | {diff:.1e} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
