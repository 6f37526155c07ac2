"""Multitask stage at 128 px vs 64 px on the shapes world with grounding and OCR.

    python scripts/demo_multitask.py [--steps 800] [--data-root data/generated/shapes_multitask]

Both arms run `recipes/tiny_multitask.yaml` through the `vlmtrain` command line, one
thread each, one after the other: text-only LM pretraining, then one multitask stage
(everything trains) on the same mixture of text, VQA, captions, grounding and OCR, for the
same number of steps and samples, from the same 128 px images. The only difference is the
multitask stage's tower, set per stage in `ARMS` below:

  64px    the tiny tower at 64 px (patch 8: 64 image tokens), the images resized to 64 px
  128px   the tiny tower at 128 px (patch 8: 256 patches) with a 2x2 pixel-shuffle projector,
          so the LM gets the same 64 image tokens per image as at 64 px

The tower is fresh in the multitask stage, so its resolution is simply the stage's own
(`stages.multitask.model.vision.image_size`); no position embedding is interpolated.
Reported per arm from each run's eval (greedy decoding): grounding accuracy (IoU >= 0.5,
predictions that are not a box counted wrong), "what is at <box>" and OCR exact match,
VQA overall, on test and test_unseen, next to chance, with the stage's wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from side_by_side import launch, wait

REPO = Path(__file__).resolve().parents[1]
# Everything one arm changes, in one place: overrides of the multitask stage's model.
ARMS: dict[str, list[str]] = {
    "64px": ["+stages.multitask.model.vision.image_size=64"],
    "128px": [
        "+stages.multitask.model.vision.image_size=128",
        "+stages.multitask.model.projector.type=pixel_shuffle_mlp",
        "+stages.multitask.model.projector.downsample=2",
    ],
}
SPLITS = ("test", "test_unseen")
# (results key prefix, question type, column) for the table; "" prefix: the VQA file.
COLUMNS = (
    ("ground_", "grounding", "grounding IoU>=0.5"),
    ("ground_", "referring", "what is at <box>"),
    ("ocr_", "ocr", "OCR exact"),
    ("", None, "VQA overall"),
)


def cell(results: dict, key: str, qtype: str | None) -> tuple[float, float | None, int | None]:
    """(accuracy, chance, unparseable) of one column in one split's results."""
    res = results[key]
    if qtype is None:
        return res["overall"]["accuracy"], None, None
    row = res["per_type"][qtype]
    return row["accuracy"], row["chance"], row.get("unparseable")


def table(out: Path) -> str:
    lines = [
        "| arm | split | " + " | ".join(c[2] for c in COLUMNS) + " | multitask wall |",
        "|---|---|" + "---:|" * (len(COLUMNS) + 1),
    ]
    chance_row: dict[str, list[str]] = {}
    for arm in ARMS:
        stage = out / arm / "multitask"
        results = json.loads((stage / "eval" / "eval.json").read_text())
        manifest = json.loads((stage / "artifact" / "manifest.json").read_text())
        wall = f"{manifest['metrics']['wall_time_s']:.0f} s"
        for split in SPLITS:
            cells, chances = [], []
            for prefix, qtype, _ in COLUMNS:
                acc, chance, bad = cell(results, prefix + split, qtype)
                cells.append(
                    f"{100 * acc:.1f}%" + (f" ({bad} not a box)" if bad is not None else "")
                )
                chances.append("–" if chance is None else f"{100 * chance:.1f}%")
            lines.append(f"| {arm} | {split} | " + " | ".join(cells) + f" | {wall} |")
            chance_row[split] = chances
    for split, chances in chance_row.items():
        lines.append(f"| chance | {split} | " + " | ".join(chances) + " | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800, help="multitask steps of each arm")
    parser.add_argument("--lm-steps", type=int, default=300, help="text-only LM pretraining")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="initialization and data order")
    parser.add_argument("--eval-limit", type=int, default=None, help="questions per file")
    parser.add_argument("--data-root", default=str(REPO / "data/generated/shapes_multitask"))
    parser.add_argument("--out", default=str(REPO / "runs/demo_multitask"))
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = [
        "recipe=tiny_multitask",
        f"data.root={args.data_root}",
        f"output_dir={out}",
        "trainer.progress_bar=false",
        "trainer.num_threads=1",
        f"seed={args.seed}",
        f"stages.lm_pretrain.max_steps={args.lm_steps}",
        f"stages.multitask.max_steps={args.steps}",
        f"stages.multitask.batch_size={args.batch_size}",
    ]
    if args.eval_limit is not None:
        common.append(f"stages.multitask.eval_limit={args.eval_limit}")
    start = time.perf_counter()
    for arm, overrides in ARMS.items():  # sequential: each run has the CPU it measures on
        wait({arm: launch(arm, overrides, common, out)}, out)
        print(f"{arm} done ({time.perf_counter() - start:.0f} s so far)", file=sys.stderr)
    report = table(out)
    (out / "table.md").write_text(report)
    print(report)
    print(f"total {time.perf_counter() - start:.0f} s; runs, logs and commands in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
