"""Seconds per step and peak memory of the tiny model's stages, measured side by side.

    .venv/bin/python scripts/benchmark_stages.py --steps 100 [--batch-size 16]

Each stage runs in its own subprocess (so peak RSS is per stage) through the
same `vlmtrain` command line a user runs; the report gives absolute figures and
each stage's time relative to the first, since absolute times on shared
machines are noise.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path


def run(stage: str, steps: int, batch: int, out: Path, extra: list[str]) -> dict[str, float]:
    cmd = [
        sys.executable,
        "-m",
        "vlmtrain.cli",
        f"stage={stage}",
        f"run_name={stage}",
        f"output_dir={out}",
        f"stage.max_steps={steps}",
        f"stage.batch_size={batch}",
        "stage.val_every=0",
        "trainer.progress_bar=false",
        *extra,
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    with (out / stage / stage / "logs" / "csv" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/step_time_s")]
    times = sorted(float(r["perf/step_time_s"]) for r in rows[len(rows) // 5 :])  # skip warm-up
    tokens = [float(r["perf/tokens_per_s"]) for r in rows[len(rows) // 5 :]]
    import json

    manifest = json.loads((out / stage / stage / "artifact" / "manifest.json").read_text())
    return {
        "median_s_per_step": times[len(times) // 2],
        "tokens_per_s": sum(tokens) / len(tokens),
        "peak_rss_mb": manifest["metrics"]["peak_rss_mb"],
        "final_loss": manifest["metrics"].get("train/loss", float("nan")),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--stages", nargs="+", default=["lm_pretrain", "align", "sft"])
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every stage")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            s: run(s, args.steps, args.batch_size, Path(tmp), args.overrides) for s in args.stages
        }
    base = results[args.stages[0]]["median_s_per_step"]
    print(
        f"| stage | s/step (median) | vs {args.stages[0]} | tokens/s | peak RSS MB | loss after {args.steps} |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for s, r in results.items():
        print(
            f"| {s} | {r['median_s_per_step']:.4f} | {r['median_s_per_step'] / base:.2f}x "
            f"| {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['final_loss']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
