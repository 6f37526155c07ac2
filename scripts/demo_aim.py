"""AIMv2 encoder pretraining on the shapes world: align + SFT from a fresh tower vs from an
AIM-pretrained one, side by side at the same align + SFT budget.

    python scripts/demo_aim.py [--stem patch] [--aim-steps 600] [--align 300] [--sft 1500]

Every run goes through the `vlmtrain` command line (recipes/tiny_aim.yaml), one thread
each, in parallel where the runs do not depend on each other:

  lm       text-only LM pretraining, shared by both arms
  aim      the aim stage alone: the tower learns from captioned images (no LM)
  (a) fresh  align (tower + projector, LM frozen) then SFT, from a random tower
  (b) aim    the same stages and steps, from the aim stage's tower

``--stem patch`` (default) is the exportable tower (a linear patch embedding, which
transformers' Llava can load); ``--stem conv`` is the tiny recipe's convolutional stem.
Held-out VQA (test and test_unseen, greedy exact match) per question type comes from
each arm's SFT evaluation; the AIM stage's time is reported so the arms can be compared
at equal total compute. Frozen-feature linear probes (scripts/probe_tower.py: object
count, shapes and colours present) read the random tower, the AIM tower, and each arm's
tower after SFT.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from probe_tower import probe
from side_by_side import launch, wait

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("test", "test_unseen")
STEMS = {
    "patch": ["model.vision.stem=patch", "model.vision.stem_blocks=0"],
    "conv": ["model.vision.stem=conv", "model.vision.stem_blocks=2"],
}


def manifest(out: Path, run: str, stage: str) -> dict:
    return json.loads((out / run / stage / "artifact" / "manifest.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stem", choices=sorted(STEMS), default="patch")
    parser.add_argument("--aim-steps", type=int, default=600)
    parser.add_argument("--align", type=int, default=300, help="align steps of each arm")
    parser.add_argument("--sft", type=int, default=1500, help="SFT steps of each arm")
    parser.add_argument("--lm-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-limit", type=int, default=None, help="questions per split")
    parser.add_argument("--data-root", default=str(REPO / "data/generated/shapes"))
    parser.add_argument("--out", default=str(REPO / "runs/demo_aim"))
    parser.add_argument("--report-only", action="store_true", help="tables of a finished run")
    args = parser.parse_args()
    out = Path(args.out).resolve() / args.stem
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        report(out, args, float("nan"))
        return 0
    common = [
        "recipe=tiny_aim",
        f"data.root={args.data_root}",
        f"output_dir={out}",
        "trainer.progress_bar=false",
        "trainer.num_threads=1",
        "data.cache_encoded=false",  # about one epoch per run: the cache would only cost RAM
        f"seed={args.seed}",
        *STEMS[args.stem],
    ]
    limit = [] if args.eval_limit is None else [f"stages.sft.eval_limit={args.eval_limit}"]
    start = time.perf_counter()

    # 1. The LM (text only) and the AIM tower, side by side.
    wait(
        {
            "lm": launch(
                "lm",
                [
                    "~stages.aim",
                    "~stages.align",
                    "~stages.sft",
                    f"stages.lm_pretrain.max_steps={args.lm_steps}",
                ],
                common,
                out,
            ),
            "aim": launch(
                "aim",
                [
                    "~stages.lm_pretrain",
                    "~stages.align",
                    "~stages.sft",
                    f"stages.aim.max_steps={args.aim_steps}",
                ],
                common,
                out,
            ),
        },
        out,
    )
    lm = out / "lm" / "lm_pretrain" / "artifact"
    tower = out / "aim" / "aim" / "artifact"

    # 2. The two arms: the same align + SFT, from a fresh tower and from the AIM tower.
    def arm(vision: str) -> list[str]:
        return [
            "~stages.lm_pretrain",
            "~stages.aim",
            f"stages.align.init.vision={vision}",
            f"stages.align.init.lm={lm}",
            f"stages.align.max_steps={args.align}",
            f"stages.sft.max_steps={args.sft}",
            *limit,
        ]

    wait(
        {
            "fresh": launch("fresh", arm("fresh"), common, out),
            "aim_tower": launch("aim_tower", arm(str(tower)), common, out),
        },
        out,
    )
    report(out, args, time.perf_counter() - start)
    return 0


def report(out: Path, args, elapsed: float) -> None:
    rows = [("(a) fresh tower", "fresh"), ("(b) AIM-pretrained tower", "aim_tower")]
    results, types = {}, set()
    for label, run in rows:
        evaluation = json.loads((out / run / "sft" / "eval" / "eval.json").read_text())
        types |= set(evaluation["test"]["per_type"])
        wall = sum(manifest(out, run, s)["metrics"]["wall_time_s"] for s in ("align", "sft"))
        results[label] = (wall, evaluation)
    types = sorted(types)
    aim = manifest(out, "aim", "aim")["metrics"]
    lines = [
        "| tower | align+SFT s | "
        + " | ".join(f"{s} {t}" for s in SPLITS for t in ["overall", *types])
        + " |",
        "|---|---:|" + "---:|" * (len(SPLITS) * (len(types) + 1)),
    ]
    for label, (wall, e) in results.items():
        cells = []
        for split in SPLITS:
            cells.append(f"{e[split]['overall']['accuracy']:.3f}")
            cells += [
                f"{e[split]['per_type'][t]['accuracy']:.3f}" if t in e[split]["per_type"] else "-"
                for t in types
            ]
        lines.append(f"| {label} | {wall:.0f} | " + " | ".join(cells) + " |")
    n = {s: results[rows[0][0]][1][s]["overall"]["n"] for s in SPLITS}
    lines.append(
        f"\nstem={args.stem}, seed {args.seed}; align {args.align} + SFT {args.sft} steps per arm; "
        f"held-out VQA, greedy exact match ({n['test']} test, {n['test_unseen']} test_unseen "
        f"questions). The AIM stage cost {aim['wall_time_s']:.0f} s ({args.aim_steps} steps, "
        f"final loss {aim.get('train/loss', float('nan')):.3f}) on top of arm (b). "
        f"Whole script: {elapsed:.0f} s."
    )
    lines += ["", probe_table(out, Path(args.data_root))]
    text = "\n".join(lines)
    (out / "demo_aim.md").write_text(text + "\n")
    print(text)


def probe_table(out: Path, data_root: Path) -> str:
    aim = out / "aim" / "aim" / "artifact"
    towers = [
        ("random init (where (a) starts)", aim, True),
        ("after the AIM stage (where (b) starts)", aim, False),
        ("(a) after align + SFT", out / "fresh" / "sft" / "artifact", False),
        ("(b) after align + SFT", out / "aim_tower" / "sft" / "artifact", False),
    ]
    lines = [
        "| frozen tower, linear probe on caption_test | count | shapes present | colours present |",
        "|---|---:|---:|---:|",
    ]
    majority = None
    for label, artifact, fresh in towers:
        r = probe(artifact, data_root, fresh)
        majority = {k: v[1] for k, v in r.items()}
        lines.append(f"| {label} | " + " | ".join(f"{r[k][0]:.3f}" for k in r) + " |")
    lines.append("| majority label | " + " | ".join(f"{v:.3f}" for v in majority.values()) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
