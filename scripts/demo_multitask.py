"""Multitask stage at 128 px vs 64 px on the shapes world with grounding and OCR.

    python scripts/demo_multitask.py [--steps 3000] [--data-root data/generated/shapes_multitask]

`recipes/tiny_multitask.yaml` through the `vlmtrain` command line, one thread per run. Its
first three stages (text-only LM pretraining, alignment, SFT: the tiny recipe's, at 64 px on
the 128 px world resized) run once, as the run `base`. Each arm then runs the multitask
stage alone (everything trains) from base's SFT artifact, on the same mixture of text, VQA,
captions, grounding and OCR, for the same number of steps and samples, from the same
128 px images, the arms side by side. The only difference is how the stage's tower sees
the image, set per stage in `ARMS` below:

  64px    the tiny tower as SFT left it: 64 px (patch 8: 64 image tokens), images resized
  128px   the same tower at 128 px: its position table interpolated once to 16 x 16
          (vlmtrain.model.resolution), 256 image tokens through the same projector
  tiles   the tower at 64 px on 2 x 2 tiles of the 128 px image and a 64 px thumbnail
          (vlmtrain.data.tiling), 320 image tokens through the same projector

and, with `--arms`, a pair that starts the projector afresh (the LM sees 64 image tokens
in both): `128px_shuffle` (the 128 px tower, pixel shuffle 2 x 2 -> 64 tokens of four
patches each) against `64px_new` (the 64 px tower, a new projector of the usual kind).

Reported per arm from each run's eval (greedy decoding): grounding accuracy (IoU >= 0.5,
predictions that are not a box counted wrong), "what is at <box>" and OCR exact match,
VQA overall, on test and test_unseen, next to chance, with the stage's wall time; then
grounding and "what is at <box>" by the asked object's size (small / large).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from side_by_side import launch, wait

REPO = Path(__file__).resolve().parents[1]
# Everything one arm changes, in one place: overrides of the multitask stage's model.
ARMS: dict[str, list[str]] = {
    "64px": [],
    "128px": ["+stages.multitask.model.vision.image_size=128"],
    # InternVL's way: the tower stays at 64 px, the 128 px image is cut into 2 x 2 tiles of
    # 64 px plus a 64 px thumbnail (320 image tokens).
    "tiles": [
        "+stages.multitask.model.tiling={enabled: true, max_tiles: 4, thumbnail: true}",
        "stages.multitask.max_length=400",
    ],
    # InternVL's pixel shuffle: the tower at 128 px, each 2 x 2 patches one image token (64,
    # as at 64 px, each carrying four patches' features) through a new projector; `64px_new`
    # is its control, the 64 px tower with a new projector of the usual kind.
    "128px_shuffle": [
        "+stages.multitask.model.vision.image_size=128",
        "+stages.multitask.model.projector={type: pixel_shuffle_mlp, downsample: 2}",
        "stages.multitask.init.projector=fresh",
    ],
    "64px_new": ["stages.multitask.init.projector=fresh"],
}
BASE_STAGES = ("lm_pretrain", "align", "sft")
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


def table(out: Path, arms: Iterable[str]) -> str:
    lines = [
        "| arm | split | " + " | ".join(c[2] for c in COLUMNS) + " | multitask wall |",
        "|---|---|" + "---:|" * (len(COLUMNS) + 1),
    ]
    chance_row: dict[str, list[str]] = {}
    for arm in arms:
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


def by_size(stage: Path, data_root: Path, split: str) -> dict[tuple[str, str], tuple[int, int]]:
    """{(question type, asked object's size): (right, asked)} for ``ground_<split>``, from
    the stage's predictions.jsonl and the data's record of each scene."""
    samples = {s["id"]: s for s in json.loads((data_root / f"ground_{split}.json").read_text())}
    counts: dict[tuple[str, str], tuple[int, int]] = {}
    for line in (stage / "eval" / "predictions.jsonl").open():
        row = json.loads(line)
        if row["file"] != f"ground_{split}":
            continue
        s = samples[row["id"]]
        size = next(o["size"] for o in s["objects"] if [o["colour"], o["shape"]] == s["about"][0])
        right, asked = counts.get((row["type"], size), (0, 0))
        counts[(row["type"], size)] = (right + row["correct"], asked + 1)
    return counts


def size_table(out: Path, arms: Iterable[str], data_root: Path) -> str:
    """Grounding and "what is at <box>" by the asked object's size: whether the extra
    pixels help where the objects are smallest."""
    keys = [(t, z) for t in ("grounding", "referring") for z in ("small", "large")]
    lines = [
        "| arm | split | " + " | ".join(f"{t} ({z})" for t, z in keys) + " |",
        "|---|---|" + "---:|" * len(keys),
    ]
    for arm in arms:
        for split in SPLITS:
            counts = by_size(out / arm / "multitask", data_root, split)
            cells = [
                f"{100 * r / n:.0f}% of {n}" if n else "–"
                for r, n in (counts.get(k, (0, 0)) for k in keys)
            ]
            lines.append(f"| {arm} | {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="multitask steps of each arm")
    parser.add_argument("--lm-steps", type=int, default=300, help="text-only LM pretraining")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="initialization and data order")
    parser.add_argument("--eval-limit", type=int, default=None, help="questions per file")
    parser.add_argument("--data-root", default=str(REPO / "data/generated/shapes_multitask"))
    parser.add_argument("--out", default=str(REPO / "runs/demo_multitask"))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=["64px", "128px", "tiles"])
    parser.add_argument(
        "--base",
        default=None,
        help="an earlier run of this script (its base/sft/artifact) to start the arms from,"
        " instead of training the first three stages again",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="more overrides for every run, after --: model.lm.hidden_size=128",
    )
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
        *args.overrides,
    ]
    start = time.perf_counter()
    if args.base is None:
        base = [f"stages.lm_pretrain.max_steps={args.lm_steps}", "~stages.multitask"]
        wait({"base": launch("base", base, common, out)}, out)
        print(f"base done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    sft = Path(args.base or out).resolve() / "base" / "sft" / "artifact"
    if not (sft / "manifest.json").exists():
        parser.error(f"--base {args.base}: no finished SFT artifact at {sft}")
    arm_common = [
        *(f"~stages.{name}" for name in BASE_STAGES),
        f"stages.multitask.max_steps={args.steps}",
        f"stages.multitask.batch_size={args.batch_size}",
    ]
    if args.eval_limit is not None:
        arm_common.append(f"stages.multitask.eval_limit={args.eval_limit}")
    arms = {arm: ARMS[arm] for arm in args.arms}
    procs = {}
    for arm, extra in arms.items():
        # Every part starts from SFT's artifact unless the arm says otherwise.
        init = [
            f"stages.multitask.init.{part}={sft}"
            for part in ("vision", "projector", "lm")
            if not any(o.startswith(f"stages.multitask.init.{part}=") for o in extra)
        ]
        procs[arm] = launch(arm, arm_common + init + extra, common, out)
    wait(procs, out)
    report = table(out, arms) + "\n" + size_table(out, arms, Path(args.data_root))
    (out / "table.md").write_text(report)
    print(report)
    print(f"total {time.perf_counter() - start:.0f} s; runs, logs and commands in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
