"""eval.json (everything, for scripts) and eval.md (one table, for people)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmtrain.durable import atomic_write_json, atomic_write_text

PREDICTIONS = "predictions"  # a result's per-question list: predictions.jsonl, not eval.json


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def format_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per (split, question type), then the split's overall row."""
    lines = ["| split | type | accuracy | chance | n |", "|---|---|---:|---:|---:|"]
    for split, res in results.items():
        if "per_type" not in res:  # e.g. hallucination rates: their own table
            continue
        for qtype, row in res["per_type"].items():
            if "unparseable" in row:  # box answers: scored by IoU, non-boxes counted
                qtype = f"{qtype} ({row['metric']}; {row['unparseable']} not a box)"
            lines.append(
                f"| {split} | {qtype} | {_pct(row['accuracy'])} | {_pct(row['chance'])} | {row['n']} |"
            )
        overall = res["overall"]
        lines.append(
            f"| {split} | **overall** | **{_pct(overall['accuracy'])}** | | {overall['n']} |"
        )
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``eval.json`` and ``eval.md`` into ``out_dir``, and every sample's prediction
    (with its file's key, e.g. ``ground_test``, and whether it was scored right) into
    ``predictions.jsonl``; return the paths of the first two."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "eval.json", out / "eval.md"
    lines = [
        json.dumps({"file": key, **row})
        for key, res in results.items()
        for row in res.get(PREDICTIONS, [])
    ]
    results = {k: {f: v for f, v in r.items() if f != PREDICTIONS} for k, r in results.items()}
    atomic_write_text(out / "predictions.jsonl", "".join(line + "\n" for line in lines))
    atomic_write_json(json_path, results)
    examples = []
    for split, res in results.items():
        for ex in res.get("examples", []):
            # Examples show what the model actually says, which a bare accuracy hides.
            examples.append(
                f"- {split} `{ex['id']}`: {ex['question']!r} → {ex['prediction']!r} (expected {ex['answer']!r})"
            )
    from vlmtrain.eval.preference_eval import format_hallucination

    body = "# Evaluation\n\n" + format_table(results)
    if hallucination := format_hallucination(results):
        body += "\n## Caption hallucination\n\n" + hallucination
    if examples:
        body += "\n## Examples\n\n" + "\n".join(examples) + "\n"
    atomic_write_text(md_path, body)
    return json_path, md_path


def read_report(out_dir: str | Path) -> dict[str, Any] | None:
    """The results ``write_report`` wrote there, or None when missing or damaged (a report
    cut short by an older, non-atomic write) or when its table is missing."""
    json_path, md_path = Path(out_dir) / "eval.json", Path(out_dir) / "eval.md"
    if not (json_path.is_file() and md_path.is_file()):
        return None
    try:
        results = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(results, dict) and all(isinstance(r, dict) for r in results.values())
    return results if ok and results else None
