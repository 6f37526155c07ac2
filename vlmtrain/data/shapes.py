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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from vlmtrain.data.shapes_tasks import task_chance, task_files
from vlmtrain.data.shapes_world import (  # noqa: F401  (re-exported: the public API)
    ANSWERS,
    BACKGROUND,
    CAPTION_PROMPTS,
    COLOURS,
    COMPATIBLE_WITHOUT_OCR,
    DOMINANCE,
    MARGIN,
    OPTIONAL_FIELDS,
    QUESTION_TYPES,
    REL_PHRASE,
    RELATIONS,
    RGB,
    SHAPES,
    SIZES,
    SPLITS,
    VERSION,
    WORDS,
    Obj,
    Pair,
    ShapesConfig,
    _all_pairs,
    _gap,
    _np,
    _place,
    _validate,
    answers_for,
    caption_of,
    png_bytes,
    relation,
    render_scene,
    shapes_config,
)


def _scene(
    rng: random.Random, cfg: ShapesConfig, first: Pair, n: int, pool: list[Pair]
) -> list[Obj]:
    """Scene with `first` plus n-1 other distinct pairs drawn from `pool`."""
    pairs = [first, *rng.sample([p for p in pool if p != first], n - 1)]
    rng.shuffle(pairs)  # random placement order so `first` is not biased in position
    return _place(rng, cfg, [(c, s, rng.choice(SIZES)) for c, s in pairs])


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
    tpool: list[Pair],
    opool: list[Pair],
) -> tuple[list[Obj], list[Pair]] | None:
    """Build a scene whose answer to `qtype` is `answer`; returns (objects, asked pairs) or None."""
    n = rng.randint(1, cfg.max_objects)
    if qtype == "colour":
        shape = rng.choice([s for c, s in tpool if c == answer])
        objs = _scene(rng, cfg, (answer, shape), n, [p for p in opool if p[1] != shape])
        return objs, [(answer, shape)]
    if qtype == "shape":
        colour = rng.choice([c for c, s in tpool if s == answer])
        objs = _scene(rng, cfg, (colour, answer), n, [p for p in opool if p[0] != colour])
        return objs, [(colour, answer)]
    first = rng.choice(tpool)
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


def _text_line(rng: random.Random, cfg: ShapesConfig, allowed: list[Pair]) -> str:
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


