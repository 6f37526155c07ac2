"""The shapes world itself: colours, shapes, sizes, scene layout and rendering.

``vlmtrain.data.shapes`` turns scenes into questions, captions and files.
"""

from __future__ import annotations

import io
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from PIL import Image, ImageDraw, ImageFont

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES: tuple[str, ...] = ("small", "large")
QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "exist", "position")
SPLITS: tuple[str, ...] = ("train", "val", "test", "test_unseen")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 50, 180),
    "orange": (245, 135, 20),
}
BACKGROUND = (235, 235, 235)
MARGIN = 2  # px between boxes and to the canvas edge
DOMINANCE = 2.0  # position asked only when one axis is >= 2x the other -> unambiguous
CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image.",
    "What is in the picture?",
    "What do you see?",
    "Describe the shapes in the image.",
)
REL_PHRASE = {r: f"to the {r} of" if r in ("left", "right") else r for r in RELATIONS}
# 2: the tokenizer splits digits (boxes' coordinates read digit by digit); 3: OCR's asked
# word no longer follows the asked pair. Data without OCR is byte for byte version 2's.
VERSION = 3
COMPATIBLE_WITHOUT_OCR = (2,)
Pair = tuple[str, str]


@dataclass
class ShapesConfig:
    seed: int = 0
    canvas: int = 64  # square RGB canvas, plain background
    small: int = 10  # bounding-box side in px of "small" shapes
    large: int = 18  # ... of "large" shapes
    max_objects: int = 3  # 1..max_objects non-overlapping shapes per image
    n_train: int = 2000  # VQA samples per question type in train
    n_eval: int = 200  # per question type in val, test and test_unseen
    n_captions_train: int = 4000  # caption samples in train (n_eval in the other splits)
    n_chat_train: int = 2000  # multi-turn conversations in train (n_eval // 2 in val/test)
    n_text_train: int = 4000  # text-only lines in train (n_eval in val/test)
    holdout: tuple[tuple[str, str], ...] = (("red", "circle"), ("blue", "triangle"))
    # Grounding and OCR (vlmtrain.data.shapes_tasks), off by default: samples per task type
    # in train (n_eval per type in the other splits). Off, the data set is byte-identical to
    # one generated before these options existed.
    n_grounding_train: int = 0  # "where is the X?" -> box, and "what is at <box>?" -> X
    n_ocr_train: int = 0  # "what word is written on the X?" (words on `large` shapes)
    # Shapes per OCR scene at most; 0: max_objects. 1 asks reading alone, without first
    # finding the named shape among others.
    ocr_max_objects: int = 0


# Options recorded in meta.json only when on, so data generated without them keeps its bytes.
OPTIONAL_FIELDS: tuple[str, ...] = ("n_grounding_train", "n_ocr_train", "ocr_max_objects")
# Short words for OCR, drawn on shapes with PIL's built-in bitmap font (6 x 11 px glyphs).
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "map", "cup", "hat", "box", "pen", "key", "bus",
    "egg", "fox", "jam", "kit", "log", "net", "owl", "pig", "rug", "van",
)  # fmt: skip
OCR_MIN_SIDE = 32  # px: a three-letter word fits inside every shape this large
DARK_TEXT_ON = ("yellow", "orange")  # light fills get black text, the others white


def shapes_config(seed: int, options: Mapping[str, Any] | None = None) -> ShapesConfig:
    """The generator config a data config asks for (``data.seed``, ``data.shapes``)."""
    options = dict(options or {})
    names = {f.name for f in fields(ShapesConfig)} - {"seed"}
    if unknown := sorted(set(options) - names):
        raise ValueError(
            f"data.shapes.{unknown[0]}: not a shapes generator option (known: {sorted(names)})"
        )
    if "holdout" in options:
        options["holdout"] = tuple(tuple(p) for p in options["holdout"])
    return ShapesConfig(seed=seed, **options)


def answers_for(cfg: ShapesConfig) -> dict[str, list[str]]:
    """Answer set per question type (count depends on max_objects)."""
    return {
        "colour": list(COLOURS),
        "shape": list(SHAPES),
        "count": [str(k) for k in range(1, cfg.max_objects + 1)],
        "exist": ["yes", "no"],
        "position": list(RELATIONS),
    }


ANSWERS: dict[str, list[str]] = answers_for(ShapesConfig())


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    x0: int
    y0: int
    side: int
    word: str | None = None  # written on the shape (OCR scenes only)

    @property
    def pair(self) -> Pair:
        return (self.colour, self.shape)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x0 + self.side / 2, self.y0 + self.side / 2)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Obj:
        x0, y0, x1, _ = d["bbox"]
        return cls(d["colour"], d["shape"], d["size"], x0, y0, x1 - x0, d.get("word"))

    def to_json(self) -> dict[str, Any]:
        # bbox is [x0, y0, x1, y1] with x1/y1 exclusive.
        b = [self.x0, self.y0, self.x0 + self.side, self.y0 + self.side]
        out = {"colour": self.colour, "shape": self.shape, "size": self.size, "bbox": b}
        return out if self.word is None else {**out, "word": self.word}


