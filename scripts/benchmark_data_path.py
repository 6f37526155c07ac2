"""The encoded store and the frozen-tower feature cache, each against what it replaces.

    python scripts/benchmark_data_path.py [--batches 20] [--rounds 3] [overrides...]

1. Loader: the tiny recipe's SFT mixture read for ``--batches`` step batches, encoded on
   the fly vs read from the encoded store (built once beforehand; its build time is
   reported), with 0 and 2 loader workers. CPU seconds per batch count the main process
   and its workers (what the data path costs); wall seconds per batch are what the
   training loop waits, meaningful on an otherwise idle machine.
2. Step: an alignment step (tower and LM frozen, projector trains) on the same batch,
   the tower recomputed vs its features read from the memory cache; interleaved rounds,
   CPU-time medians (one thread).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from vlmtrain.config import register_configs
from vlmtrain.data.module import StageDataModule
from vlmtrain.model.feature_cache import FeatureCache, pixel_keys
from vlmtrain.objectives.next_token import sample_loss_sums, supervised_positions
from vlmtrain.train import build_model, make_encoder, prepare_data, resolve_init

CONF = Path(__file__).resolve().parents[1] / "conf"
STAGE = [
    "stage=sft",
    "+stage.mixture.vqa=0.6",
    "+stage.mixture.caption=0.2",
    "stage.mixture.instruct=0.2",
    "stage.batch_size=32",
    "stage.val_every=0",
    "stage.allow_frozen_fresh=true",
    "data.cache_encoded=false",
]


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # workers, once they exit
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def read_batches(cfg, encoder, n: int) -> tuple[float, float]:
    dm = StageDataModule(cfg.data, cfg.stage, encoder, cfg.seed)
    dm.setup("fit")
    cpu, wall = cpu_seconds(), time.perf_counter()
    loader = dm.train_dataloader()
    for k, _ in enumerate(loader):
        if k + 1 == n:
            break
    del loader  # workers exit and are counted
    return (cpu_seconds() - cpu) / n, (time.perf_counter() - wall) / n


def align_step(model, batch, cache: FeatureCache | None, keys) -> None:
    pixels, features = batch["pixel_values"], None
    if cache is not None:
        features = model.multi_modal_projector(
            cache.tower_features(model.vision_tower, pixels, keys)
        )
        pixels = None
    logits = model(
        batch["input_ids"],
        batch["attention_mask"],
        pixels,
        logits_at=supervised_positions(batch["labels"]),
        image_features=features,
    )
    sample_loss_sums(logits, batch["labels"]).sum().backward()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed align steps per round")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    register_configs()
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", [*STAGE, *args.overrides])
    prepare_data(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, model = build_model(cfg, resolve_init(cfg.stage, cfg.model, Path(tmp)))
        encoder = make_encoder(cfg, model, tokenizer)
        t0 = time.perf_counter()
        cfg.data.encoded_store = str(Path(tmp) / "store")
        StageDataModule(cfg.data, cfg.stage, encoder, cfg.seed).setup("fit")
        build = time.perf_counter() - t0
        print(f"encoded store built in {build:.1f} s (once per data + encoder settings)")
        print("| loader | workers | CPU s / batch | wall s / batch |\n|---|---:|---:|---:|")
        for store in (None, str(Path(tmp) / "store")):
            for workers in (0, 2):
                cfg.data.encoded_store, cfg.data.num_workers = store, workers
                cpu, wall = read_batches(cfg, encoder, args.batches)
                name = "encoded store" if store else "encode on the fly"
                print(f"| {name} | {workers} | {cpu:.3f} | {wall:.3f} |")

        cfg.data.encoded_store, cfg.data.num_workers = None, 0
        dm = StageDataModule(cfg.data, cfg.stage, encoder, cfg.seed)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    keys = pixel_keys(batch["pixel_values"])
    cache = FeatureCache("memory")
    align_step(model, batch, cache, keys)  # fills the cache
    times: dict[str, list[float]] = {"recomputed": [], "cached": []}
    for _ in range(args.rounds):
        for name, c in (("recomputed", None), ("cached", cache)):
            t0 = time.process_time()
            for _ in range(args.steps):
                align_step(model, batch, c, keys)
            times[name].append((time.process_time() - t0) / args.steps)
    rec, cached = (statistics.median(times[k]) for k in ("recomputed", "cached"))
    print(
        f"align step (frozen tower): recomputed {rec:.3f} s, feature cache {cached:.3f} s "
        f"({rec / cached:.2f}x), CPU-time medians of {args.rounds} rounds"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
