"""The preference stage on the shapes world, measured side by side (one thread per run).

1. A shortened ``recipe=tiny_preference`` (lm_pretrain -> align -> sft -> mpo) and the
   obvious alternative (as many more SFT steps instead of MPO), evaluated on the same
   held-out images: VQA exact match, caption exact match, held-out preference
   accuracy, caption hallucination rate.
2. The three reference kinds on the same DPO stage (a wider LM, LoRA policy, so the
   reference's weights show in the process's peak RSS), and one preference step
   against one SFT step of the same model and batch size.

    PYTHONPATH=$PWD python scripts/preference_demo.py --out runs/preference_demo
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def vlmtrain(args: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlmtrain.cli",
            *args,
            "trainer.num_threads=1",
            "trainer.progress_bar=false",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        sys.exit(f"vlmtrain {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def step_times(stage_dir: Path) -> float:
    """Median step time; the first steps (warm-up, caches filling) are left out."""
    with (stage_dir / "logs" / "csv" / "metrics.csv").open() as f:
        times = [
            float(r["perf/step_time_s"]) for r in csv.DictReader(f) if r.get("perf/step_time_s")
        ]
    return statistics.median(times[2:] or times)


def quality(args, out: Path) -> list[str]:
    steps = {
        "lm_pretrain": args.lm_steps,
        "align": args.align_steps,
        "sft": args.sft_steps,
        "mpo": args.pref_steps,
    }
    overrides = [f"stages.{k}.max_steps={v}" for k, v in steps.items()]
    overrides += [f"stages.{k}.eval_limit={args.eval_limit}" for k in ("sft", "mpo")]
    common = [f"output_dir={out}", f"data.root={args.data}"]
    t0 = time.perf_counter()
    vlmtrain(["recipe=tiny_preference", "run_name=quality", *common, *overrides])
    # The obvious alternative: as many more SFT steps, same settings, on the same answers
    # (the chosen ones: 2 VQA for 1 caption), from the same SFT artifact.
    sft = out / "quality" / "sft" / "artifact"
    vlmtrain(
        [
            "stage=sft",
            "run_name=sft_more",
            *common,
            "model.vision.stem=conv",
            "model.vision.stem_blocks=2",
            *[f"stage.init.{c}={sft}" for c in ("vision", "projector", "lm")],
            "stage.trainable.vision=true",
            "stage.trainable.lr_mult.vision=0.5",
            f"stage.max_steps={args.pref_steps}",
            "stage.batch_size=16",
            "stage.optim.lr=3e-4",
            "stage.optim.warmup_ratio=0.1",
            "stage.val_every=0",
            "stage.mixture.instruct=0",
            "+stage.mixture.vqa=0.667",
            "+stage.mixture.caption=0.333",
            "stage.eval_splits=[test,test_unseen]",
            f"stage.eval_limit={args.eval_limit}",
        ]
    )
    wall = time.perf_counter() - t0
    runs = {
        f"SFT ({args.sft_steps} steps)": out / "quality" / "sft",
        f"SFT + {args.pref_steps} MPO steps": out / "quality" / "mpo",
        f"SFT + {args.pref_steps} more SFT steps": out / "sft_more" / "sft",
    }
    rows = [
        f"Shortened tiny_preference recipe ({', '.join(f'{k} {v}' for k, v in steps.items())} steps) "
        f"and the SFT-only alternative; eval on the first {args.eval_limit} samples of each held-out "
        f"file; {wall / 60:.1f} min in all:",
        "",
        "| model | VQA test | VQA test_unseen | caption exact match | preference acc. (held-out pairs) "
        "| hallucinated objects | captions with one |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    results = {name: json.loads((d / "eval" / "eval.json").read_text()) for name, d in runs.items()}
    for name, r in results.items():
        h = r["hallucination_test"]
        rows.append(
            f"| {name} | {r['test']['overall']['accuracy']:.3f} | {r['test_unseen']['overall']['accuracy']:.3f} | "
            f"{r['caption_test']['overall']['accuracy']:.3f} | {r['preference_test']['overall']['accuracy']:.3f} | "
            f"{100 * h['object_rate']:.1f}% | {100 * h['caption_rate']:.1f}% |"
        )
    per = [r["preference_test"]["per_type"] for r in results.values()]
    rows += [
        "",
        "Held-out preference accuracy per type ("
        + " / ".join(results)
        + "): "
        + ", ".join(f"{t} " + " / ".join(f"{p[t]['accuracy']:.2f}" for p in per) for t in per[0]),
    ]
    return rows


def references(args, out: Path) -> list[str]:
    """Same stage, same LoRA policy, three references; then an SFT stage of that model."""
    pairs = json.loads((Path(args.data) / "pref_train.json").read_text())[: args.ref_pairs]
    small = out / "pref_small.json"
    small.write_text(json.dumps(pairs))
    wide = [
        f"model.lm.hidden_size={args.width}",
        f"model.lm.intermediate_size={4 * args.width}",
        "model.lm.num_hidden_layers=4",
        "model.lm.num_attention_heads=8",
    ]
    common = [
        f"output_dir={out}",
        f"data.root={args.data}",
        *wide,
        "stage.lora.enabled=true",
        "stage.trainable.projector=false",
        f"stage.max_steps={args.ref_steps}",
        "stage.batch_size=8",
        f"+data.datasets.demo_pref={{train: {small}}}",
        "stage.mixture.pref=0",
        "+stage.mixture.demo_pref=1.0",
    ]
    rows = [
        f"Reference kinds, same DPO stage: LM width {args.width}, 4 layers, LoRA policy, 8 pairs per step, "
        f"{args.ref_steps} steps, {len(pairs)} pairs precomputed:",
        "",
        "| reference | peak RSS (MB) | s / step | stage wall time (s) |",
        "|---|---:|---:|---:|",
    ]
    for kind in ("copy", "disabled_adapter", "precomputed"):
        vlmtrain(
            ["stage=dpo", f"run_name=ref_{kind}", f"stage.preference.reference={kind}", *common]
        )
        stage_dir = out / f"ref_{kind}" / "dpo"
        m = json.loads((stage_dir / "artifact" / "manifest.json").read_text())["metrics"]
        rows.append(
            f"| {kind} | {m['peak_rss_mb']:.0f} | {step_times(stage_dir):.3f} | {m['wall_time_s']:.1f} |"
        )
    sft = [a for a in common if "mixture" not in a and "demo_pref" not in a]
    vlmtrain(
        [
            "stage=sft",
            "run_name=ref_sft",
            *sft,
            "+stage.mixture.vqa=0.7",
            "+stage.mixture.caption=0.3",
        ]
    )
    sft_dir = out / "ref_sft" / "sft"
    m = json.loads((sft_dir / "artifact" / "manifest.json").read_text())["metrics"]
    rows.append(
        f"| (SFT step, 8 samples) | {m['peak_rss_mb']:.0f} | {step_times(sft_dir):.3f} | {m['wall_time_s']:.1f} |"
    )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "preference_demo")
    p.add_argument("--data", default=str(ROOT / "data" / "generated" / "shapes"))
    p.add_argument("--lm-steps", type=int, default=150)
    p.add_argument("--align-steps", type=int, default=300)
    p.add_argument("--sft-steps", type=int, default=800)
    p.add_argument("--pref-steps", type=int, default=300)
    p.add_argument("--eval-limit", type=int, default=200)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--ref-steps", type=int, default=6)
    p.add_argument("--ref-pairs", type=int, default=160)
    p.add_argument("--skip", choices=("quality", "references"), default=None)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = []
    if args.skip != "quality":
        report += quality(args, args.out) + [""]
    if args.skip != "references":
        report += references(args, args.out)
    text = "\n".join(report) + "\n"
    (args.out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
