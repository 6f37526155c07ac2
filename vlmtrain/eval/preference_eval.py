"""What preference training is for, measured on held-out shapes data.

- Preference accuracy: the share of held-out pairs (``pref_<split>.json``) whose
  chosen answer the model finds more likely than the rejected one (summed
  log-probs of the completion, the quantity DPO moves), per hallucination type.
- Caption hallucination rate (CHAIR-style): the model captions the held-out
  images (greedy); of the objects its captions name ("a small red circle"), the
  share not in the image, and the share of captions naming at least one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from vlmtrain.data.encode import SampleEncoder
from vlmtrain.data.images import ImageProcessor
from vlmtrain.data.preference import PairEncoder, collate_pairs, load_pairs
from vlmtrain.data.samples import read_records
from vlmtrain.data.shapes_world import COLOURS, SHAPES
from vlmtrain.eval.prompts import read_eval_samples
from vlmtrain.objectives.reference import pair_logps

MENTION = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")


@torch.no_grad()
def preference_accuracy(
    model,
    tokenizer,
    images: ImageProcessor,
    image_token: str,
    path: Path,
    limit=None,
    batch_size=32,
) -> dict[str, Any]:
    pairs = load_pairs(path)
    types = [str(r.get("type", "all")) for r in read_records(path)]
    n = min(len(pairs), limit or len(pairs))
    max_length = model.language_model.config.max_position_embeddings
    encode = PairEncoder(SampleEncoder(tokenizer, images, image_token, max_length))
    device = next(model.parameters()).device
    wins: list[bool] = []
    margins: list[float] = []
    for lo in range(0, n, batch_size):
        batch = collate_pairs(
            [encode(pairs[i]) for i in range(lo, min(n, lo + batch_size))], tokenizer.pad_token_id
        )
        mb = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        pixels = mb["pixel_values"]
        logps, _ = pair_logps(
            model, mb, model.image_features(pixels) if pixels is not None else None
        )
        b = len(batch["ids"])
        margin = (logps[:b] - logps[b:]).tolist()
        margins += margin
        wins += [m > 0 for m in margin]
    per: dict[str, list[bool]] = {}
    for t, w in zip(types[:n], wins, strict=True):
        per.setdefault(t, []).append(w)
    return {
        "overall": {"accuracy": sum(wins) / n, "n": n},
        "per_type": {
            t: {"accuracy": sum(v) / len(v), "n": len(v), "chance": 0.5}
            for t, v in sorted(per.items())
        },
        "mean_logp_margin": sum(margins) / n,
    }


def hallucination_rate(captions: list[str], objects: list[list[dict]]) -> dict[str, Any]:
    """Objects named in each caption against the objects of its image."""
    named = hallucinated = bad_captions = 0
    for caption, objs in zip(captions, objects, strict=True):
        present = {(o["colour"], o["shape"]) for o in objs}
        mentions = MENTION.findall(caption)
        wrong = [m for m in mentions if m not in present]
        named += len(mentions)
        hallucinated += len(wrong)
        bad_captions += bool(wrong)
    return {
        "object_rate": hallucinated / named if named else 0.0,  # CHAIR_i
        "caption_rate": bad_captions / len(captions) if captions else 0.0,  # CHAIR_s
        "objects_named": named,
        "captions": len(captions),
    }


def preference_results(
    model, tokenizer, processor, model_cfg, data_root: Path, splits, limit=None, batch_size=64
) -> dict[str, Any]:
    """{"preference_<split>": ..., "hallucination_<split>": ...} where the files exist."""
    from vlmtrain.eval.shapes_eval import CAPTION_MAX_NEW_TOKENS, predict

    images = ImageProcessor.for_model(processor, model, model_cfg, data_root)
    out: dict[str, Any] = {}
    for split in splits:
        pref = data_root / f"pref_{split}.json"
        if pref.is_file():
            out[f"preference_{split}"] = preference_accuracy(
                model, tokenizer, images, model_cfg.image_token, pref, limit
            )
        caption = data_root / f"caption_{split}.json"
        if caption.is_file():
            records = read_records(caption)[:limit]
            if records and "objects" in records[0]:
                samples = read_eval_samples(caption, limit)
                preds = predict(
                    model,
                    tokenizer,
                    images,
                    samples,
                    batch_size=batch_size,
                    max_new_tokens=CAPTION_MAX_NEW_TOKENS,
                    source=str(caption),
                )
                out[f"hallucination_{split}"] = hallucination_rate(
                    preds, [r["objects"] for r in records]
                )
    return out


def format_hallucination(results: dict[str, Any]) -> str:
    rows = [
        (k.removeprefix("hallucination_"), v)
        for k, v in results.items()
        if k.startswith("hallucination_")
    ]
    if not rows:
        return ""
    lines = [
        "| split | objects named not in the image | captions with one | objects named | captions |",
        "|---|---:|---:|---:|---:|",
    ]
    for split, r in rows:
        lines.append(
            f"| {split} | {100 * r['object_rate']:.1f}% | {100 * r['caption_rate']:.1f}% | "
            f"{r['objects_named']} | {r['captions']} |"
        )
    return "\n".join(lines) + "\n"