def relation(a: Obj, b: Obj, min_sep: float) -> str | None:
    """Where `a` is relative to `b`, or None when the displacement is ambiguous."""
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    if abs(dx) >= DOMINANCE * abs(dy) and abs(dx) >= min_sep:
        return "left" if dx < 0 else "right"
    if abs(dy) >= DOMINANCE * abs(dx) and abs(dy) >= min_sep:
        return "above" if dy < 0 else "below"  # image y grows downwards
    return None


def render_scene(objects: Sequence[Obj], canvas: int) -> Image.Image:
    img = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        x1, y1 = o.x0 + o.side - 1, o.y0 + o.side - 1  # PIL boxes are inclusive
        fill = RGB[o.colour]
        if o.shape == "circle":
            draw.ellipse([o.x0, o.y0, x1, y1], fill=fill)
        elif o.shape == "square":
            draw.rectangle([o.x0, o.y0, x1, y1], fill=fill)
        else:  # upward isosceles triangle filling the box
            draw.polygon([((o.x0 + x1) / 2, o.y0), (o.x0, y1), (x1, y1)], fill=fill)
        if o.word:
            _draw_word(draw, o)
    return img


def word_box(o: Obj) -> tuple[int, int, int, int]:
    """Where the word is written: (x0, y0, x1, y1), centred on the shape (in a triangle's
    wide lower part), in a bitmap font that ships inside PIL: identical pixels everywhere,
    no font file, no network."""
    assert o.word, o
    _, _, w, h = ImageFont.load_default_imagefont().getbbox(o.word)
    x = o.x0 + (o.side - w) // 2
    y = o.y0 + o.side - h - 2 if o.shape == "triangle" else o.y0 + (o.side - h) // 2
    return x, y, x + w, y + h


def _draw_word(draw: ImageDraw.ImageDraw, o: Obj) -> None:
    ink = (0, 0, 0) if o.colour in DARK_TEXT_ON else (255, 255, 255)
    x, y, _, _ = word_box(o)
    draw.text((x, y), o.word, fill=ink, font=ImageFont.load_default_imagefont())


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _np(o: Obj) -> str:
    return f"a {o.size} {o.colour} {o.shape}"


def caption_of(objects: Sequence[Obj]) -> str:
    """Deterministic caption: objects left to right (ties by y), so exact match is meaningful."""
    objs = sorted(objects, key=lambda o: (o.centre[0], o.centre[1], o.colour, o.shape))
    parts = [_np(o) for o in objs]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return body + "."


def _all_pairs() -> list[Pair]:
    return [(c, s) for c in COLOURS for s in SHAPES]


def _validate(cfg: ShapesConfig) -> None:
    bad = [p for p in cfg.holdout if tuple(p) not in _all_pairs()]
    if bad:
        raise ValueError(f"holdout pairs not in the world: {bad}")
    if not 2 <= cfg.max_objects < len(_all_pairs()) - len(cfg.holdout):
        raise ValueError("need 2 <= max_objects < number of non-held-out colour-shape pairs")
    if min(cfg.small, cfg.large) < 3 or max(cfg.small, cfg.large) + 2 * MARGIN > cfg.canvas:
        raise ValueError("shape sizes must be >= 3 px and fit inside the canvas")
    if min(cfg.n_grounding_train, cfg.n_ocr_train) < 0:
        raise ValueError("n_grounding_train and n_ocr_train must be >= 0")
    if not 0 <= cfg.ocr_max_objects <= cfg.max_objects:
        raise ValueError("ocr_max_objects must be between 0 (max_objects) and max_objects")
    if cfg.n_ocr_train and cfg.large < OCR_MIN_SIDE:
        raise ValueError(f"OCR words are drawn on large shapes: need large >= {OCR_MIN_SIDE} px")


def _place(rng: random.Random, cfg: ShapesConfig, specs: list[tuple[str, str, str]]) -> list[Obj]:
    """Random non-overlapping placement (boxes >= MARGIN px apart and from the edge)."""
    side_of = {"small": cfg.small, "large": cfg.large}
    for _ in range(200):
        placed: list[Obj] = []
        for colour, shape, size in specs:
            side = side_of[size]
            hi = cfg.canvas - MARGIN - side
            for _ in range(50):
                o = Obj(colour, shape, size, rng.randint(MARGIN, hi), rng.randint(MARGIN, hi), side)
                if all(_gap(o, p) >= MARGIN for p in placed):
                    placed.append(o)
                    break
            else:
                break
        else:
            return placed
    raise RuntimeError("could not place the objects; use a larger canvas or smaller shapes")


def _gap(a: Obj, b: Obj) -> int:
    """Free pixels between two boxes along the axis that separates them most (<= 0: overlap)."""
    return max(
        b.x0 - a.x0 - a.side, a.x0 - b.x0 - b.side, b.y0 - a.y0 - a.side, a.y0 - b.y0 - b.side
    )
