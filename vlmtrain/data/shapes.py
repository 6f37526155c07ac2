"""The generated "shapes" world: deterministic synthetic VLM data (VQA, captions, chat, text).

Every split is drawn from its own seeded RNG, so the same config always yields byte-identical
files. Held-out colour-shape pairs never appear in train/val/test (images or text) and are the
subject of every `test_unseen` question, which measures compositional generalisation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

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
VERSION = 1
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

    @property
    def pair(self) -> Pair:
        return (self.colour, self.shape)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x0 + self.side / 2, self.y0 + self.side / 2)

    def to_json(self) -> dict[str, Any]:
        # bbox is [x0, y0, x1, y1] with x1/y1 exclusive.
        b = [self.x0, self.y0, self.x0 + self.side, self.y0 + self.side]
        return {"colour": self.colour, "shape": self.shape, "size": self.size, "bbox": b}


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
    return img


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
    if not 2 <= cfg.max_objects <= 6:
        raise ValueError("max_objects must be in 2..6 (position questions need two objects)")
    if min(cfg.small, cfg.large) < 3 or max(cfg.small, cfg.large) + 2 * MARGIN > cfg.canvas:
        raise ValueError("shape sizes must be >= 3 px and fit inside the canvas")


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
    return max(b.x0 - a.x0 - a.side, a.x0 - b.x0 - b.side, b.y0 - a.y0 - a.side, a.y0 - b.y0 - b.side)


def _scene(
    rng: random.Random,
    cfg: ShapesConfig,
    first: Pair,
    n: int,
    pool: Sequence[Pair],
    ok: Callable[[Pair], bool] = lambda p: True,
) -> list[Obj]:
    """Scene with `first` plus n-1 distinct pairs from `pool` satisfying `ok`."""
    pairs = [first, *rng.sample([p for p in pool if p != first and ok(p)], n - 1)]
    rng.shuffle(pairs)  # random placement order so `first` is not biased in position
    return _place(rng, cfg, [(c, s, rng.choice(SIZES)) for c, s in pairs])


def _np(o: Obj) -> str:
    return f"a {o.size} {o.colour} {o.shape}"


def _question(qtype: str, about: Sequence[Pair]) -> str:
    if qtype == "colour":
        return f"What colour is the {about[0][1]}?"
    if qtype == "shape":
        return f"What shape is the {about[0][0]} object?"
    if qtype == "count":
        return "How many shapes are there?"
    if qtype == "exist":
        article = "an" if about[0][0][0] in "aeiou" else "a"  # "an orange square"
        return f"Is there {article} {about[0][0]} {about[0][1]}?"
    (c1, s1), (c2, s2) = about
    return f"Where is the {c1} {s1} relative to the {c2} {s2}?"


def _feasible(qtype: str, cfg: ShapesConfig, tpool: Sequence[Pair]) -> list[str]:
    """Answers reachable when the asked object comes from `tpool` (held-out pairs in test_unseen)."""
    if qtype == "colour":
        return [c for c in COLOURS if any(p[0] == c for p in tpool)]
    if qtype == "shape":
        return [s for s in SHAPES if any(p[1] == s for p in tpool)]
    if qtype == "exist" and len(tpool) < 2:
        return ["yes"]  # "no" needs a second askable pair absent from the image
    return answers_for(cfg)[qtype]


def _vqa_one(
    rng: random.Random,
    cfg: ShapesConfig,
    qtype: str,
    answer: str,
    tpool: Sequence[Pair],
    opool: Sequence[Pair],
) -> tuple[list[Obj], list[Pair]] | None:
    """Build a scene whose answer to `qtype` is `answer`; returns (objects, asked pairs) or None."""
    n = rng.randint(1, cfg.max_objects)
    if qtype == "colour":
        shape = rng.choice([s for c, s in tpool if c == answer])
        objs = _scene(rng, cfg, (answer, shape), n, opool, lambda p: p[1] != shape)
        return objs, [(answer, shape)]
    if qtype == "shape":
        colour = rng.choice([c for c, s in tpool if s == answer])
        objs = _scene(rng, cfg, (colour, answer), n, opool, lambda p: p[0] != colour)
        return objs, [(colour, answer)]
    first = rng.choice(list(tpool))
    if qtype == "count":
        objs = _scene(rng, cfg, first, int(answer), opool)
        return objs, [o.pair for o in objs]
    if qtype == "exist":
        objs = _scene(rng, cfg, first, n, opool)
        if answer == "yes":
            return objs, [first]
        absent = [p for p in tpool if p not in {o.pair for o in objs}]
        return (objs, [rng.choice(absent)]) if absent else None
    objs = _scene(rng, cfg, first, max(n, 2), opool)  # position
    t = next(i for i, o in enumerate(objs) if o.pair == first)
    ordered = [(t, j) for j in range(len(objs)) if j != t]
    ordered += [(j, t) for i, j in ordered]
    hits = [(i, j) for i, j in ordered if relation(objs[i], objs[j], cfg.small) == answer]
    if not hits:
        return None
    i, j = rng.choice(hits)
    return objs, [objs[i].pair, objs[j].pair]


def _candidates(
    rng: random.Random, cfg: ShapesConfig, objs: list[Obj], allowed: Sequence[Pair]
) -> list[tuple[str, str, str, tuple[Pair, ...]]]:
    """All valid (type, question, answer, asked pairs) about an in-distribution scene."""
    out: list[tuple[str, str, str, tuple[Pair, ...]]] = []

    def add(qtype: str, answer: str, *about: Pair) -> None:
        out.append((qtype, _question(qtype, about), answer, about))

    for s in SHAPES:
        same = [o for o in objs if o.shape == s]
        if len(same) == 1:
            add("colour", same[0].colour, same[0].pair)
    for c in COLOURS:
        same = [o for o in objs if o.colour == c]
        if len(same) == 1:
            add("shape", same[0].shape, same[0].pair)
    add("count", str(len(objs)))
    for o in objs:
        add("exist", "yes", o.pair)
    add("exist", "no", rng.choice([p for p in allowed if p not in {o.pair for o in objs}]))
    for a in objs:
        for b in objs:
            rel = relation(a, b, cfg.small) if a is not b else None
            if rel:
                add("position", rel, a.pair, b.pair)
    return out


def _text_line(rng: random.Random, cfg: ShapesConfig, allowed: Sequence[Pair]) -> str:
    """True statements (or one QA pair) about a random, unrendered in-distribution scene."""
    objs = _scene(rng, cfg, rng.choice(allowed), rng.randint(1, cfg.max_objects), allowed)
    qa = _candidates(rng, cfg, objs, allowed)
    if rng.random() < 0.5:  # same wording as the VQA data, so the LM sees the task format
        _, q, a, _ = rng.choice(qa)
        return f"question: {q.lower()} answer: {a}"
    n, by_pair = len(objs), {o.pair: o for o in objs}
    facts = [caption_of(objs), "there is 1 shape." if n == 1 else f"there are {n} shapes."]
    for qtype, _, a, about in qa:
        if qtype == "colour":
            facts.append(f"the {about[0][1]} is {a}.")
        elif qtype == "shape":
            facts.append(f"the {about[0][0]} object is a {a}.")
        elif qtype == "position":
            a_np, b_np = _np(by_pair[about[0]]), _np(by_pair[about[1]])
            facts.append(f"there is {a_np} {REL_PHRASE[a]} {b_np}.")
    return " ".join(rng.sample(facts, min(len(facts), rng.randint(1, 3))))


def _convo(turns: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    conv: list[dict[str, str]] = []
    for k, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<image>\n" + q) if k == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return conv


def _build_split(cfg: ShapesConfig, split: str) -> tuple[dict[str, list[dict[str, Any]]], list]:
    """Samples per output file and render jobs (relative image path, objects) for one split."""
    allowed = [p for p in _all_pairs() if p not in {tuple(h) for h in cfg.holdout}]
    unseen = split == "test_unseen"
    tpool = [tuple(h) for h in cfg.holdout] if unseen else allowed
    opool = _all_pairs() if unseen else allowed
    train = split == "train"

    def rng_for(kind: str) -> random.Random:
        # One stream per (split, kind): changing n_chat does not reshuffle the VQA data.
        return random.Random(f"{cfg.seed}-{split}-{kind}")

    files: dict[str, list[dict[str, Any]]] = {}
    jobs: list[tuple[str, list[Obj]]] = []

    def base(kind: str, k: int, objs: list[Obj]) -> dict[str, Any]:
        sid = f"{kind}-{split}-{k:06d}"
        jobs.append((f"images/{split}/{sid}.png", objs))
        return {"id": sid, "image": f"images/{split}/{sid}.png"}

    rng = rng_for("vqa")
    raw: list[tuple[str, str, list[Obj], list[Pair]]] = []
    for qtype in QUESTION_TYPES:
        answers = _feasible(qtype, cfg, tpool)
        for k in range(cfg.n_train if train else cfg.n_eval):
            answer = answers[k % len(answers)]  # cycling keeps answers balanced
            built = None
            while built is None:
                built = _vqa_one(rng, cfg, qtype, answer, tpool, opool)
            raw.append((qtype, answer, *built))
    rng.shuffle(raw)
    vqa = []
    for k, (qtype, answer, objs, about) in enumerate(raw):
        q = _question(qtype, about)
        s = base("vqa", k, objs)
        s.update(conversations=_convo([(q, answer)]), type=qtype, question=q, answer=answer)
        s.update(about=[list(p) for p in about], objects=[o.to_json() for o in objs])
        vqa.append(s)
    files[f"vqa_{split}.json"] = vqa

    rng = rng_for("caption")
    caps = []
    for k in range(cfg.n_captions_train if train else cfg.n_eval):
        objs = _scene(rng, cfg, rng.choice(tpool), rng.randint(1, cfg.max_objects), opool)
        prompt, cap = rng.choice(CAPTION_PROMPTS), caption_of(objs)
        s = base("cap", k, objs)
        s.update(conversations=_convo([(prompt, cap)]), type="caption", question=prompt)
        s.update(answer=cap, objects=[o.to_json() for o in objs])
        caps.append(s)
    files[f"caption_{split}.json"] = caps
    if unseen:
        return files, jobs

    rng = rng_for("chat")
    chats = []
    for k in range(cfg.n_chat_train if train else cfg.n_eval // 2):
        objs = _scene(rng, cfg, rng.choice(allowed), rng.randint(1, cfg.max_objects), allowed)
        cands = _candidates(rng, cfg, objs, allowed)
        prompt = rng.choice(CAPTION_PROMPTS)
        cands.append(("caption", prompt, caption_of(objs), ()))
        rng.shuffle(cands)
        n_turns, chosen = rng.randint(2, 4), []
        for mixed in (True, False):  # first one question per type, then fill up
            for c in cands:
                if len(chosen) < n_turns and c not in chosen:
                    if not mixed or c[0] not in {x[0] for x in chosen}:
                        chosen.append(c)
        s = base("chat", k, objs)
        s.update(conversations=_convo([(c[1], c[2]) for c in chosen]))
        s.update(types=[c[0] for c in chosen], answers=[c[2] for c in chosen])
        s.update(objects=[o.to_json() for o in objs])
        chats.append(s)
    files[f"chat_{split}.json"] = chats

    rng = rng_for("text")
    n_text = cfg.n_text_train if train else cfg.n_eval
    texts = [
        {"id": f"text-{split}-{k:06d}", "text": _text_line(rng, cfg, allowed)}
        for k in range(n_text)
    ]
    files[f"text_{split}.jsonl"] = texts
    return files, jobs


def _train_texts(files: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Everything the model reads or writes in train, without the <image> placeholder."""
    out: list[str] = []
    for samples in files.values():
        for s in samples:
            if "text" in s:
                out.append(s["text"])
            for turn in s.get("conversations", []):
                out.append(turn["value"].replace("<image>\n", ""))
    return out


