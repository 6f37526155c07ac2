"""Dynamic tiling on the shapes world: a low-resolution tower with and without tiles, side by side.

    python scripts/demo_tiling.py [--align 300] [--sft 1000] [--data-root data/generated/shapes]

The question tiling answers: a tower of a fixed, low resolution, shown an image larger
than that resolution. Untiled, the 64 px shapes images are shrunk to the tower's 32 px
(16 image tokens); tiled (model.tiling, max 4 tiles), the same tower sees them as 2x2
tiles of 32 px at full resolution plus a 32 px thumbnail (80 image tokens). Both arms run
recipes/tiny.yaml (text pretraining, alignment, SFT; its convolutional stem) with the same
steps, through the `vlmtrain` command line, one thread each, in parallel. A third arm, the
tower at the images' native 64 px untiled (64 tokens), is the reference tiling should
approach. Held-out VQA (test and test_unseen, greedy exact match) per question type comes
from each run's SFT evaluation; wall time is each run's three stages.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from side_by_side import launch, wait

REPO = Path(__file__).resolve().parents[1]
ARMS = {
    "untiled_32px": ["model.vision.image_size=32"],
    "tiled_32px": [
        "model.vision.image_size=32",
        "model.tiling.enabled=true",
        "model.tiling.max_tiles=4",
    ],
    "native_64px": [],
}
TOKENS = {"untiled_32px": 16, "tiled_32px": 5 * 16, "native_64px": 64}  # image tokens
SPLITS = ("test", "test_unseen")
STAGES = ("lm_pretrain", "align", "sft")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--align", type=int, default=300, help="alignment steps")
    parser.add_argument("--sft", type=int, default=1000, help="SFT steps")
    parser.add_argument("--lm-pretrain", type=int, default=300, help="text pretraining steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--data-root", default=str(REPO / "data/generated/shapes"))
    parser.add_argument("--out", type=Path, default=REPO / "runs/demo_tiling")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = [
        "recipe=tiny",
        f"output_dir={out}",
        f"data.root={args.data_root}",
        f"seed={args.seed}",
        "trainer.num_threads=1",
        "trainer.progress_bar=false",
        f"stages.lm_pretrain.max_steps={args.lm_pretrain}",
        f"stages.align.max_steps={args.align}",
        f"stages.sft.max_steps={args.sft}",
    ]
    from vlmtrain.data.shapes import ShapesConfig, ensure_shapes

    ensure_shapes(args.data_root, ShapesConfig(seed=0))  # once, before the arms read it
    procs = {arm: launch(arm, ARMS[arm], common, out) for arm in args.arms}
    wait(procs, out)

    results = {
        arm: json.loads((out / arm / "sft" / "eval" / "eval.json").read_text()) for arm in args.arms
    }
    types = sorted(results[args.arms[0]][SPLITS[0]]["per_type"])
    header = (
        "| arm | image tokens | wall s | "
        + " | ".join(f"{s} overall | " + " | ".join(types) for s in SPLITS)
        + " |"
    )
    rows = [header, "|" + "---|" * (3 + (1 + len(types)) * len(SPLITS))]
    for arm in args.arms:
        walls = sum(
            json.loads((out / arm / stage / "artifact" / "manifest.json").read_text())["metrics"][
                "wall_time_s"
            ]
            for stage in STAGES
        )
        cells = [arm, str(TOKENS[arm]), f"{walls:.0f}"]
        for split in SPLITS:
            result = results[arm][split]
            cells.append(f"{result['overall']['accuracy']:.3f}")
            cells += [f"{result['per_type'][t]['accuracy']:.3f}" for t in types]
        rows.append("| " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
