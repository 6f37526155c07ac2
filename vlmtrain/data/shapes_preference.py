"""Preference pairs for the shapes world: the true answer against a plausible hallucination.

Pairs are derived from the VQA and caption files of a split (same images, same
prompts): the chosen answer is the record's, the rejected one is wrong in the
way a VLM tends to be wrong: a colour or shape of another object in the scene,
a count off by one, the flipped yes/no, the opposite relation; a caption that
names an object the image does not hold, or gives one object the wrong colour
or shape. ``pref_test.json`` (from the test images) is the held-out split.
Hallucinated objects are drawn from the training pairs only, so the held-out
colour-shape pairs stay out of every text, as in the rest of the shapes world.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from vlmtrain.data.shapes_world import COLOURS, SHAPES, SIZES, Obj, ShapesConfig, caption_of

OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
PAIR_SPLITS = ("train", "val", "test")
CAPTION_KINDS = ("caption_absent", "caption_colour", "caption_shape")


def _objects(record: dict[str, Any]) -> list[Obj]:
    out = []
    for o in record["objects"]:
        x0, y0, x1, _ = o["bbox"]
        out.append(Obj(o["colour"], o["shape"], o["size"], x0, y0, x1 - x0))
    return out


def _wrong_answer(rng: random.Random, record: dict, cfg: ShapesConfig) -> str:
    qtype, answer, objs = record["type"], record["answer"], _objects(record)
    if qtype in ("colour", "shape"):
        attr, values = ("colour", COLOURS) if qtype == "colour" else ("shape", SHAPES)
        in_scene = sorted({getattr(o, attr) for o in objs} - {answer})
        return rng.choice(in_scene or [v for v in values if v != answer])
    if qtype == "count":
        n = int(answer)
        return str(rng.choice([k for k in (n - 1, n + 1) if 1 <= k <= cfg.max_objects]))
    if qtype == "exist":
        return "no" if answer == "yes" else "yes"
    return OPPOSITE[answer]


def _hallucinated_caption(
    rng: random.Random, objs: list[Obj], kind: str, allowed: list[tuple[str, str]]
) -> str:
    present = {o.pair for o in objs}
    absent = [p for p in allowed if p not in present]
    if kind == "caption_absent":  # an object that is not there, somewhere in the listing
        colour, shape = rng.choice(absent)
        x, y = rng.randint(0, 60), rng.randint(0, 60)
        return caption_of([*objs, Obj(colour, shape, rng.choice(SIZES), x, y, 0)])
    k, options = rng.choice(_swaps(objs, kind, allowed))
    o = objs[k]
    if kind == "caption_colour":
        new = Obj(rng.choice(options), o.shape, o.size, o.x0, o.y0, o.side)
    else:
        new = Obj(o.colour, rng.choice(options), o.size, o.x0, o.y0, o.side)
    return caption_of([*objs[:k], new, *objs[k + 1 :]])


def build_pairs(
    root: Path, split: str, cfg: ShapesConfig, n_vqa: int, n_caption: int
) -> list[dict]:
    held = {tuple(h) for h in cfg.holdout}
    allowed = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held]
    rng = random.Random(f"{cfg.seed}-{split}-preference")
    pairs = []
    for rec in json.loads((root / f"vqa_{split}.json").read_text())[:n_vqa]:
        pairs.append((rec, rec["type"], rec["answer"], _wrong_answer(rng, rec, cfg)))
    for rec in json.loads((root / f"caption_{split}.json").read_text())[:n_caption]:
        objs = _objects(rec)
        kinds = [k for k in CAPTION_KINDS if k == "caption_absent" or _swaps(objs, k, allowed)]
        kind = rng.choice(kinds)
        pairs.append((rec, kind, rec["answer"], _hallucinated_caption(rng, objs, kind, allowed)))
    rng.shuffle(pairs)
    return [
        {
            "id": f"pref-{rec['id']}",
            "image": rec["image"],
            "conversations": rec["conversations"][:1],  # the question; the answers follow
            "chosen": chosen,
            "rejected": rejected,
            "type": kind,
            "objects": rec["objects"],
        }
        for rec, kind, chosen, rejected in pairs
    ]


def _swaps(objs: list[Obj], kind: str, allowed: list[tuple[str, str]]) -> list[tuple[int, list]]:
    """(object index, the colours or shapes it can take) making a pair absent from the image."""
    present = {o.pair for o in objs}
    out = []
    for k, o in enumerate(objs):
        if kind == "caption_colour":
            options = [
                c for c in COLOURS if (c, o.shape) in allowed and (c, o.shape) not in present
            ]
        else:
            options = [
                s for s in SHAPES if (o.colour, s) in allowed and (o.colour, s) not in present
            ]
        if options:
            out.append((k, options))
    return out


def ensure_preference_pairs(root: str | Path, cfg: ShapesConfig) -> None:
    """Write ``pref_<split>.json`` next to the VQA and caption files where missing. They
    are a pure function of those files and the seed, so a data set generated before
    they existed gains them unchanged otherwise."""
    root = Path(root)
    for split in PAIR_SPLITS:
        out = root / f"pref_{split}.json"
        if out.is_file() or not (root / f"vqa_{split}.json").is_file():
            continue
        n = cfg.n_eval if split != "train" else cfg.n_train
        # At the default sizes: train 4000 VQA + 2000 caption pairs; val and test 400 + 200.
        pairs = build_pairs(root, split, cfg, n_vqa=2 * n, n_caption=n)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.write_text("[\n" + ",\n".join(json.dumps(p) for p in pairs) + "\n]\n")
        os.replace(tmp, out)  # atomic: a concurrent writer writes the same bytes
