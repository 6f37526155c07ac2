"""Grounding and OCR in the shapes world (on with ``n_grounding_train`` / ``n_ocr_train``).

- ``grounding``: "Where is the blue square?" -> ``<box>(x1,y1),(x2,y2)</box>``, the object's
  box in ``vlmtrain.data.boxes.BOX_FORMAT`` (0-999); scored by IoU >= 0.5.
- ``referring``: "What is at <box>...</box>?" -> "blue square"; scored by exact match.
- ``ocr``: every shape carries a short word; "What word is written on the blue square?" ->
  "cat"; scored by exact match.

Each task draws from its own seeded stream (``rng_for(kind)``), so turning a task on leaves
every other file of the data set unchanged. In ``test_unseen`` the asked object is a
held-out colour-shape pair, as for the VQA questions.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from vlmtrain.data.boxes import IOU_THRESHOLD, format_box, iou, normalize_box
from vlmtrain.data.shapes_world import (
    MARGIN,
    SIZES,
    WORDS,
    Obj,
    Pair,
    ShapesConfig,
    _place,
)

TASK_TYPES: tuple[str, ...] = ("grounding", "referring", "ocr")

SampleFn = Callable[..., dict[str, Any]]


def object_box(o: Obj, canvas: int) -> str:
    """The object's box as text, normalized to the (square) canvas."""
    return format_box(normalize_box(o.x0, o.y0, o.x0 + o.side, o.y0 + o.side, canvas, canvas))


def _scene(
    rng: random.Random,
    cfg: ShapesConfig,
    first: Pair,
    pool: list[Pair],
    size: str | None,
    max_objects: int = 0,
) -> list[Obj]:
    """`first` plus up to max_objects - 1 (0: cfg.max_objects - 1) other distinct pairs;
    sizes random unless given."""
    n = rng.randint(1, max_objects or cfg.max_objects)
    pairs = [first, *rng.sample([p for p in pool if p != first], n - 1)]
    rng.shuffle(pairs)
    return _place(rng, cfg, [(c, s, size or rng.choice(SIZES)) for c, s in pairs])


def _ground(
    rng: random.Random, cfg: ShapesConfig, n: int, tpool: list[Pair], opool: list[Pair]
) -> list[tuple[str, str, str, list[Obj], Pair]]:
    """n "where is" and n "what is at" questions; asked pairs cycle through tpool."""
    out = []
    for qtype in ("grounding", "referring"):
        for k in range(n):
            about = tpool[k % len(tpool)]
            objs = _scene(rng, cfg, about, opool, None)
            box = object_box(next(o for o in objs if o.pair == about), cfg.canvas)
            name = f"{about[0]} {about[1]}"
            if qtype == "grounding":
                out.append((qtype, f"Where is the {name}?", box, objs, about))
            else:
                out.append((qtype, f"What is at {box}?", name, objs, about))
    rng.shuffle(out)
    return out


def _ocr(
    rng: random.Random, cfg: ShapesConfig, n: int, tpool: list[Pair], opool: list[Pair]
) -> list[tuple[str, str, str, list[Obj], Pair]]:
    """n scenes of large shapes, each with its own word; the asked pair cycles through tpool
    and the asked words are balanced over WORDS, in shuffled order: cycling both together
    would tie each pair to the few words its index shares a residue with (16 pairs, 20
    words: 5 words per pair), an answer readable from the question without the image."""
    words = [WORDS[k % len(WORDS)] for k in range(n)]
    rng.shuffle(words)
    out = []
    for k, word in enumerate(words):
        about = tpool[k % len(tpool)]
        objs = _scene(rng, cfg, about, opool, "large", cfg.ocr_max_objects)
        others = iter(rng.sample([w for w in WORDS if w != word], len(objs) - 1))
        objs = [replace(o, word=word if o.pair == about else next(others)) for o in objs]
        q = f"What word is written on the {about[0]} {about[1]}?"
        out.append(("ocr", q, word, objs, about))
    return out


def task_files(
    cfg: ShapesConfig,
    split: str,
    rng_for: Callable[[str], random.Random],
    sample: SampleFn,
    tpool: list[Pair],
    opool: list[Pair],
) -> dict[str, list[dict[str, Any]]]:
    """``ground_<split>.json`` and ``ocr_<split>.json``, each only when its task is on."""
    files: dict[str, list[dict[str, Any]]] = {}
    for kind, n_train, build in (
        ("ground", cfg.n_grounding_train, _ground),
        ("ocr", cfg.n_ocr_train, _ocr),
    ):
        if not n_train:
            continue
        raw = build(rng_for(kind), cfg, n_train if split == "train" else cfg.n_eval, tpool, opool)
        files[f"{kind}_{split}.json"] = [
            sample(kind, k, objs, [(q, a)], type=t, question=q, answer=a, about=[list(about)])
            for k, (t, q, a, objs, about) in enumerate(raw)
        ]
    return files


def _grounding_chance(bbox: list[int], canvas: int) -> float:
    """P(IoU >= threshold) for a box of the right size at a uniformly random position (the
    positions the generator itself draws from): what knowing the size but not the place
    scores. Offsets beyond half the side can never reach IoU 0.5, so only those are tried."""
    x0, y0, x1, _ = bbox
    side, hi = x1 - x0, canvas - MARGIN - (x1 - x0)
    ref = normalize_box(x0, y0, x0 + side, y0 + side, canvas, canvas)
    reach, hits = side // 2 + 1, 0
    for x in range(max(MARGIN, x0 - reach), min(hi, x0 + reach) + 1):
        for y in range(max(MARGIN, y0 - reach), min(hi, y0 + reach) + 1):
            guess = normalize_box(x, y, x + side, y + side, canvas, canvas)
            hits += iou(ref, guess) >= IOU_THRESHOLD
    return hits / (hi - MARGIN + 1) ** 2


def task_chance(
    cfg: ShapesConfig, files: dict[str, list[dict[str, Any]]], split: str, tpool: list[Pair]
) -> dict[str, float]:
    """Chance per task type in ``split``: referring is one of the askable pairs, OCR one of
    the words, grounding as ``_grounding_chance`` averaged over the split's questions."""
    out: dict[str, float] = {}
    ground = [s for s in files.get(f"ground_{split}.json", []) if s["type"] == "grounding"]
    if ground:
        per = []
        for s in ground:
            asked = next(o for o in s["objects"] if [o["colour"], o["shape"]] == s["about"][0])
            per.append(_grounding_chance(asked["bbox"], cfg.canvas))
        out["grounding"] = sum(per) / len(per)
        out["referring"] = 1 / len(tpool)
    if f"ocr_{split}.json" in files:
        out["ocr"] = 1 / len(WORDS)
    return out
