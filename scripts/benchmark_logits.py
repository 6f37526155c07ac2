"""A training step with logits everywhere vs. only where a supervised token is predicted.

    .venv/bin/python scripts/benchmark_logits.py [--vocab 32000] [--steps 20] [overrides...]

One real SFT step batch of the shapes mixture (VQA, captions, chats) goes
through forward + backward both ways, alternating, in one process; the report
gives the median time of each and their ratio, and the size of the logits
tensor each way. ``--vocab`` grows the LM's vocabulary to a real tokenizer's
size, where the full logits tensor is what fills memory.
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

from vlmtrain.config import register_configs
from vlmtrain.data.module import StageDataModule
from vlmtrain.objectives.next_token import supervised_positions, token_loss_sum
from vlmtrain.train import build_model, make_encoder, prepare_data, resolve_init

CONF = Path(__file__).resolve().parents[1] / "conf"
STAGE = [
    "stage=sft",
    "stage.trainable.vision=true",
    "+stage.mixture.vqa=0.6",
    "+stage.mixture.caption=0.2",
    "stage.mixture.instruct=0.2",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=0, help="grow the vocabulary to this size")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()

    register_configs()
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", [*STAGE, f"stage.batch_size={args.batch_size}", *args.overrides])
    prepare_data(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, model = build_model(cfg, resolve_init(cfg.stage, cfg.model, Path(tmp)))
    if args.vocab:
        model.language_model.resize_token_embeddings(args.vocab)
    dm = StageDataModule(cfg.data, cfg.stage, make_encoder(cfg, model, tokenizer), cfg.seed)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    inputs = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    at = supervised_positions(batch["labels"])

    def step(only_supervised: bool) -> None:
        model.zero_grad(set_to_none=True)
        logits = model(*inputs, logits_at=at if only_supervised else None)
        token_loss_sum(logits, batch["labels"]).backward()

    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for variant in (False, True):
            step(variant)  # warm-up
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(variant)
            times[variant].append((time.perf_counter() - t0) / args.steps)

    vocab = model.language_model.get_output_embeddings().weight.shape[0]
    full_mb = batch["input_ids"].numel() * vocab * 4 / 2**20
    kept_mb = int(at.sum()) * vocab * 4 / 2**20
    full, kept = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"batch {tuple(batch['input_ids'].shape)}, vocabulary {vocab}, threads {torch.get_num_threads()}"
    )
    print("| logits | s/step (median) | logits tensor (fp32) |")
    print("|---|---:|---:|")
    print(f"| every position | {full:.4f} | {full_mb:.1f} MB |")
    print(f"| supervised positions only | {kept:.4f} | {kept_mb:.1f} MB |")
    print(f"speed-up {full / kept:.2f}x, logits memory / {full_mb / kept_mb:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
