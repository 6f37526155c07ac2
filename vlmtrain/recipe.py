"""Run a recipe: named stages in order, each taking components from earlier stages' artifacts.

A single ``stage=<name>`` run is a one-stage recipe. Running the same command
again skips finished stages (their artifact matches their config) and resumes
the interrupted one from its last checkpoint.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.table import Table

from vlmtrain.artifacts import read_manifest
from vlmtrain.composition import check_handoffs, describe_model, effective_model
from vlmtrain.config import COMPONENTS
from vlmtrain.durable import atomic_write, atomic_write_json
from vlmtrain.eval.report import read_report
from vlmtrain.objectives.registry import objective_for
from vlmtrain.records import current_evaluation

MANIFEST = "manifest.json"

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
    finished in ``run_dir`` that is not part of this recipe (a single-stage run
    continuing an earlier one); a stage of this recipe named from itself or from an
    earlier stage (a cycle) is refused. Checked before anything trains."""
    names = [name for name, _ in stages]
    for i, (name, stage) in enumerate(stages):
        seen = names[:i]
        for comp in COMPONENTS:
            spec = str(stage.init[comp])
            source = spec[len("from:") :]
            if not spec.startswith("from:") or source in seen:
                continue
            where = f"stages.{name}.init.{comp}={spec!r}"
            if source == name:
                raise ValueError(f"{where}: a stage cannot start from its own artifact")
            if source in names:
                raise ValueError(
                    f"{where}: stage {source!r} runs after {name!r} in this recipe "
                    f"(order: {names}); a stage takes components only from earlier stages"
                )
            if run_dir is not None and (Path(run_dir) / source / "artifact" / MANIFEST).is_file():
                continue
            raise ValueError(
                f"{where}: no earlier stage of that name in this recipe (earlier stages: "
                f"{seen or 'none'}) and no finished one in {run_dir}"
            )


def stage_config(cfg: DictConfig, name: str, stage: DictConfig) -> DictConfig:
    """The root config with ``stage`` set to this stage, as a single-stage run would see it,
    and ``model`` the stage's effective model (its ``model`` override merged in, then
    cleared, so the config hash covers the model the stage trains, however it is spelt)."""
    out = cfg.copy()
    with open_dict(out):
        out.stages = {}
        out.stage = stage
        out.stage.name = name
        out.model = effective_model(cfg.model, stage.model, f"stages.{name}.model")
        out.stage.model = {}
        out.stage.accumulate = accumulation(out)
        if cfg.smoke_steps:
            out.stage.max_steps = min(out.stage.max_steps, cfg.smoke_steps)
            out.stage.eval_limit = min(out.stage.eval_limit or SMOKE_EVAL, SMOKE_EVAL)
            out.stage.val_batches = min(out.stage.val_batches, 1)
    return out


SMOKE_EVAL = 8  # samples per evaluation split under debug=smoke


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
    from vlmtrain.train import prepare_data, run_stage

    stages = stage_list(cfg)
    check_order(stages, run_dir)
    prepare_data(cfg)  # the tokenizers the hand-off checks compare may be generated data
    configs = [(name, stage_config(cfg, name, stage)) for name, stage in stages]
    check_handoffs(configs, run_dir)
    for _, scfg in configs:  # a bad last stage fails before the first one trains
        objective_for(scfg.stage.objective).check(scfg)
    rows = []
    for name, scfg in configs:
        artifact = run_stage(scfg, run_dir)
        rows.append(_stage_row(name, Path(run_dir) / name, artifact))
    write_summary(rows, Path(run_dir))
    return rows


def _stage_row(name: str, stage_dir: Path, artifact: Path) -> dict[str, Any]:
    manifest = read_manifest(artifact)
    metrics = manifest.get("metrics", {})
    row = {
        "stage": name,
        "model": describe_model(manifest["config"]["model"]),
        "steps": metrics.get("steps"),
        "wall_time_s": metrics.get("wall_time_s"),
        "tokens_seen": metrics.get("tokens_seen"),
        "final_loss": metrics.get("train/loss"),
        "val_loss": metrics.get("val/loss"),
        "artifact": str(artifact),
    }
    # Only an evaluation of this very artifact, never an earlier model's of this stage.
    current = current_evaluation(stage_dir / "eval", artifact)
    results = read_report(stage_dir / "eval") if current else None
    if results is not None:
        row["eval"] = {  # VQA splits; caption results are in eval.md
            split: r["overall"]["accuracy"]
            for split, r in results.items()
            if "overall" in r and not split.startswith("caption_")
        }
        row["eval_report"] = str(stage_dir / "eval" / "eval.md")
    return row


@rank_zero_only
def write_summary(rows: list[dict[str, Any]], run_dir: Path) -> None:
    atomic_write_json(run_dir / "summary.json", rows)
    table = Table(title=f"recipe summary: {run_dir}")
    cols = (
        "stage",
        "model",
        "steps",
        "wall time",
        "tokens seen",
        "final loss",
        "eval (exact match)",
    )
    for col in cols:
        table.add_column(
            col, justify="left" if col in ("stage", "model", "eval (exact match)") else "right"
        )
    for r in rows:
        evals = ", ".join(f"{k} {v:.3f}" for k, v in r.get("eval", {}).items())
        table.add_row(
            r["stage"],
            r.get("model", "-"),
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
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
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
