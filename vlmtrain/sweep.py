"""Hydra multirun: job directories named by their overrides, the metric each job returns
to the sweeper, and one table of every job's results when the sweep ends.

``conf/config.yaml`` names each job's directory ``${vlmtrain_job_dir:}`` (so re-running
the same sweep finds each job's directory whatever the order of the values, and a
finished job is skipped, an interrupted one resumed) and registers ``SweepSummary`` as a
Hydra callback. ``objective`` is what a job returns: ``sweep.metric`` of its stage, so
the Optuna sweeper can optimize it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

MAX_DIRNAME = 120
SWEEP_RECORD = "multirun.yaml"  # the sweep command's config (Hydra's basic sweeper's name)
OBJECTIVE_FILE = "sweep_metric.json"


def job_dirname() -> str:
    """This sweep job's directory name: its values of the overrides the sweep varies
    (``stages.sft.optim.lr=0.001``), sorted by key. Path separators and other characters
    a file system dislikes become ``_``; a long name keeps its start and gets a hash of
    the whole, so distinct jobs never share a directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra_cfg = HydraConfig.get()
    parser = OverridesParser.create()
    job = {
        o.get_key_element(): o.input_line
        for o in parser.parse_overrides(list(hydra_cfg.overrides.task))
    }
    swept = _swept_keys(Path(hydra_cfg.sweep.dir), parser)
    optuna_params = set((hydra_cfg.sweeper.get("params") or {}).keys())
    if swept is None and not optuna_params:  # no record of what the sweep varies
        chosen = [job[k] for k in sorted(job) if k.split("=")[0] not in ("run_name", "output_dir")]
    else:
        keys = (swept or set()) | optuna_params
        if not keys:
            # A -m command that varies nothing (one job, e.g. submitted with cluster=slurm)
            # runs in the run directory itself, as the same command without -m does.
            return "."
        chosen = [job[k] for k in sorted(job) if k in keys]
    full = ",".join(chosen) or "default"
    name = re.sub(r"[^A-Za-z0-9=,._+-]", "_", full)
    if len(name) > MAX_DIRNAME:
        digest = hashlib.sha1(full.encode()).hexdigest()[:10]
        name = f"{name[: MAX_DIRNAME - 11]}~{digest}"
    return name


def _swept_keys(sweep_dir: Path, parser) -> set[str] | None:
    """Keys the sweep command varies (``a=1,2``, ``range(...)``, ``interval(...)``), read
    from the sweep's ``multirun.yaml`` (written by ``SweepSummary`` when the sweep starts,
    and by Hydra's basic sweeper); None without one."""
    path = sweep_dir / SWEEP_RECORD
    if not path.is_file():
        return None
    overrides = OmegaConf.load(path).hydra.overrides.task
    return {
        o.get_key_element()
        for o in parser.parse_overrides(list(overrides))
        if o.is_sweep_override()
    }


def _objective_stage(cfg: DictConfig) -> tuple[str, DictConfig]:
    from vlmtrain.recipe import stage_list

    stages = stage_list(cfg)
    if cfg.sweep.stage is None:
        return stages[-1]
    for name, stage in stages:
        if name == cfg.sweep.stage:
            return name, stage
    raise ValueError(
        f"sweep.stage={cfg.sweep.stage!r} is not a stage of this run "
        f"(stages: {[n for n, _ in stages]})"
    )


def check_objective(cfg: DictConfig) -> None:
    """``sweep.*`` checked before anything trains: the direction, the stage, and a metric
    the stage will have (a validation loss needs validation, eval/<split> that split)."""
    if not cfg.sweep.metric:
        return
    if cfg.sweep.direction not in ("minimize", "maximize"):
        raise ValueError(f"sweep.direction={cfg.sweep.direction!r}: minimize or maximize")
    name, stage = _objective_stage(cfg)
    metric = cfg.sweep.metric
    if metric.startswith("eval/") and metric[len("eval/") :] not in stage.eval_splits:
        raise ValueError(
            f"sweep.metric={metric!r}: stage {name!r} evaluates {list(stage.eval_splits)} "
            f"(stages.{name}.eval_splits)"
        )
    if metric.startswith("val/") and not stage.val_every:
        raise ValueError(
            f"sweep.metric={metric!r}: stage {name!r} never validates; set "
            f"stages.{name}.val_every (or stage.val_every) to a number of steps"
        )


