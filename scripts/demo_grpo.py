"""Reasoning stages on the shapes world: SFT-only vs SFT + GRPO vs SFT + consistency
self-improvement, at equal extra compute, measured one run at a time (one thread each).

The relative-position questions ("Where is the yellow circle relative to the orange
square?") are the weakest type after the tiny recipe. Their answers are rewritten in a
short reasoning format, "locate A, locate B, compare":

    yellow circle is 2 6. orange square is 4 3. answer: below

(column and row of each object's centre on the 8 x 8 patch grid; every word is one of
the shapes tokenizer's tokens, so the format costs no new vocabulary). From a finished SFT artifact:

1. ``reason``: SFT on the reasoning answers (the other question types mixed in, plain),
   the common start of every arm;
2. three arms from it, each given the wall time GRPO takes:
   - ``sft_more``: more of the same SFT;
   - ``grpo``: GRPO on the position prompts, reward exact match of the final answer;
   - ``consistency``: a generate stage samples 8 answers per position prompt and keeps
     the majority (MBR) answer, then SFT on those best samples (other types mixed in);
3. greedy evaluation of each on test and test_unseen, per question type, scoring the
   final answer (the text after "answer:", or the whole text).

    PYTHONPATH=$PWD python scripts/demo_grpo.py --sft runs/tiny/sft/artifact \\
        --data data/generated/shapes --out runs/demo_grpo
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
ARMS = ("reason", "sft_more", "grpo", "consistency")


def reasoning_answer(record: dict) -> str:
    """'A is <column> <row>. B is <column> <row>. answer: <relation>' from the scene."""
    parts = []
    for colour, shape in record["about"]:
        (obj,) = [o for o in record["objects"] if (o["colour"], o["shape"]) == (colour, shape)]
        x0, y0, x1, y1 = obj["bbox"]
        parts.append(f"{colour} {shape} is {(x0 + x1) // 16} {(y0 + y1) // 16}.")
    return " ".join(parts) + f" answer: {record['answer']}"


def write_data(data: Path, out: Path) -> None:
    records = json.loads((data / "vqa_train.json").read_text())
    reason = []
    for r in records:
        if r["type"] == "position":
            turns = [r["conversations"][0], {"from": "gpt", "value": reasoning_answer(r)}]
            reason.append({**r, "conversations": turns})
    other = [r for r in records if r["type"] != "position"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "reason_train.json").write_text(json.dumps(reason))
    (out / "other_train.json").write_text(json.dumps(other))


def vlmtrain(args: list[str], log: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "vlmtrain.cli", *args]
    log.with_suffix(".cmd").write_text(" ".join(cmd) + "\n")
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"vlmtrain failed; see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def manifest(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "artifact" / "manifest.json").read_text())


def median_step_time(stage_dir: Path) -> float:
    with (stage_dir / "logs" / "csv" / "metrics.csv").open() as f:
        t = [float(r["perf/step_time_s"]) for r in csv.DictReader(f) if r.get("perf/step_time_s")]
    return statistics.median(t[5:] or t)


def grpo_time_split(stage_dir: Path) -> tuple[float, float]:
    with (stage_dir / "logs" / "csv" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/generation_s")]
    return sum(float(r["perf/generation_s"]) for r in rows), sum(
        float(r["perf/training_s"]) for r in rows
    )


def evaluate(artifact: Path, data: Path, limit: int | None) -> dict:
    """Greedy answers (up to 32 tokens), scored on their final answer, per split and type."""
    import torch

    from vlmtrain.artifacts import load_image_processor, load_model
    from vlmtrain.data.images import ImageProcessor
    from vlmtrain.eval import predict, read_eval_samples
    from vlmtrain.objectives.rewards import final_answer

    torch.set_num_threads(1)
    model, tokenizer, model_cfg = load_model(artifact)
    model.eval()
    processor = load_image_processor(artifact, model_cfg, model.vision_spec)
    images = ImageProcessor.for_model(processor, model, model_cfg, data)
    out = {}
    for split in ("test", "test_unseen"):
        samples = read_eval_samples(data / f"vqa_{split}.json", limit)
        with torch.no_grad():
            preds = predict(model, tokenizer, images, samples, max_new_tokens=32)
        per: dict[str, list[int]] = {}
        for s, p in zip(samples, preds, strict=True):
            per.setdefault(s.type, []).append(int(final_answer(p) == final_answer(s.answer)))
        out[split] = {t: sum(v) / len(v) for t, v in sorted(per.items())}
        out[split]["overall"] = sum(map(sum, per.values())) / sum(map(len, per.values()))
        out[split]["example"] = next(
            p for s, p in zip(samples, preds, strict=True) if s.type == "position"
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sft", type=Path, required=True, help="a finished SFT artifact (recipe=tiny)")
    p.add_argument("--data", type=Path, required=True, help="the shapes data it was trained on")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "demo_grpo")
    p.add_argument("--reason-steps", type=int, default=600)
    p.add_argument(
        "--reason", type=Path, default=None, help="the reason stage's artifact of an earlier run"
    )
    p.add_argument("--grpo-steps", type=int, default=120)
    p.add_argument("--generate-prompts", type=int, default=800)
    p.add_argument("--temperature", type=float, default=0.7, help="GRPO's and generate's")
    p.add_argument("--eval-limit", type=int, default=None, help="samples per split")
    args = p.parse_args()
    out, data = args.out.resolve(), args.data.resolve()
    write_data(data, out / "data")
    model = json.loads((args.sft / "manifest.json").read_text())["config"]["model"]["vision"]
    common = [
        f"data.root={data}",
        "data.generate=null",
        f"output_dir={out / 'runs'}",
        "trainer.num_threads=1",
        "trainer.progress_bar=false",
        f"model.vision.stem={model['stem']}",
        f"model.vision.stem_blocks={model['stem_blocks']}",
        f"+data.datasets.reason={{train: {out / 'data' / 'reason_train.json'}}}",
        f"+data.datasets.other={{train: {out / 'data' / 'other_train.json'}}}",
    ]

    def init(artifact: Path) -> list[str]:
        return [f"stage.init.{c}={artifact}" for c in ("vision", "projector", "lm")]

    def sft(name: str, start: Path, steps: int, mixture: dict[str, float], extra=()) -> list:
        return [
            *common, *init(start), f"run_name={name}", "stage=sft", f"stage.max_steps={steps}",
            "stage.batch_size=32", "stage.loss_reduction=square", "stage.val_every=0",
            "stage.optim.lr=1e-4", "stage.trainable.vision=true", "stage.trainable.lr_mult.vision=0.5",
            "~stage.mixture.instruct", *[f"+stage.mixture.{k}={v}" for k, v in mixture.items()],
            *extra,
        ]  # fmt: skip

    runs, logs = out / "runs", out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    mix = {"reason": 0.5, "other": 0.5}
    if args.reason is None:
        vlmtrain(sft("reason", args.sft, args.reason_steps, mix), logs / "reason.log")
    reason = args.reason or runs / "reason" / "sft" / "artifact"
    sft_step = median_step_time(reason.parent)

    grpo = [
        *common, *init(reason), "run_name=grpo", "stage=grpo", f"stage.max_steps={args.grpo_steps}",
        "~stage.mixture.vqa", "+stage.mixture.reason=1.0", "stage.batch_size=8",
        "stage.grpo.max_new_tokens=32", "stage.grpo.num_generations=8", "stage.optim.lr=1e-4",
        f"stage.grpo.temperature={args.temperature}",
    ]  # fmt: skip
    vlmtrain(grpo, logs / "grpo.log")
    budget = manifest(runs / "grpo" / "grpo")["metrics"]["wall_time_s"]
    sft_steps = max(1, round(budget / sft_step))
    vlmtrain(sft("sft_more", reason, sft_steps, mix), logs / "sft_more.log")

    generate = [
        *common, *init(reason), "run_name=consistency", "stage=generate",
        "~stage.mixture.vqa", "+stage.mixture.reason=1.0", "stage.batch_size=8",
        f"stage.max_steps={args.generate_prompts // 8}", "stage.generate.max_new_tokens=32",
        "stage.generate.min_consistency=0.4", f"stage.generate.temperature={args.temperature}",
    ]  # fmt: skip
    vlmtrain(generate, logs / "generate.log")
    gen_time = manifest(runs / "consistency" / "generate")["metrics"]["wall_time_s"]
    self_steps = max(1, round((budget - gen_time) / sft_step))
    self_data = ["+data.datasets.self={train: from:generate/sft.jsonl}"]
    vlmtrain(
        sft("consistency", reason, self_steps, {"self": 0.5, "other": 0.5}, self_data),
        logs / "consistency_sft.log",
    )

    artifacts = {
        "sft (start)": args.sft,
        "reason": reason,
        "sft_more": runs / "sft_more" / "sft" / "artifact",
        "grpo": runs / "grpo" / "grpo" / "artifact",
        "consistency": runs / "consistency" / "sft" / "artifact",
    }
    results = {name: evaluate(a, data, args.eval_limit) for name, a in artifacts.items()}
    gen_s, train_s = grpo_time_split(runs / "grpo" / "grpo")
    fp = json.loads((runs / "consistency" / "generate" / "data" / "fingerprint.json").read_text())
    report = {
        "results": results,
        "extra_compute_s": budget,
        "steps": {"sft_more": sft_steps, "grpo": args.grpo_steps, "consistency_sft": self_steps},
        "grpo_time_split_s": {"generation": gen_s, "training": train_s},
        "consistency_generate_s": gen_time,
        "consistency_rows": fp,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    types = [t for t in results["reason"]["test"] if t not in ("overall", "example")]
    for split in ("test", "test_unseen"):
        print(f"\n{split}: " + " | ".join(["arm", *types, "overall"]))
        for name, r in results.items():
            row = [f"{r[split][t]:.3f}" for t in (*types, "overall")]
            print(" | ".join([name, *row]))
    print(
        f"\nextra compute per arm {budget:.0f}s; GRPO {args.grpo_steps} steps: generation "
        f"{gen_s:.0f}s, training {train_s:.0f}s; sft_more {sft_steps} steps; consistency: "
        f"generate {gen_time:.0f}s ({fp['sft.jsonl']['rows']} of {fp['samples.jsonl']['rows']} "
        f"prompts kept) + {self_steps} SFT steps"
    )
    print(
        "position examples: "
        + "; ".join(f"{n}: {r['test']['example']!r}" for n, r in results.items())
    )


if __name__ == "__main__":
    main()