def _build_split(cfg: ShapesConfig, split: str) -> tuple[dict[str, list[dict]], list]:
    """Samples per output file, and render jobs (image path, objects), for one split."""
    held = [tuple(h) for h in cfg.holdout]  # a list, not a set: iteration order must be fixed
    allowed = [p for p in _all_pairs() if p not in held]
    unseen, train = split == "test_unseen", split == "train"
    tpool = held if unseen else allowed  # pairs questions are about
    opool = _all_pairs() if unseen else allowed  # pairs for the other objects
    files: dict[str, list[dict]] = {}
    jobs: list[tuple[str, list[Obj]]] = []

    def rng_for(kind: str) -> random.Random:
        # One stream per (split, kind): changing n_chat_train leaves the VQA data unchanged.
        return random.Random(f"{cfg.seed}-{split}-{kind}")

    def sample(kind: str, k: int, objs: list[Obj], turns: list[tuple[str, str]], **extra: Any):
        sid = f"{kind}-{split}-{k:06d}"
        jobs.append((f"images/{split}/{sid}.png", objs))
        conv = []
        for i, (q, a) in enumerate(turns):  # <image> exactly once, in the first human turn
            conv += [
                {"from": "human", "value": "<image>\n" * (i == 0) + q},
                {"from": "gpt", "value": a},
            ]
        objects = [o.to_json() for o in objs]
        return {"id": sid, "image": jobs[-1][0], "conversations": conv, **extra, "objects": objects}

    rng, raw = rng_for("vqa"), []
    for qtype in QUESTION_TYPES:
        answers = _feasible(qtype, cfg, tpool)
        for k in range(cfg.n_train if train else cfg.n_eval):
            answer, built = answers[k % len(answers)], None  # cycling keeps answers balanced
            while built is None:  # rejection sampling: retry scenes that cannot give `answer`
                built = _vqa_one(rng, cfg, qtype, answer, tpool, opool)
            raw.append((qtype, _question(qtype, built[1]), answer, *built))
    rng.shuffle(raw)
    files[f"vqa_{split}.json"] = [
        sample("vqa", k, objs, [(q, a)], type=t, question=q, answer=a, about=[list(p) for p in ab])
        for k, (t, q, a, objs, ab) in enumerate(raw)
    ]

    rng, caps = rng_for("caption"), []
    for k in range(cfg.n_captions_train if train else cfg.n_eval):
        objs = _scene(rng, cfg, rng.choice(tpool), rng.randint(1, cfg.max_objects), opool)
        q, a = rng.choice(CAPTION_PROMPTS), caption_of(objs)
        caps.append(sample("cap", k, objs, [(q, a)], type="caption", question=q, answer=a))
    files[f"caption_{split}.json"] = caps
    files.update(task_files(cfg, split, rng_for, sample, tpool, opool))  # grounding, OCR
    if unseen:
        return files, jobs

    rng, chats = rng_for("chat"), []
    for k in range(cfg.n_chat_train if train else cfg.n_eval // 2):
        objs = _scene(rng, cfg, rng.choice(allowed), rng.randint(1, cfg.max_objects), allowed)
        cands = _candidates(rng, cfg, objs, allowed)
        cands.append(("caption", rng.choice(CAPTION_PROMPTS), caption_of(objs), ()))
        rng.shuffle(cands)
        n_turns, chosen = rng.randint(2, 4), []
        for mixed in (True, False):  # first at most one question per type, then fill up
            for c in cands:
                new_type = c[0] not in {x[0] for x in chosen}
                if len(chosen) < n_turns and c not in chosen and (new_type or not mixed):
                    chosen.append(c)
        turns = [(c[1], c[2]) for c in chosen]
        types, answers = [c[0] for c in chosen], [c[2] for c in chosen]
        chats.append(sample("chat", k, objs, turns, types=types, answers=answers))
    files[f"chat_{split}.json"] = chats

    rng = rng_for("text")
    files[f"text_{split}.jsonl"] = [
        {"id": f"text-{split}-{k:06d}", "text": _text_line(rng, cfg, allowed)}
        for k in range(cfg.n_text_train if train else cfg.n_eval)
    ]
    return files, jobs


def _train_texts(files: dict[str, list[dict]]) -> list[str]:
    """Everything the model reads or writes in train, without the <image> placeholder."""
    out: list[str] = []
    for s in (s for samples in files.values() for s in samples):
        turns = [t["value"].replace("<image>\n", "") for t in s.get("conversations", [])]
        out += [s["text"]] if "text" in s else turns
    return out


def _config_json(cfg: ShapesConfig) -> dict[str, Any]:
    """The config as stored in meta.json (plain lists, so OmegaConf containers compare too);
    options that are off are left out, so a data set without them keeps its exact bytes."""
    out = {**asdict(cfg), "holdout": [[str(c), str(s)] for c, s in cfg.holdout]}
    return {k: v for k, v in out.items() if k not in OPTIONAL_FIELDS or v}


def _write_all(tmp: Path, cfg: ShapesConfig) -> None:
    from vlmtrain.data.tokenizer import train_tokenizer  # keeps `import shapes` light

    counts, jobs, task_chances = {}, [], {}
    held = [tuple(h) for h in cfg.holdout]
    for split in SPLITS if cfg.holdout else SPLITS[:3]:  # no hold-out: no test_unseen
        (tmp / "images" / split).mkdir(parents=True)
        files, split_jobs = _build_split(cfg, split)
        tpool = held if split == "test_unseen" else [p for p in _all_pairs() if p not in held]
        task_chances[split] = task_chance(cfg, files, split, tpool)
        jobs += split_jobs
        for name, samples in files.items():
            lines = [json.dumps(s) for s in samples]  # one sample per line: C encoder, greppable
            body = "\n".join(lines) if name.endswith("l") else "[\n" + ",\n".join(lines) + "\n]"
            (tmp / name).write_text(body + "\n")
            counts[name] = len(samples)
        if split == "train":
            train_tokenizer(_train_texts(files), tmp / "tokenizer")

    def render(chunk: list[tuple[str, list[Obj]]]) -> None:
        for path, objs in chunk:
            (tmp / path).write_bytes(png_bytes(render_scene(objs, cfg.canvas)))

    # Threads: PNG zlib and file I/O release the GIL, and there are no fork/spawn pitfalls.
    n = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n) as pool:
        list(pool.map(render, [jobs[i::n] for i in range(n)]))
    answers = answers_for(cfg)
    meta = {
        "generator": "shapes",
        "version": VERSION,
        "config": _config_json(cfg),
        "counts": counts,
        "chance": {t: 1 / len(answers[t]) for t in QUESTION_TYPES} | task_chances["test"],
        "answers": answers,
    }
    if cfg.n_ocr_train:
        meta["words"] = list(WORDS)
    if cfg.holdout:  # test_unseen asks only about held-out pairs, so fewer answers are possible
        meta["chance_test_unseen"] = {
            t: 1 / len(_feasible(t, cfg, held)) for t in QUESTION_TYPES
        } | task_chances["test_unseen"]
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")  # last: marks completion


