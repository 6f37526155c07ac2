"""Progressive LM upscaling on the shapes world: a carried encoder vs a fresh one, side by side.

    python scripts/demo_progressive.py [--budget 800] [--data-root data/generated/shapes]

InternVL 2.5's claim: an encoder trained with a small LM, carried to a larger LM with a
fresh projector, reaches the larger model's accuracy with a fraction of its training.
Every run goes through the `vlmtrain` command line, one thread each, in parallel where
the runs do not depend on each other:

  small_lm / large_lm  text-only pretraining of the two LMs (the "pretrained LMs"):
                       small = the tiny llama (2 layers, 64 wide), large = 4 layers, 128 wide
  (a) fresh            the large LM with a fresh encoder, B large-LM steps: align (encoder
                       + projector, LM frozen) then SFT (everything), as recipes/tiny.yaml
  (b) carried          recipes/internvl25_progressive.yaml with tiny substitutes: the small
                       LM's stages (MLP warm-up, ViT incremental learning, full tuning), then
                       the large LM with the encoder of the last small stage and a fresh
                       projector: MLP warm-up, then full tuning, B large-LM steps in all
  (b/2) carried_half   the same hand-off (from (b)'s artifact by path), B/2 steps

Held-out VQA (test and test_unseen, greedy exact match) per question type comes from each
run's eval; the table counts large-LM steps and their wall time (the small-LM stages of
(b) are its extra cost, reported on their own line).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from side_by_side import launch, wait

REPO = Path(__file__).resolve().parents[1]
LARGE_LM = [
    "hidden_size=128",
    "intermediate_size=256",
    "num_hidden_layers=4",
    "num_attention_heads=4",
]
# The SFT of recipes/tiny.yaml, for every full-tuning stage of every arm.
SFT = [
    "batch_size=16",
    "max_length=128",
    "loss_reduction=square",
    "optim.lr=1e-3",
    "optim.weight_decay=0.0",
    "optim.warmup_ratio=0.03",
    "trainable.vision=true",
    "trainable.projector=true",
    "trainable.lm=true",
    "trainable.lr_mult.vision=0.5",
    "val_every=0",
]
SFT_MIXTURE = ["+{s}.mixture.vqa=0.6", "+{s}.mixture.caption=0.2", "{s}.mixture.instruct=0.2"]
WARMUP = ["batch_size=16", "max_length=128", "optim.lr=1e-3", "optim.weight_decay=0.0"]
SPLITS = ("test", "test_unseen")


def stage_args(prefix: str, settings: list[str]) -> list[str]:
    return [f"{prefix}.{s}" for s in settings]


def artifact(out: Path, run: str, stage: str) -> Path:
    return out / run / stage / "artifact"


def wall(out: Path, run: str, stages: list[str]) -> float:
    total = 0.0
    for stage in stages:
        manifest = json.loads((artifact(out, run, stage) / "manifest.json").read_text())
        total += manifest["metrics"]["wall_time_s"]
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=800, help="B: large-LM steps of (a), (b)")
    parser.add_argument("--warmup", type=int, default=50, help="MLP warm-up steps (large LM)")
    parser.add_argument("--align", type=int, default=150, help="(a): align steps out of B")
    parser.add_argument("--lm-steps", type=int, default=300, help="text pretraining of each LM")
    parser.add_argument("--small-vit", type=int, default=400, help="small LM: ViT incremental")
    parser.add_argument("--small-full", type=int, default=800, help="small LM: full tuning")
    parser.add_argument("--seed", type=int, default=0, help="initialization and data order")
    parser.add_argument("--eval-limit", type=int, default=None, help="questions per split")
    parser.add_argument("--data-root", default=str(REPO / "data/generated/shapes"))
    parser.add_argument("--out", default=str(REPO / "runs/demo_progressive"))
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    B = args.budget
    common = [
        f"data.root={args.data_root}",
        f"output_dir={out}",
        "trainer.progress_bar=false",
        "trainer.num_threads=1",
        "data.cache_encoded=false",  # under one epoch per run: the cache would only cost RAM
        "model.vision.stem=conv",  # the tiny recipe's tower
        "model.vision.stem_blocks=2",
        f"seed={args.seed}",
    ]
    limit = [] if args.eval_limit is None else [f"eval_limit={args.eval_limit}"]
    start = time.perf_counter()

    # 1. The two pretrained LMs (text only).
    lm = ["stage=lm_pretrain", f"stage.max_steps={args.lm_steps}", "stage.batch_size=32"]
    wait(
        {
            "small_lm": launch("small_lm", lm, common, out),
            "large_lm": launch(
                "large_lm", [*lm, *[f"model.lm.{d}" for d in LARGE_LM]], common, out
            ),
        },
        out,
    )
    small_lm, large_lm = (
        artifact(out, "small_lm", "lm_pretrain"),
        artifact(out, "large_lm", "lm_pretrain"),
    )

    # 2. (a) and (b) side by side; (b/2) starts once (b)'s small-LM encoder is finished.
    fresh = [
        "recipe=tiny",
        "~stages.lm_pretrain",
        *[f"model.lm.{d}" for d in LARGE_LM],
        f"stages.align.init.lm={large_lm}",
        f"stages.align.max_steps={args.align}",
        "stages.align.batch_size=16",
        f"stages.sft.max_steps={B - args.align}",
        *stage_args("stages.sft", SFT),
        "stages.sft.eval_splits=[test,test_unseen]",
        *stage_args("stages.sft", limit),
    ]

    def progressive(large_steps: int, encoder: str, small: bool) -> list[str]:
        big = ["stages.mlp_warmup_78b", "stages.full_78b"]
        a = [
            "recipe=internvl25_progressive",
            "model=tiny",
            "data=shapes",
            "trainer=cpu",
            "trainer.activation_checkpointing=false",
            "model/lm@stages.mlp_warmup_78b.model.lm=tiny_llama",
            *[f"stages.mlp_warmup_78b.model.lm.{d}" for d in LARGE_LM],
            f"stages.mlp_warmup_78b.init.lm={large_lm}",
            f"stages.mlp_warmup_78b.init.vision={encoder}",
            f"stages.mlp_warmup_78b.max_steps={args.warmup}",
            f"stages.full_78b.max_steps={large_steps - args.warmup}",
            "stages.full_78b.eval_splits=[test,test_unseen]",
            *stage_args("stages.full_78b", limit),
        ]
        small_stages = ["stages.mlp_warmup", "stages.vit_incremental", "stages.full"]
        for s in big + (small_stages if small else []):
            a += [f"{s}.global_batch_size=null", f"{s}.optim.warmup_ratio=0.03"]
            a += stage_args(s, WARMUP)
        for s in ("stages.full_78b", *(["stages.full"] if small else [])):
            a += stage_args(s, SFT) + [m.format(s=s) for m in SFT_MIXTURE]
        if small:
            a += [
                "stages.mlp_warmup.init.vision=fresh",
                f"stages.mlp_warmup.init.lm={small_lm}",
                f"stages.mlp_warmup.max_steps={args.warmup}",
                f"stages.vit_incremental.init.lm={small_lm}",
                f"stages.vit_incremental.max_steps={args.small_vit}",
                "stages.vit_incremental.trainable.lr_mult.vision=0.5",
                "stages.full.init.lm=from:vit_incremental",
                f"stages.full.max_steps={args.small_full}",
                "stages.full.eval_splits=[test,test_unseen]",
                *stage_args("stages.full", limit),
            ]
        else:
            a += ["~stages.mlp_warmup", "~stages.vit_incremental", "~stages.full"]
        return a

    procs = {
        "fresh": launch("fresh", fresh, common, out),
        "carried": launch("carried", progressive(B, "from:full", small=True), common, out),
    }
    encoder = artifact(out, "carried", "full")
    while not (encoder / "manifest.json").is_file():
        if procs["carried"].poll() is not None:
            break
        time.sleep(5)
    procs["carried_half"] = launch(
        "carried_half", progressive(B // 2, str(encoder), small=False), common, out
    )
    wait(procs, out)
    report(out, args, B, time.perf_counter() - start)
    return 0


def report(out: Path, args, B: int, elapsed: float) -> None:
    rows = [
        (
            "small LM alone (2x64), for reference",
            "carried",
            "full",
            ["mlp_warmup", "vit_incremental", "full"],
            args.warmup + args.small_vit + args.small_full,
        ),
        ("(a) large LM, fresh encoder", "fresh", "sft", ["align", "sft"], B),
        ("(b) large LM, carried encoder", "carried", "full_78b", ["mlp_warmup_78b", "full_78b"], B),
        (
            "(b/2) large LM, carried encoder",
            "carried_half",
            "full_78b",
            ["mlp_warmup_78b", "full_78b"],
            B // 2,
        ),
    ]
    results = {}
    types = None
    lines = []
    for label, run, final, stages, steps in rows:
        evaluation = json.loads((out / run / final / "eval" / "eval.json").read_text())
        types = sorted(set(types or []) | set(evaluation["test"]["per_type"]))
        results[label] = {"steps": steps, "wall_s": wall(out, run, stages), "eval": evaluation}
    header = "| model | steps | train s | " + " | ".join(
        f"{split} {t}" for split in SPLITS for t in ["overall", *types]
    )
    lines.append(header + " |")
    lines.append("|---|---:|---:|" + "---:|" * (len(SPLITS) * (len(types) + 1)))
    for label, r in results.items():
        cells = []
        for split in SPLITS:
            e = r["eval"][split]
            cells.append(f"{e['overall']['accuracy']:.3f}")
            cells += [
                f"{e['per_type'][t]['accuracy']:.3f}" if t in e["per_type"] else "-" for t in types
            ]
        lines.append(f"| {label} | {r['steps']} | {r['wall_s']:.0f} | " + " | ".join(cells) + " |")
    n = {s: results[rows[1][0]]["eval"][s]["overall"]["n"] for s in SPLITS}
    lines.append(
        f"\nHeld-out VQA, greedy exact match ({n['test']} test, {n['test_unseen']} test_unseen "
        f"questions); steps are large-LM steps except on the reference line. The carried arms "
        f"also cost the small-LM stages ({results[rows[0][0]]['wall_s']:.0f} s) and the two "
        f"LMs' text pretraining is shared. Whole script: {elapsed:.0f} s."
    )
    text = "\n".join(lines)
    (out / "demo_progressive.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
