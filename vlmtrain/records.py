"""The records of a stage that belong to one trained model: its logs and its evaluation.

A stage directory outlives the models trained in it: a stage is retrained when its
config changes (after the user deletes the old artifact) or when its artifact is
removed. Records written for an earlier model must then never be reported as the new
one's, and must not be lost either:

- an evaluation names the artifact it scored (``eval/source.json`` holds the
  artifact's ``artifact_id``); an evaluation of another artifact is stale;
- when a stage starts from scratch (no checkpoint to resume), the logs and evaluation
  left by an earlier training are moved aside to ``<name>.previous-<k>``, so the new
  history starts fresh and the old one stays readable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EVAL_DIR = "eval"
EVAL_SOURCE = "source.json"
# What an earlier training of the same stage leaves behind that describes *that* model.
PER_MODEL_RECORDS = ("logs", EVAL_DIR)


def write_stage_record(stage_dir: Path, resolved: dict[str, Any], resumed: bool) -> None:
    """At stage start (after every check that could refuse the invocation): the resolved
    config in ``config.yaml``, and one line per invocation in ``invocations.jsonl`` with
    the command-line overrides, the code and package versions."""
    import sys
    import time

    import yaml

    from vlmtrain.artifacts import code_version, package_versions

    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed": resumed,
        "overrides": command_line_overrides(),
        "argv": sys.argv,
        "code_version": code_version(),
        "versions": package_versions(),
    }
    with (stage_dir / "invocations.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")


def command_line_overrides() -> list[str]:
    """The Hydra overrides of this job (those a sweep gave it included), when under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def artifact_identity(artifact_dir: Path) -> dict[str, Any]:
    """What names one trained artifact: its id (unique per save) and config hash."""
    manifest = json.loads((Path(artifact_dir) / "manifest.json").read_text())
    return {
        "artifact_id": manifest.get("artifact_id"),
        "config_hash": manifest.get("config_hash"),
        "artifact": str(Path(artifact_dir).resolve()),
    }


def mark_evaluated(eval_dir: Path, artifact_dir: Path, **details: Any) -> None:
    """Record which artifact the evaluation in ``eval_dir`` scored."""
    from vlmtrain.durable import atomic_write_json

    atomic_write_json(Path(eval_dir) / EVAL_SOURCE, {**artifact_identity(artifact_dir), **details})


def evaluation_owner(eval_dir: Path) -> str:
    """Who wrote the evaluation in ``eval_dir``: "stage" for a stage's own (also when
    no source record says otherwise), or the command that wrote it."""
    try:
        return json.loads((Path(eval_dir) / EVAL_SOURCE).read_text()).get("owner", "stage")
    except (OSError, ValueError):
        return "stage"


def current_evaluation(eval_dir: Path, artifact_dir: Path) -> Path | None:
    """``eval_dir/eval.json`` when it scored this very artifact, else None.

    An evaluation without a source record predates this check and cannot be tied to
    an artifact, so it counts as stale (it is redone, not trusted)."""
    eval_dir = Path(eval_dir)
    result, source = eval_dir / "eval.json", eval_dir / EVAL_SOURCE
    if not (result.is_file() and source.is_file()):
        return None
    try:
        recorded = json.loads(source.read_text())
        current = artifact_identity(artifact_dir)
    except (OSError, ValueError):
        return None
    if current["artifact_id"] is None:  # an artifact written before ids existed
        same = recorded.get("config_hash") == current["config_hash"]
    else:
        same = recorded.get("artifact_id") == current["artifact_id"]
    return result if same else None


def set_aside(path: Path) -> Path:
    """Rename ``path`` to ``<name>.previous-<k>`` (the first free k); return the new path."""
    path = Path(path)
    k = 1
    while (target := path.with_name(f"{path.name}.previous-{k}")).exists():
        k += 1
    path.rename(target)
    return target


def set_aside_previous(stage_dir: Path) -> list[tuple[Path, Path]]:
    """Move the per-model records of an earlier training of this stage aside.

    Called when a stage starts from scratch; returns (old path, new path) pairs."""
    paths = [Path(stage_dir) / name for name in PER_MODEL_RECORDS]
    return [(p, set_aside(p)) for p in paths if p.exists()]


def trainings_set_aside(stage_dir: Path) -> int:
    """How many earlier trainings of this stage had their logs set aside."""
    return len(list(Path(stage_dir).glob("logs.previous-*")))
