"""Hydra multirun: job directories named by their overrides, and one table of every job's
results when the sweep ends.

``conf/config.yaml`` names each job's directory ``${vlmtrain_job_dir:}`` (so re-running
the same sweep finds each job's directory whatever the order of the values) and
registers ``SweepSummary`` as a Hydra callback.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

MAX_DIRNAME = 120


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
    # Without a record of what the sweep varies (another sweeper), every override names it.
    chosen = [job[k] for k in sorted(job) if k in swept] or [
        job[k] for k in sorted(job) if k.split("=")[0] not in ("run_name", "output_dir")
    ]
    full = ",".join(chosen) or "default"
    name = re.sub(r"[^A-Za-z0-9=,._+-]", "_", full)
    if len(name) > MAX_DIRNAME:
        digest = hashlib.sha1(full.encode()).hexdigest()[:10]
        name = f"{name[: MAX_DIRNAME - 11]}~{digest}"
    return name


def _swept_keys(sweep_dir: Path, parser) -> set[str]:
    """Keys the sweep command varies (``a=1,2``, ``range(...)``), read from the
    ``multirun.yaml`` Hydra's sweeper writes before launching the jobs."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return set()
    overrides = OmegaConf.load(path).hydra.overrides.task
    return {
        o.get_key_element()
        for o in parser.parse_overrides(list(overrides))
        if o.is_sweep_override()
    }


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("vlmtrain_job_dir"):
        OmegaConf.register_new_resolver("vlmtrain_job_dir", job_dirname)


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory holding a recipe summary: each stage's final loss and
    evaluation accuracies, keyed ``<stage>/<metric>``."""
    rows = []
    for summary in sorted(Path(sweep_dir).glob("*/summary.json")):
        row: dict[str, Any] = {"job": summary.parent.name}
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
    columns = ["job"] + sorted({k for r in rows for k in r if k != "job" and r[k] is not None})
    csv_path, md_path = Path(sweep_dir) / "sweep_summary.csv", Path(sweep_dir) / "sweep_summary.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    def cell(v: Any) -> str:
        return "–" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    md_path.write_text("# Sweep summary\n\n" + "\n".join(lines) + "\n")
    return csv_path, md_path


class SweepSummary(Callback):
    """Writes the sweep's table once every job has run (also after a partial re-run: it
    reads every job directory, not only this invocation's)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        written = write_sweep_summary(Path(config.hydra.sweep.dir))
        if written:
            print(f"sweep summary: {written[0]}\n" + written[1].read_text())
