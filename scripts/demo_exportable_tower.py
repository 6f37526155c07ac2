"""The tiny recipe with the convolutional stem against exportable towers, side by side.

Each arm is `vlmtrain recipe=tiny` (lm_pretrain -> align -> SFT -> held-out eval) at one
thread, with only the tower changed: `conv` (model/vision=tiny_conv_stem, the recipe's
until 2026-11-30: no transformers class holds its stem, so `vlmtrain export` refuses it)
against ViTs on a small convolutional network, transformers' DPT hybrid (`vit_hybrid`),
which export to Llava: `resnet` (model/vision=tiny_resnet_hybrid, the recipe's tower),
`focalnet`, and FocalNet with a stride-2 stem (`focalnet_s2`) or overlapping convolutions
(`focalnet_ov`). Each run's CPU time during SFT training is read from /proc, so CPU
seconds per SFT step compare fairly even when runs share cores::

    python scripts/demo_exportable_tower.py --seeds 0 1 2 --sft-steps 4500
    python scripts/demo_exportable_tower.py --arms focalnet focalnet_s2 focalnet_ov --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

from side_by_side import REPO, launch

HYBRID = ["model/vision=tiny_resnet_hybrid"]
# Each arm's tower is a config of its own, so an arm means the same whatever
# recipes/tiny.yaml holds; --stem-blocks sets the hybrid backbones' blocks.
ARMS = {
    # The recipe's tower until 2026-11-30; no transformers class holds its stem.
    "conv": ["model/vision=tiny_conv_stem"],
    "resnet": HYBRID,  # the recipe's tower
    "focalnet": [*HYBRID, "model.vision.backbone=focalnet"],
    "focalnet_s2": [*HYBRID, "model.vision.backbone=focalnet", "model.vision.backbone_stride=2"],
    "focalnet_ov": [
        *HYBRID,
        "model.vision.backbone=focalnet",
        "model.vision.backbone_overlap=true",
    ],
}
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def watch_sft(pid: int, run: Path, out: Path) -> None:
    """CPU seconds between the SFT stage's directory appearing and its artifact's manifest."""
    try:
        while not (run / "sft").is_dir():
            time.sleep(0.5)
        start = cpu_seconds(pid)
        while not (run / "sft" / "artifact" / "manifest.json").is_file():
            time.sleep(0.5)
        out.write_text(json.dumps({"sft_cpu_s": cpu_seconds(pid) - start}))
    except FileNotFoundError:  # the run died; its log says why
        pass


def run_name(arm: str, seed: int, blocks: int, sft_steps: int | None) -> str:
    blocks = 2 if arm == "conv" else blocks
    return f"{arm}_b{blocks}_s{seed}" + (f"_sft{sft_steps}" if sft_steps else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=["conv", "resnet"])
    parser.add_argument("--stem-blocks", type=int, default=1)
    parser.add_argument(
        "--sft-steps", type=int, default=None, help="SFT steps (default: the recipe's)"
    )
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--out", default=str(REPO / "runs/demo_exportable_tower"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    if not args.report_only:
        common = ["recipe=tiny", f"output_dir={out}", "trainer.progress_bar=false"]
        common += ["trainer.num_threads=1"]
        if args.sft_steps:
            common.append(f"stages.sft.max_steps={args.sft_steps}")
        pending, active = list(runs), []
        while pending or active:
            while pending and len(active) < args.parallel:
                arm, seed = pending.pop(0)
                name = run_name(arm, seed, args.stem_blocks, args.sft_steps)
                tower = ARMS[arm]
                if arm != "conv":
                    tower = [*tower, f"model.vision.stem_blocks={args.stem_blocks}"]
                proc = launch(name, [f"seed={seed}", *tower], common, out)
                watcher = threading.Thread(
                    target=watch_sft, args=(proc.pid, out / name, out / f"{name}.cpu.json")
                )
                watcher.start()
                active.append((name, proc))
            time.sleep(2)
            for name, proc in list(active):
                if proc.poll() is not None:
                    active.remove((name, proc))
                    if proc.returncode:
                        print(f"run {name} failed; see {out / name}.log")
    report(out, runs, args.stem_blocks, args.sft_steps)
    return 0


def report(out: Path, runs: list[tuple[str, int]], blocks: int, sft_steps: int | None) -> None:
    """One row per run: held-out exact match overall and per question type, unseen
    combinations, CPU seconds per SFT step."""
    rows, types = [], set()
    for arm, seed in runs:
        name = run_name(arm, seed, blocks, sft_steps)
        path = out / name / "sft" / "eval" / "eval.json"
        if not path.is_file():
            print(f"{name}: no eval.json (not finished)")
            continue
        evaluation = json.loads(path.read_text())
        manifest = json.loads((out / name / "sft" / "artifact" / "manifest.json").read_text())
        steps = manifest["metrics"]["steps"]
        cpu = out / f"{name}.cpu.json"
        per_step = json.loads(cpu.read_text())["sft_cpu_s"] / steps if cpu.is_file() else None
        types |= set(evaluation["test"]["per_type"])
        rows.append((arm, seed, evaluation, per_step))
    types = sorted(types)
    print(
        "| arm | seed | test | "
        + " | ".join(types)
        + " | test_unseen | CPU s / SFT step |\n|---|---:|---:|"
        + "---:|" * (len(types) + 2)
    )
    for arm, seed, ev, per_step in rows:
        cells = [f"{ev['test']['per_type'][t]['accuracy']:.3f}" for t in types]
        cpu = "n/a" if per_step is None else f"{per_step:.3f}"
        print(
            f"| {arm} | {seed} | {ev['test']['overall']['accuracy']:.3f} | "
            + " | ".join(cells)
            + f" | {ev['test_unseen']['overall']['accuracy']:.3f} | {cpu} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
