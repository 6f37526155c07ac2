"""Data sets made by an earlier stage of the run: ``from:<stage>/<file>`` as a data path.

A generate stage writes its data sets in ``<run>/<stage>/data/`` (objectives/generate.py);
a later stage names one as ``data.datasets.<name>.train=from:<stage>/sft.jsonl``. The
name is resolved here, before the stage's identity is hashed, so the stage's config
hash covers the file's content (its data fingerprint) like any other data file, and a
missing or unfinished source fails naming the key.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PREFIX = "from:"


def resolve_stage_data(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """``cfg`` with every ``from:<stage>/<file>`` data path of its stage's mixture replaced
    by the file's path in ``run_dir``; unchanged (the same object) when there is none."""
    data = cfg.data
    changes = {}
    for name in cfg.stage.mixture:
        entry = data.datasets.get(name)
        if not OmegaConf.is_dict(entry) and not isinstance(entry, dict):
            continue
        for split in ("train", "val"):
            spec = entry.get(split)
            if isinstance(spec, str) and spec.startswith(PREFIX):
                changes[(name, split)] = _path_of(
                    spec, Path(run_dir), f"data.datasets.{name}.{split}"
                )
    if not changes:
        return cfg
    cfg = cfg.copy()
    for (name, split), path in changes.items():
        OmegaConf.update(cfg, f"data.datasets.{name}.{split}", str(path), force_add=True)
    return cfg


def _path_of(spec: str, run_dir: Path, key: str) -> Path:
    stage, sep, file = spec[len(PREFIX) :].partition("/")
    if not sep or not stage or not file:
        raise ValueError(
            f"{key}={spec!r}: expected from:<stage>/<file>, e.g. from:generate/sft.jsonl"
        )
    stage_dir = run_dir / stage
    if not (stage_dir / "artifact" / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{key}={spec!r}: stage {stage!r} has not finished in {run_dir} (no artifact); "
            "it must come earlier in the recipe"
        )
    path = stage_dir / "data" / file
    if not path.is_file():
        made = sorted(p.name for p in (stage_dir / "data").glob("*.jsonl"))
        raise FileNotFoundError(
            f"{key}={spec!r}: stage {stage!r} wrote no {file!r} (it wrote {made or 'no data'})"
        )
    return path
