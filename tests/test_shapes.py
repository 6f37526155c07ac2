"""The generated shapes world: determinism, balance, hold-out hygiene and rendering fidelity."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from transformers import AutoTokenizer

from vlmtrain.data import shapes as S
from vlmtrain.data.shapes import ShapesConfig, ensure_shapes, generate_shapes

CFG = ShapesConfig(n_train=24, n_eval=12, n_captions_train=20, n_chat_train=12, n_text_train=40)
HELD = {tuple(p) for p in CFG.holdout}
IN_DIST = ("train", "val", "test")


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("a") / "shapes", CFG)


def load(root: Path, name: str) -> list[dict[str, Any]]:
    text = (root / name).read_text()
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines()]
    return json.loads(text)


def image_files(root: Path) -> list[str]:
    return [
        n for n in json.loads((root / "meta.json").read_text())["counts"] if n.endswith(".json")
    ]


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def pairs(sample: dict[str, Any]) -> set[tuple[str, str]]:
    return {(o["colour"], o["shape"]) for o in sample["objects"]}


def test_layout_and_meta(ds: Path) -> None:
    meta = json.loads((ds / "meta.json").read_text())
    assert meta["generator"] == "shapes" and meta["version"] == 3
    assert meta["config"]["holdout"] == [list(p) for p in CFG.holdout]
    expected = {f"{k}_{s}.json" for k in ("vqa", "caption") for s in S.SPLITS}
    expected |= {f"chat_{s}.json" for s in IN_DIST} | {f"text_{s}.jsonl" for s in IN_DIST}
    assert set(meta["counts"]) == expected
    for name, n in meta["counts"].items():
        assert len(load(ds, name)) == n
    assert meta["counts"]["vqa_train.json"] == 5 * CFG.n_train
    assert meta["counts"]["chat_val.json"] == CFG.n_eval // 2
    assert meta["chance"] == pytest.approx(
        {"colour": 1 / 6, "shape": 1 / 3, "count": 1 / 3, "exist": 1 / 2, "position": 1 / 4}
    )
    assert meta["chance_test_unseen"]["colour"] == meta["chance_test_unseen"]["exist"] == 1 / 2
    tok = AutoTokenizer.from_pretrained(ds / "tokenizer")  # trained on the train text
    question = load(ds, "vqa_train.json")[0]["question"]
    assert tok.decode(tok.encode(question)) == question
    assert len(tok.encode(question)) < len(question) // 2
    assert not [p for p in ds.parent.iterdir() if p.name != ds.name]  # no temp dirs left


def test_deterministic_by_seed(ds: Path, tmp_path: Path) -> None:
    again = generate_shapes(tmp_path / "again", CFG)
    assert tree_hash(again) == tree_hash(ds)
    other = generate_shapes(tmp_path / "other", ShapesConfig(**{**CFG.__dict__, "seed": 1}))
    assert (other / "vqa_train.json").read_bytes() != (ds / "vqa_train.json").read_bytes()
    assert tree_hash(other) != tree_hash(ds)


def test_vqa_balanced_per_split(ds: Path) -> None:
    for split in S.SPLITS:
        by_type: dict[str, Counter[str]] = {t: Counter() for t in S.QUESTION_TYPES}
        for s in load(ds, f"vqa_{split}.json"):
            by_type[s["type"]][s["answer"]] += 1
        for qtype, counts in by_type.items():
            answers = S.ANSWERS[qtype]
            if split == "test_unseen" and qtype in ("colour", "shape"):
                k = 0 if qtype == "colour" else 1  # only held-out pairs can be asked about
                answers = sorted({p[k] for p in HELD}, key=answers.index)
            assert set(counts) == set(answers), (split, qtype, counts)
            assert max(counts.values()) - min(counts.values()) <= 1, (split, qtype, counts)
            assert sum(counts.values()) == (CFG.n_train if split == "train" else CFG.n_eval)


def test_answers_match_scene(ds: Path) -> None:
    for split in S.SPLITS:
        for s in load(ds, f"vqa_{split}.json"):
            objs, about = s["objects"], [tuple(p) for p in s["about"]]
            assert s["conversations"][1]["value"] == s["answer"]
            if s["type"] == "colour":
                same = [o for o in objs if o["shape"] == about[0][1]]
                assert len(same) == 1 and same[0]["colour"] == s["answer"]
            elif s["type"] == "shape":
                same = [o for o in objs if o["colour"] == about[0][0]]
                assert len(same) == 1 and same[0]["shape"] == s["answer"]
            elif s["type"] == "count":
                assert s["answer"] == str(len(objs))
            elif s["type"] == "exist":
                assert s["answer"] == ("yes" if about[0] in pairs(s) else "no")
        for s in load(ds, f"caption_{split}.json"):
            assert s["answer"] == s["conversations"][1]["value"]
            assert s["answer"].count(" a ") + 1 == len(s["objects"])


def test_holdout_never_in_distribution(ds: Path) -> None:
    leak = re.compile("|".join(f"{c} {s}" for c, s in HELD))
    for split in IN_DIST:
        for name in (f"vqa_{split}.json", f"caption_{split}.json", f"chat_{split}.json"):
            for s in load(ds, name):
                assert not pairs(s) & HELD, (name, s["id"])
                assert not {tuple(p) for p in s.get("about", [])} & HELD
                assert not any(leak.search(t["value"]) for t in s["conversations"])
        for s in load(ds, f"text_{split}.jsonl"):
            assert not leak.search(s["text"]), s["text"]
    # Also the plain "What colour is the circle? -> red" form of a held-out pair.
    for s in load(ds, "vqa_train.json"):
        assert (s["answer"], s["question"].split()[-1].rstrip("?")) not in HELD


def test_test_unseen_is_about_holdout(ds: Path) -> None:
    for s in load(ds, "vqa_test_unseen.json") + load(ds, "caption_test_unseen.json"):
        assert pairs(s) & HELD, s["id"]
        assert s["type"] == "caption" or {tuple(p) for p in s["about"]} & HELD, s["id"]
    assert Counter(s["type"] for s in load(ds, "vqa_test_unseen.json"))["position"] == CFG.n_eval


def test_images_and_conversations(ds: Path) -> None:
    for name in image_files(ds):
        for s in load(ds, name):
            with Image.open(ds / s["image"]) as img:
                assert img.format == "PNG" and img.mode == "RGB"
                assert img.size == (CFG.canvas, CFG.canvas)
            conv = s["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert conv[0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in conv) == 1
            assert len(pairs(s)) == len(s["objects"]) <= CFG.max_objects  # distinct pairs
    with Image.open(ds / load(ds, "vqa_test.json")[0]["image"]) as img:
        img.verify()  # chunk CRCs of the hand-written PNG encoder
    for s in load(ds, "chat_train.json"):
        assert 2 <= len(s["types"]) == len(s["answers"]) == len(s["conversations"]) // 2 <= 4


def test_objects_are_placed_and_rendered(ds: Path) -> None:
    for s in load(ds, "vqa_val.json") + load(ds, "caption_test_unseen.json"):
        boxes = [o["bbox"] for o in s["objects"]]
        img = Image.open(ds / s["image"]).load()
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            assert 2 <= x0 and 2 <= y0 and x1 <= CFG.canvas - 2 and y1 <= CFG.canvas - 2
            side = CFG.large if s["objects"][i]["size"] == "large" else CFG.small
            assert x1 - x0 == y1 - y0 == side
            for bx0, by0, bx1, by1 in boxes[i + 1 :]:  # >= 2 px apart on some axis
                assert max(bx0 - x1, x0 - bx1, by0 - y1, y0 - by1) >= 2
            rgb = S.RGB[s["objects"][i]["colour"]]
            assert img[(x0 + x1) // 2, y1 - 1] == rgb  # every shape covers its bottom centre


def centroid(img: Image.Image, obj: dict[str, Any]) -> tuple[float, float]:
    x0, y0, x1, y1 = obj["bbox"]
    px, rgb = img.load(), S.RGB[obj["colour"]]
    pts = [(x, y) for x in range(x0, x1) for y in range(y0, y1) if px[x, y] == rgb]
    assert pts
    return sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)


def test_position_answers_match_pixels(ds: Path) -> None:
    n = 0
    for split in S.SPLITS:
        for s in load(ds, f"vqa_{split}.json"):
            if s["type"] != "position":
                continue
            img = Image.open(ds / s["image"]).convert("RGB")
            by_pair = {(o["colour"], o["shape"]): o for o in s["objects"]}
            (ax, ay), (bx, by) = (centroid(img, by_pair[tuple(p)]) for p in s["about"])
            dx, dy = ax - bx, ay - by
            if abs(dx) > abs(dy):
                assert s["answer"] == ("left" if dx < 0 else "right"), s["id"]
            else:
                assert s["answer"] == ("above" if dy < 0 else "below"), s["id"]
            n += 1
    assert n == CFG.n_train + 3 * CFG.n_eval


def test_ensure_reuses_and_rejects_other_config(ds: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: Any) -> None:
        raise AssertionError("must not regenerate")

    monkeypatch.setattr(S, "_write_all", boom)
    assert ensure_shapes(ds, CFG) == ds
    with pytest.raises(ValueError, match=r"different config.*seed.*delete"):
        ensure_shapes(ds, ShapesConfig(**{**CFG.__dict__, "seed": 7}))
    assert (
        S.main(
            [
                "--out",
                str(ds),
                "--n-train",
                "24",
                "--n-eval",
                "12",
                "--n-captions-train",
                "20",
                "--n-chat-train",
                "12",
                "--n-text-train",
                "40",
            ]
        )
        == 0
    )


def test_refuses_foreign_dir_and_configurable_canvas(tmp_path: Path) -> None:
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not overwriting"):
        generate_shapes(tmp_path / "foreign", CFG)
    assert (tmp_path / "foreign" / "notes.txt").exists()
    big = ShapesConfig(
        canvas=128,
        small=20,
        large=36,
        n_train=4,
        n_eval=4,
        n_captions_train=2,
        n_chat_train=2,
        n_text_train=2,
    )
    out = ensure_shapes(tmp_path / "big", big)
    sample = load(out, "vqa_test.json")[0]
    assert Image.open(out / sample["image"]).size == (128, 128)