def _generate(out: Path, cfg: ShapesConfig, replace: bool) -> Path:
    _validate(cfg)
    if out.exists() and any(out.iterdir()) and not (out / "meta.json").exists():
        raise ValueError(f"{out} is not empty and holds no shapes dataset; not overwriting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp, old = out.parent / f".{out.name}.tmp-{tag}", out.parent / f".{out.name}.old-{tag}"
    try:
        _write_all(tmp, cfg)
        if out.exists() and (replace or not (out / "meta.json").exists()):
            os.rename(out, old)  # rename cannot replace a non-empty directory
        try:
            os.rename(tmp, out)
        except OSError:
            if replace or not (out / "meta.json").exists():
                raise  # else a concurrent ensure_shapes published first; caller re-checks
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


def generate_shapes(out_dir: str | Path, cfg: ShapesConfig = ShapesConfig()) -> Path:
    """(Re)generate the dataset in `out_dir`, atomically: temp sibling dir, then rename."""
    from vlmtrain.data.shapes_preference import ensure_preference_pairs

    out = _generate(Path(out_dir), cfg, replace=True)
    ensure_preference_pairs(out, cfg)
    return out


def _matches(out: Path, cfg: ShapesConfig) -> bool:
    """True if `out` holds the dataset for `cfg`; raises if it holds one for another config."""
    if not (out / "meta.json").exists():
        return False
    meta, want = json.loads((out / "meta.json").read_text()), _config_json(cfg)
    versions = (VERSION,) if cfg.n_ocr_train else (VERSION, *COMPATIBLE_WITHOUT_OCR)
    if meta.get("version") in versions and meta.get("config") == want:
        return True
    have = meta.get("config", {})
    diff = sorted(k for k in {*want, *have} if have.get(k) != want.get(k)) or ["version"]
    raise ValueError(
        f"{out} holds a shapes dataset generated with a different config (differs in: "
        f"{', '.join(diff)}); delete {out} to regenerate it, or use another data root"
    )


def ensure_shapes(out_dir: str | Path, cfg: ShapesConfig = ShapesConfig()) -> Path:
    """Generate unless `out_dir` already holds the dataset for exactly this config."""
    from vlmtrain.data.shapes_preference import ensure_preference_pairs

    out = Path(out_dir)
    if not _matches(out, cfg):
        _generate(out, cfg, replace=False)
        _matches(out, cfg)  # raises if a concurrent writer used another config
    ensure_preference_pairs(out, cfg)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Generate the synthetic shapes VLM dataset.")
    p.add_argument("--out", required=True, help="output directory")
    for f in fields(ShapesConfig):
        if f.name != "holdout":
            p.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default)
    held = ",".join(f"{c}:{s}" for c, s in ShapesConfig().holdout)
    p.add_argument("--holdout", default=held, help="colour:shape pairs, comma separated")
    p.add_argument("--force", action="store_true", help="regenerate even if it already exists")
    args = vars(p.parse_args(argv))
    out_dir, force = args.pop("out"), args.pop("force")
    args["holdout"] = tuple(tuple(x.split(":", 1)) for x in args["holdout"].split(",") if x)
    t0 = time.perf_counter()
    out = (generate_shapes if force else ensure_shapes)(out_dir, ShapesConfig(**args))
    print(f"shapes dataset at {out} ({time.perf_counter() - t0:.1f} s)")
    for name, n in json.loads((out / "meta.json").read_text())["counts"].items():
        print(f"  {name:26s} {n:6d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
