"""Evaluation of a trained model on the shapes VQA, caption, grounding and OCR splits.

Answers are scored by exact match, except where the reference answer is a box
(``vlmtrain.data.boxes.BOX_FORMAT``): there a prediction is right when it parses as a
box whose IoU with the reference is at least ``IOU_THRESHOLD``; one that does not parse
is wrong and counted (``unparseable``).

Generation is greedy over left-padded batches (prompts from ``prompts.py``);
prompts are sorted by length first so each batch carries as little padding as
possible, and predictions are put back in sample order.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from vlmtrain.data.boxes import IOU_THRESHOLD, iou, parse_box
from vlmtrain.data.images import ImageProcessor
from vlmtrain.data.shapes import ANSWERS
from vlmtrain.eval.prompts import EvalSample, build_prompt, read_eval_samples
from vlmtrain.eval.report import PREDICTIONS

N_EXAMPLES = 5
# Captions run to a few dozen tokens; VQA answers are a word or two.
CAPTION_MAX_NEW_TOKENS = 32
# Per sample file kind (`<kind>_<split>.json`) beside VQA: (results key prefix, new tokens);
# a box answer runs to ~15 tokens of the shapes tokenizer.
EXTRA_KINDS = {"caption": CAPTION_MAX_NEW_TOKENS, "ground": 28, "ocr": 8}


def chance_levels(data_root: str | Path, split: str) -> dict[str, float | None]:
    """Chance accuracy per question type for ``split``.

    ``meta.json`` is preferred: it knows the data's ``max_objects`` and has a
    separate table for ``test_unseen``, where only held-out pairs are asked
    about and so fewer answers are possible.
    """
    meta_path = Path(data_root) / "meta.json"
    table: dict[str, float | None] = {t: 1 / len(a) for t, a in ANSWERS.items()}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        table = {**table, **meta.get(f"chance_{split}", meta.get("chance", {}))}
    table["caption"] = None  # free text: no meaningful chance level
    return table


def _split_of(samples_path: Path) -> str:
    """'vqa_test_unseen.json' -> 'test_unseen'."""
    stem = samples_path.name.split(".")[0]
    return stem.split("_", 1)[1] if "_" in stem else stem


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _decode(tokenizer: PreTrainedTokenizerBase, new_ids: list[int], eos: int) -> str:
    # Cut at the first end-of-turn: skip_special_tokens alone would splice text
    # generated after a stray special token onto the answer.
    if eos in new_ids:
        new_ids = new_ids[: new_ids.index(eos)]
    return tokenizer.decode(new_ids, skip_special_tokens=True).strip()


def predict(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    images: ImageProcessor,
    samples: list[EvalSample],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    source: str = "?",
) -> list[str]:
    """Greedy predictions for ``samples``, in their order."""
    device = _device(model)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts: list[list[int]] = []
    pixels: list[torch.Tensor | None] = []
    # Templating is the slowest host-side step and VQA questions repeat a lot
    # ("How many shapes are there?"), so identical prompts are rendered once.
    cache: dict[tuple, list[int]] = {}
    for s in samples:
        pv, per_image = (
            images.encode([images.load(p, s.id, source) for p in s.images])
            if s.images
            else (None, [])
        )
        key = (tuple((m["role"], m["content"]) for m in s.messages), tuple(per_image))
        if key not in cache:
            cache[key] = build_prompt(
                tokenizer, s.messages, model.image_token_id, per_image, len(s.images), s.id, source
            )
        prompts.append(cache[key])
        pixels.append(pv)
    order = sorted(range(len(samples)), key=lambda i: len(prompts[i]))
    preds = [""] * len(samples)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        length = max(len(prompts[i]) for i in idx)
        input_ids = torch.full((len(idx), length), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(prompts[i])
            input_ids[row, length - n :] = torch.tensor(prompts[i])  # left padding
            mask[row, length - n :] = 1
        batch_pixels = [pixels[i] for i in idx if pixels[i] is not None]
        pv = torch.cat(batch_pixels).to(device) if batch_pixels else None
        with torch.no_grad():
            new = model.generate(
                input_ids.to(device),
                mask.to(device),
                pv,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        for row, i in enumerate(idx):
            preds[i] = _decode(tokenizer, new[row].tolist(), eos)
    return preds


def score(
    samples: list[EvalSample], predictions: list[str], chance: dict[str, float | None]
) -> dict[str, Any]:
    """Accuracy overall and per question type: exact match (after stripping whitespace), or
    IoU >= IOU_THRESHOLD where the reference answer is a box (``unparseable``: predictions
    that are not a box, all counted wrong)."""
    unparseable: dict[str, int] = {}
    every: list[dict[str, Any]] = []
    for s, p in zip(samples, predictions, strict=True):
        ref = parse_box(s.answer)
        if ref is None:
            hit = p == s.answer.strip()
        else:
            guess = parse_box(p)
            unparseable[s.type] = unparseable.get(s.type, 0) + (guess is None)
            hit = guess is not None and iou(ref, guess) >= IOU_THRESHOLD
        every.append(
            {"id": s.id, "type": s.type, "question": s.question, "answer": s.answer}
            | {"prediction": p, "correct": bool(hit)}
        )
    per: dict[str, list[int]] = {}
    for r in every:
        per.setdefault(r["type"], []).append(int(r["correct"]))
    hits = [int(r["correct"]) for r in every]

    def row(t: str, v: list[int]) -> dict[str, Any]:
        out = {"accuracy": sum(v) / len(v), "n": len(v), "chance": chance.get(t)}
        if t in unparseable:
            out |= {"metric": f"iou>={IOU_THRESHOLD}", "unparseable": unparseable[t]}
        return out

    return {
        "overall": {"accuracy": sum(hits) / len(hits) if hits else 0.0, "n": len(hits)},
        "per_type": {t: row(t, v) for t, v in sorted(per.items())},
        "examples": every[:N_EXAMPLES],
        # Every sample's prediction: write_report moves these to predictions.jsonl.
        PREDICTIONS: every,
    }


def evaluate_split(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    image_processor: Any,
    samples_path: str | Path,
    image_root: str | Path,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    limit: int | None = None,
    chance: dict[str, float | None] | None = None,
) -> dict[str, Any]:
    """Generate and score one sample file (VQA or captions).

    ``image_processor`` is either what ``build_image_processor`` returns or a
    ``vlmtrain`` ``ImageProcessor``; images are read relative to ``image_root``.
    ``chance`` defaults to the table for the file's split from ``meta.json`` next to it.
    """
    samples_path = Path(samples_path)
    processor = (
        image_processor.processor
        if isinstance(image_processor, ImageProcessor)
        else image_processor
    )
    tiler = image_processor.tiler if isinstance(image_processor, ImageProcessor) else None
    images = ImageProcessor(
        processor, model.vision_spec.patch_size, image_root, model.token_downsample, tiler=tiler
    )
    if chance is None:
        chance = chance_levels(samples_path.parent, _split_of(samples_path))
    samples = read_eval_samples(samples_path, limit)
    t0 = time.perf_counter()
    preds = predict(
        model,
        tokenizer,
        images,
        samples,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        source=str(samples_path),
    )
    result = score(samples, preds, chance)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def evaluate_artifact(
    artifact_dir: str | Path,
    data_root: str | Path,
    splits: tuple[str, ...] | list[str] = ("test", "test_unseen"),
    limit: int | None = None,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    caption_max_new_tokens: int = CAPTION_MAX_NEW_TOKENS,
    device: str = "cpu",
) -> dict[str, Any]:
    """{split: VQA result, "<kind>_<split>": caption, grounding (``ground``) and OCR results
    (each where its file exists)}."""
    from vlmtrain.artifacts import load_image_processor, load_model

    data_root = Path(data_root)
    for split in splits:  # fail before loading the model
        names = [f"{kind}_{split}.json" for kind in ("vqa", *EXTRA_KINDS)]
        if not any((data_root / name).is_file() for name in names):
            raise FileNotFoundError(f"split {split!r}: none of {names} in {data_root}")
    model, tokenizer, model_cfg = load_model(Path(artifact_dir), device=device)
    model.eval()
    processor = load_image_processor(artifact_dir, model_cfg, model.vision_spec)
    images = ImageProcessor.for_model(processor, model, model_cfg, data_root)
    results: dict[str, Any] = {}
    with torch.no_grad():
        for split in splits:
            chance = chance_levels(data_root, split)
            n_new_of = {**EXTRA_KINDS, "caption": caption_max_new_tokens}
            for kind, key, n_new in (
                ("vqa", split, max_new_tokens),
                *((kind, f"{kind}_{split}", n_new_of[kind]) for kind in EXTRA_KINDS),
            ):
                path = data_root / f"{kind}_{split}.json"
                if path.is_file():
                    results[key] = evaluate_split(
                        model,
                        tokenizer,
                        images,
                        path,
                        data_root,
                        batch_size=batch_size,
                        max_new_tokens=n_new,
                        limit=limit,
                        chance=chance,
                    )
        from vlmtrain.eval.preference_eval import preference_results

        # Held-out preference accuracy and caption hallucination, where the data has them.
        results.update(
            preference_results(
                model, tokenizer, processor, model_cfg, data_root, splits, limit, batch_size
            )
        )
    return results
