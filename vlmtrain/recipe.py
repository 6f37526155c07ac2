"""Run a recipe: named stages in order, each taking components from earlier stages' artifacts.

A single ``stage=<name>`` run is a one-stage recipe. Running the same command
again skips finished stages (their artifact matches their config) and resumes
the interrupted one from its last checkpoint.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.table import Table

from vlmtrain.config import COMPONENTS
from vlmtrain.objectives.registry import objective_for

console = Console()


def stage_list(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(name, stage config) in run order; the key of ``stages`` is the stage's name."""
    if cfg.stage is not None and cfg.stages:
        raise ValueError("both stage and a recipe's stages are set: run one stage or one recipe")
    if cfg.stage is not None:
        return [(cfg.stage.name, cfg.stage)]
    if not cfg.stages:
        raise ValueError("nothing to run: pass recipe=<name> or stage=<name>")
    return list(cfg.stages.items())


def check_order(stages: list[tuple[str, DictConfig]], run_dir: Path | None = None) -> None:
    """Every ``from:<stage>`` names an earlier stage of this recipe, or a stage already
    finished in ``run_dir`` (a single-stage run continuing an earlier one); checked
    before anything trains."""
    seen: list[str] = []
    for name, stage in stages:
        for comp in COMPONENTS:
            spec = str(stage.init[comp])
            if not spec.startswith("from:") or spec[5:] in seen:
                continue
            if (
                run_dir is not None
                and (Path(run_dir) / spec[5:] / "artifact" / "manifest.json").is_file()
            ):
                continue
            raise ValueError(
                f"stages.{name}.init.{comp}={spec!r}: no earlier stage of that name in this "
                f"recipe (earlier stages: {seen or 'none'}) and no finished one in {run_dir}"
            )
        seen.append(name)


def stage_config(cfg: DictConfig, name: str, stage: DictConfig) -> DictConfig:
    """The root config with ``stage`` set to this stage, as a single-stage run would see it."""
    out = cfg.copy()
    with open_dict(out):
        out.stages = {}
        out.stage = stage
        out.stage.name = name
        out.stage.accumulate = accumulation(out)
    return out


def accumulation(cfg: DictConfig) -> int:
    """Micro-batches per step; derived from stage.global_batch_size when that is set."""
    stage, trainer = cfg.stage, cfg.trainer
    if stage.global_batch_size is None:
        return stage.accumulate
    devices = trainer.devices if isinstance(trainer.devices, int) else 1
    per_step = stage.batch_size * devices * trainer.num_nodes
    if stage.global_batch_size % per_step:
        raise ValueError(
            f"stages.{stage.name}.global_batch_size={stage.global_batch_size} is not a multiple of "
            f"batch_size {stage.batch_size} x devices {devices} x nodes {trainer.num_nodes}"
        )
    return stage.global_batch_size // per_step


def run_recipe(cfg: DictConfig, run_dir: Path) -> list[dict[str, Any]]:
    from vlmtrain.train import run_stage

    stages = stage_list(cfg)
    check_order(stages, run_dir)
    for name, stage in stages:  # a bad last stage fails before the first one trains
        objective_for(stage.objective).check(stage_config(cfg, name, stage))
    rows = []
    for name, stage in stages:
        scfg = stage_config(cfg, name, stage)
        artifact = run_stage(scfg, run_dir)
        rows.append(_stage_row(name, Path(run_dir) / name, artifact))
    write_summary(rows, Path(run_dir))
    return rows


def _stage_row(name: str, stage_dir: Path, artifact: Path) -> dict[str, Any]:
    manifest = json.loads((artifact / "manifest.json").read_text())
    metrics = manifest.get("metrics", {})
    row = {
        "stage": name,
        "steps": metrics.get("steps"),
        "wall_time_s": metrics.get("wall_time_s"),
        "tokens_seen": metrics.get("tokens_seen"),
        "final_loss": metrics.get("train/loss"),
        "val_loss": metrics.get("val/loss"),
        "artifact": str(artifact),
    }
    eval_path = stage_dir / "eval" / "eval.json"
    if eval_path.is_file():
        results = json.loads(eval_path.read_text())
        row["eval"] = {  # VQA splits; caption results are in eval.md
            split: r["overall"]["accuracy"]
            for split, r in results.items()
            if "overall" in r and not split.startswith("caption_")
        }
        row["eval_report"] = str(stage_dir / "eval" / "eval.md")
    return row


@rank_zero_only
def write_summary(rows: list[dict[str, Any]], run_dir: Path) -> None:
    (run_dir / "summary.json").write_text(json.dumps(rows, indent=2))
    table = Table(title=f"recipe summary: {run_dir}")
    for col in ("stage", "steps", "wall time", "tokens seen", "final loss", "eval (exact match)"):
        table.add_column(col, justify="left" if col in ("stage", "eval (exact match)") else "right")
    for r in rows:
        evals = ", ".join(f"{k} {v:.3f}" for k, v in r.get("eval", {}).items())
        table.add_row(
            r["stage"],
            str(r["steps"]),
            f"{r['wall_time_s']:.0f}s" if r["wall_time_s"] is not None else "-",
            f"{int(r['tokens_seen']):,}" if r.get("tokens_seen") else "-",
            f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-",
            evals or "-",
        )
    console.print(table)
    for r in rows:
        if "eval_report" in r:
            console.print(
                f"[bold]{r['stage']}[/] evaluation:\n" + Path(r["eval_report"]).read_text()
            )
    plot = plot_losses(rows, run_dir)
    console.print(f"summary: {run_dir / 'summary.json'}\nloss curves: {plot}")


def plot_losses(rows: list[dict[str, Any]], run_dir: Path) -> Path:
    """One PNG with the training loss of every stage, stages laid end to end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    offset = 0
    for r in rows:
        steps, losses = _read_losses(run_dir / r["stage"] / "logs" / "csv" / "metrics.csv")
        if steps:
            ax.plot([offset + s for s in steps], losses, label=r["stage"])
            offset += max(steps) + 1
    ax.set_xlabel("step (stages in order)")
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    out = run_dir / "loss_curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _read_losses(path: Path) -> tuple[list[int], list[float]]:
    if not path.is_file():
        return [], []
    by_step: dict[int, float] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                by_step[int(row["step"])] = float(row["train/loss"])  # a redone step keeps the last
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]