def stage_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A finished stage's metrics by name: its artifact's (train/loss, val/loss, steps,
    tokens_seen, ...) and eval/<split>, the exact-match accuracy of each eval split."""
    from vlmtrain.artifacts import read_manifest

    metrics = dict(read_manifest(Path(row["artifact"])).get("metrics", {}))
    metrics.update({f"eval/{split}": acc for split, acc in (row.get("eval") or {}).items()})
    return metrics


def objective(cfg: DictConfig, rows: list[dict[str, Any]], run_dir: Path) -> float | None:
    """The value of ``sweep.metric`` for this run (None when unset): what the job returns
    to the sweeper. A finished stage skipped by a re-run returns the same value, read
    from its artifact. Recorded in ``sweep_metric.json`` for the sweep's summary."""
    from lightning.pytorch.utilities import rank_zero_only

    from vlmtrain.durable import atomic_write_json

    if not cfg.sweep.metric:
        return None
    name, _ = _objective_stage(cfg)
    metrics = stage_metrics(next(r for r in rows if r["stage"] == name))
    if cfg.sweep.metric not in metrics:
        raise ValueError(
            f"sweep.metric={cfg.sweep.metric!r}: stage {name!r} has no such metric; "
            f"it has {sorted(metrics)}"
        )
    value = float(metrics[cfg.sweep.metric])
    if rank_zero_only.rank == 0:
        record = {"stage": name, "metric": cfg.sweep.metric, "value": value}
        atomic_write_json(
            Path(run_dir) / OBJECTIVE_FILE, {**record, "direction": cfg.sweep.direction}
        )
        print(f"sweep metric: {name} {cfg.sweep.metric} = {value:.6g}")
    return value


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("vlmtrain_job_dir"):
        OmegaConf.register_new_resolver("vlmtrain_job_dir", job_dirname)


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory holding a recipe summary: each stage's final loss and
    evaluation accuracies, keyed ``<stage>/<metric>``."""
    rows = []
    for summary in sorted(Path(sweep_dir).glob("*/summary.json")):
        row: dict[str, Any] = {"job": summary.parent.name}
        if (found := summary.parent / OBJECTIVE_FILE).is_file():
            record = json.loads(found.read_text())
            row["objective"] = record["value"]
            row["_objective"] = record
        for stage in json.loads(summary.read_text()):
            name = stage["stage"]
            row[f"{name}/final_loss"] = stage.get("final_loss")
            row[f"{name}/val_loss"] = stage.get("val_loss")
            for split, acc in (stage.get("eval") or {}).items():
                row[f"{name}/eval_{split}"] = acc
        rows.append(row)
    return rows


def write_sweep_summary(sweep_dir: Path) -> tuple[Path, Path] | None:
    """``sweep_summary.csv`` and ``sweep_summary.md`` in the sweep directory."""
    rows = sweep_rows(sweep_dir)
    if not rows:
        return None
    columns = ["job"] + sorted(
        {k for r in rows for k in r if k != "job" and not k.startswith("_") and r[k] is not None}
    )
    csv_path, md_path = Path(sweep_dir) / "sweep_summary.csv", Path(sweep_dir) / "sweep_summary.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    def cell(v: Any) -> str:
        return "–" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    best = _best(rows)
    if best:
        lines += ["", best]
    md_path.write_text("# Sweep summary\n\n" + "\n".join(lines) + "\n")
    return csv_path, md_path


def _best(rows: list[dict[str, Any]]) -> str | None:
    """The line naming the best job by its objective (``sweep.metric``)."""
    scored = [r for r in rows if "_objective" in r]
    if not scored:
        return None
    record = scored[0]["_objective"]
    pick = max if record["direction"] == "maximize" else min
    best = pick(scored, key=lambda r: r["objective"])
    return (
        f"best ({record['direction']} {record['stage']} {record['metric']}): "
        f"{best['job']} = {best['objective']:.6g}"
    )


class SweepSummary(Callback):
    """Records what the sweep varies when it starts (job directories are named by it), and
    writes the sweep's table once every job has run (also after a partial re-run: it reads
    every job directory, not only this invocation's)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra's basic sweeper writes this too; the Optuna sweeper does not.
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, sweep_dir / SWEEP_RECORD)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        written = write_sweep_summary(Path(config.hydra.sweep.dir))
        if written:
            print(f"sweep summary: {written[0]}\n" + written[1].read_text())


class OptunaDefaults(Callback):
    """``hydra/sweeper=optuna`` with vlmtrain's defaults, filled in as the sweep starts,
    before Hydra builds the sweeper (a vlmtrain sweeper config named ``optuna`` would
    clash with the plugin's schema of that name):

    * its sampler is seeded with ``seed`` unless ``hydra.sweeper.sampler.seed`` is set.
      With no study storage (the default), re-running the same sweep command then
      replays the same trials: trial k proposes the same parameters, finds its job
      directory (named by them), is skipped when finished (its metric read back from
      its artifact) and resumed when not. Raising ``n_trials`` replays the finished
      trials and runs new ones after them.
    * its direction is ``sweep.direction``, the one place the direction is set.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = config.hydra.sweeper
        if "optuna" not in str(sweeper.get("_target_", "")).lower():
            return
        own = str(getattr(sweeper.direction, "name", sweeper.direction))
        if own != "minimize" and own != config.sweep.direction:
            raise ValueError(
                f"hydra.sweeper.direction={own} and sweep.direction={config.sweep.direction}: "
                "set the direction with sweep.direction only"
            )
        with read_write(sweeper), open_dict(sweeper):
            sweeper.direction = config.sweep.direction
            if "seed" in sweeper.sampler and sweeper.sampler.seed is None:
                sweeper.sampler.seed = config.seed