def _config_json(cfg: ShapesConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg)))  # tuples -> lists, as stored in meta.json


def generate_shapes(out_dir: str | Path, cfg: ShapesConfig = ShapesConfig()) -> Path:
    """Generate the dataset into `out_dir` atomically (temp sibling dir, then rename)."""
    from vlmtrain.data.tokenizer import train_tokenizer  # keeps `import shapes` light

    _validate(cfg)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / "meta.json").exists():
        raise ValueError(
            f"{out} is not empty and holds no shapes dataset; refusing to overwrite it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        counts: dict[str, int] = {}
        all_jobs: list[tuple[str, list[Obj]]] = []
        for split in SPLITS:
            (tmp / "images" / split).mkdir(parents=True)
            files, jobs = _build_split(cfg, split)
            all_jobs += jobs
            for name, samples in files.items():
                with open(tmp / name, "w") as f:
                    if name.endswith(".jsonl"):
                        f.writelines(json.dumps(s) + "\n" for s in samples)
                    else:
                        json.dump(samples, f, indent=1)
                counts[name] = len(samples)
            if split == "train":
                train_tokenizer(_train_texts(files), tmp / "tokenizer")

        def render(job: tuple[str, list[Obj]]) -> None:
            render_scene(job[1], cfg.canvas).save(tmp / job[0], format="PNG")

        # Threads: PNG zlib and file I/O release the GIL; no fork/spawn pitfalls.
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            list(pool.map(render, all_jobs, chunksize=256))
        answers = answers_for(cfg)
        meta = {
            "generator": "shapes",
            "version": VERSION,
            "config": _config_json(cfg),
            "counts": counts,
            "chance": {t: 1 / len(answers[t]) for t in QUESTION_TYPES},
            "answers": answers,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks completeness
        if out.exists():  # replace a previous dataset (or an empty dir)
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_meta(out: Path, cfg: ShapesConfig) -> bool:
    """True if `out` holds a dataset for `cfg`; raises if it holds one for another config."""
    meta_path = out / "meta.json"
    if not meta_path.exists():
        return False
    meta = json.loads(meta_path.read_text())
    if meta.get("version") == VERSION and meta.get("config") == _config_json(cfg):
        return True
    old = meta.get("config", {})
    diff = sorted(
        k for k in set(old) | set(_config_json(cfg)) if old.get(k) != _config_json(cfg).get(k)
    )
    raise ValueError(
        f"{out} holds a shapes dataset (version {meta.get('version')}) generated with a different "
        f"config (differs in: {', '.join(diff) or 'version'}); delete {out} to regenerate it, "
        f"or point the data root at another directory"
    )


def ensure_shapes(out_dir: str | Path, cfg: ShapesConfig = ShapesConfig()) -> Path:
    """Generate unless `out_dir` already holds the dataset for exactly this config."""
    out = Path(out_dir)
    if _check_meta(out, cfg):
        return out
    try:
        return generate_shapes(out, cfg)
    except OSError:
        # A concurrent process (e.g. another rank) may have published it first.
        if _check_meta(out, cfg):
            return out
        raise


def main(argv: list[str] | None = None) -> int:
    d = ShapesConfig()
    p = argparse.ArgumentParser(description="Generate the synthetic shapes VLM dataset.")
    p.add_argument("--out", required=True, help="output directory")
    for name in (
        "seed",
        "canvas",
        "small",
        "large",
        "max_objects",
        "n_train",
        "n_eval",
        "n_captions_train",
        "n_chat_train",
        "n_text_train",
    ):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument(
        "--holdout",
        default=",".join(f"{c}:{s}" for c, s in d.holdout),
        help="held-out colour:shape pairs, comma separated (empty for none)",
    )
    p.add_argument("--force", action="store_true", help="regenerate even if the dataset exists")
    args = p.parse_args(argv)
    holdout = tuple(tuple(x.split(":", 1)) for x in args.holdout.split(",") if x)
    cfg = ShapesConfig(
        holdout=holdout,  # type: ignore[arg-type]
        **{k: v for k, v in vars(args).items() if k not in ("out", "holdout", "force")},
    )
    t0 = time.perf_counter()
    out = (generate_shapes if args.force else ensure_shapes)(args.out, cfg)
    meta = json.loads((out / "meta.json").read_text())
    print(f"shapes dataset at {out} ({time.perf_counter() - t0:.1f} s)")
    for name, n in meta["counts"].items():
        print(f"  {name:24s} {n:7d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
