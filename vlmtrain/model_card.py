"""The model card (``README.md``) of an export, in the Hugging Face model-card layout.

Everything comes from what training wrote: each stage's artifact manifest (config,
metrics, versions, the artifacts it started from), its ``eval/eval.md``, and the
run's ``summary.json`` and ``loss_curves.png`` when the stage ran inside a recipe.
The stages are found by following each artifact's ``init`` sources back to the
first stage, so a stage trained on its own from another run's artifact is still
described with the stages that produced its inputs.
"""

from __future__ import annotations

import json
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from vlmtrain.artifacts import MANIFEST, read_manifest

LOSS_PLOT = "loss_curves.png"


def stage_chain(artifact_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(artifact dir, manifest) of every stage that led to ``artifact_dir``, first stage
    first; each appears once."""
    ordered: list[tuple[Path, dict[str, Any]]] = []
    seen: set[Path] = set()

    def visit(path: Path) -> None:
        path = path.resolve()
        if path in seen:
            return
        seen.add(path)
        manifest = read_manifest(path)
        for source in manifest.get("init", {}).values():
            if (Path(source) / MANIFEST).is_file():
                visit(Path(source))
        ordered.append((path, manifest))

    visit(Path(artifact_dir))
    return ordered


def _trainable(stage: dict[str, Any]) -> str:
    t = stage.get("trainable", {})
    mult = t.get("lr_mult", {})
    parts = []
    for comp in ("vision", "projector", "lm"):
        if t.get(comp):
            m = mult.get(comp, 1.0)
            parts.append(comp + (f" (lr x{m:g})" if m != 1.0 else ""))
    if stage.get("lora", {}).get("enabled"):
        parts.append(f"LoRA r={stage['lora']['r']} on lm (merged)")
    return ", ".join(parts) or "none"


def _data(stage: dict[str, Any]) -> str:
    mixture = stage.get("mixture") or {}
    return ", ".join(f"{name} {w:g}" for name, w in mixture.items() if w) or "-"


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "s":
        return f"{float(value):.0f} s"
    return f"{float(value):.4f}"


def _base_models(model: dict[str, Any]) -> list[str]:
    """Pretrained components the model started from (their local paths, as configured)."""
    return [
        str(model[c]["path"]) for c in ("vision", "lm") if model.get(c, {}).get("path") is not None
    ]


def git_describe() -> str:
    from vlmtrain.artifacts import code_version

    return code_version(describe=True)


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "missing"


def render_card(
    artifact_dir: Path, architecture: str, *, has_plot: bool = False
) -> tuple[str, list[tuple[Path, dict[str, Any]]]]:
    chain = stage_chain(artifact_dir)
    last_dir, last = chain[-1]
    cfg = last["config"]
    model, data = cfg["model"], cfg.get("data", {})
    vision, projector, lm = model["vision"], model["projector"], model["lm"]
    header = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text", "tags:"]
    header += [f"  - {t}" for t in ("vlmtrain", "llava", "image-text-to-text", "vision-language")]
    bases = _base_models(model)
    if bases:
        header += ["base_model:"] + [f"  - {b}" for b in bases]
    header.append("---")

    lines = [
        f"# {cfg.get('run_name', 'vlmtrain model')} ({last['stage']})",
        "",
        f"A vision-language model trained with vlmtrain and exported as `{architecture}`.",
        "",
        "## Architecture",
        "",
        f"- vision tower: {vision['type']} ({vision.get('path') or 'trained from scratch'}), "
        f"{vision.get('image_size')} px, patch {vision.get('patch_size')}, "
        f"feature layer {vision.get('feature_layer')}",
        f"- projector: {projector['type']}",
        f"- language model: {lm['type']} ({lm.get('path') or 'trained from scratch'})",
        "",
        "## Training recipe",
        "",
        f"Recipe `{cfg.get('recipe') or 'single stage'}`, run `{cfg.get('run_name')}`; "
        f"data root `{data.get('root', '-')}`. Stages in order:",
        "",
        "| stage | objective | data (mixture weights) | steps | tokens seen "
        "| trainable | wall time | final loss |",
        "|---|---|---|---:|---:|---|---:|---:|",
    ]
    for _, m in chain:
        stage, metrics = m["config"]["stage"], m.get("metrics", {})
        lines.append(
            f"| {m['stage']} | {m.get('objective', stage.get('objective'))} | {_data(stage)} "
            f"| {_fmt(metrics.get('steps'), 'int')} | {_fmt(metrics.get('tokens_seen'), 'int')} "
            f"| {_trainable(stage)} | {_fmt(metrics.get('wall_time_s'), 's')} "
            f"| {_fmt(metrics.get('train/loss'), 'f')} |"
        )
    lines += ["", "Each stage's settings:", ""]
    for _, m in chain:
        s = m["config"]["stage"]
        optim = s.get("optim", {})
        lines.append(
            f"- **{m['stage']}**: lr {optim.get('lr', '-')}, batch {s.get('batch_size', '-')} "
            f"x accumulate {s.get('accumulate', 1)}, max length {s.get('max_length', '-')}, "
            f"loss reduction {s.get('loss_reduction', '-')}; init "
            + ", ".join(f"{k}: {_short(v)}" for k, v in m.get("init", {}).items())
        )
    evals = [(d, m) for d, m in chain if (d.parent / "eval" / "eval.md").is_file()]
    if evals:
        lines += ["", "## Evaluation", ""]
        for d, m in evals:
            lines += [f"### {m['stage']}", "", (d.parent / "eval" / "eval.md").read_text().strip()]
            lines.append("")
    if has_plot:
        lines += ["", "## Loss curves", "", f"![training loss per stage]({LOSS_PLOT})"]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "from PIL import Image",
        "",
        'model = AutoModelForImageTextToText.from_pretrained("PATH")',
        'processor = AutoProcessor.from_pretrained("PATH")',
        'messages = [{"role": "user", "content": [{"type": "image"},',
        '             {"type": "text", "text": "What colour is the circle?"}]}]',
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
        'inputs = processor(images=[Image.open("image.png")], text=prompt, return_tensors="pt")',
        "out = model.generate(**inputs)",
        'print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        "## Versions",
        "",
        f"- code (at training): `{last.get('code_version', 'unknown')}`; "
        f"exported by `{git_describe()}`",
    ]
    trained = last.get("versions", {})
    for name in sorted(set(trained) | {"transformers", "torch"}):
        lines.append(f"- {name}: {trained.get(name, '-')} (export: {_version(name)})")
    lines.append("")
    return "\n".join(header + [""] + lines), chain


def _short(value: Any) -> str:
    """An init source: an artifact path shows as <stage>/artifact."""
    p = Path(str(value))
    return f"{p.parent.name}/{p.name}" if (p / MANIFEST).is_file() else str(value)


def write_model_card(out_dir: Path, artifact_dir: Path, model: Any) -> Path:
    """README.md (and the loss-curve plot, when the run has one) into ``out_dir``."""
    artifact_dir = Path(artifact_dir).resolve()
    plot = artifact_dir.parent.parent / LOSS_PLOT  # <run>/<stage>/artifact
    if plot.is_file():
        shutil.copy2(plot, Path(out_dir) / LOSS_PLOT)
    architecture = type(model).__name__
    text, chain = render_card(artifact_dir, architecture, has_plot=plot.is_file())
    summary = artifact_dir.parent.parent / "summary.json"
    if summary.is_file():  # the recipe's own view, kept machine-readable beside the card
        rows = json.loads(summary.read_text())
        (Path(out_dir) / "vlmtrain_summary.json").write_text(json.dumps(rows, indent=2))
    path = Path(out_dir) / "README.md"
    path.write_text(text)
    return path
