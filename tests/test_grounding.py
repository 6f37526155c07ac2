"""Grounding and OCR in the shapes world: box text format, generators, scoring, and a
multitask stage trained and evaluated through the command line."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from test_cli import base_args, vlmtrain
from test_shapes import tree_hash

from vlmtrain.data.boxes import BOX_FORMAT, format_box, iou, normalize_box, parse_box
from vlmtrain.data.shapes import ShapesConfig, ensure_shapes, generate_shapes, shapes_config
from vlmtrain.data.shapes_world import WORDS
from vlmtrain.eval.prompts import EvalSample
from vlmtrain.eval.report import format_table
from vlmtrain.eval.shapes_eval import score

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(n_train=6, n_eval=8, n_captions_train=6, n_chat_train=4, n_text_train=10)
TASKS = ShapesConfig(canvas=128, small=10, large=32, n_grounding_train=12, n_ocr_train=10, **SMALL)
# The small default-option data as generated before grounding/OCR existed (commit 970cfde):
# sample files byte for byte (meta.json aside: it holds the generator's version), and the
# decoded pixels of every image.
SMALL_DEFAULT = ShapesConfig(
    n_train=24, n_eval=12, n_captions_train=20, n_chat_train=12, n_text_train=40
)
SMALL_DEFAULT_FILES = "d378168c56807e60ffc43ca1b6c5affef5acc9fdbcacfe76cbf8c41ef0aadc8e"
SMALL_DEFAULT_PIXELS = "153752baa5487d0e39fa8e10ccf25eccdcd4681be8c9af76e0d9771267c0d92e"


def load(root: Path, name: str) -> list[dict]:
    return json.loads((root / name).read_text())


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("tasks") / "shapes", TASKS)


# ------------------------------------------------------------------------------ boxes
def test_box_text_round_trip_and_iou() -> None:
    assert BOX_FORMAT == "<box>({x1},{y1}),({x2},{y2})</box>"
    box = normalize_box(32, 64, 64, 96, 128, 128)
    assert box == (250, 500, 500, 750)
    text = format_box(box)
    assert text == "<box>(250,500),(500,750)</box>"
    assert parse_box(text) == box and parse_box(f"  {text}\n") == box
    assert parse_box("<box>( 250 , 500 ),( 500 , 750 )</box>") == box
    assert iou(parse_box(text), box) == 1.0
    # Shifted by half the side along x: overlap 1/2, IoU 0.5 / 1.5.
    assert iou(box, normalize_box(48, 64, 80, 96, 128, 128)) == pytest.approx(1 / 3)
    assert iou(box, normalize_box(96, 0, 120, 20, 128, 128)) == 0.0
    assert normalize_box(0, 0, 128, 128, 128, 128) == (0, 0, 999, 999)  # 0-999, never 1000
    reversed_corners = parse_box("<box>(500,750),(250,500)</box>")  # a box, but empty
    assert reversed_corners == (500, 750, 250, 500) and iou(reversed_corners, box) == 0.0
    assert iou(box, (300, 500, 300, 750)) == 0.0  # zero width
    for bad in (
        "",
        "250,500,500,750",
        "<box>(250,500),(500)</box>",
        "<box>(250.5,500),(500,750)</box>",
        "<box>(250,500),(500,1000)</box>",  # out of range
        "<box>(250,500),(500,750)</box> and more",
    ):
        assert parse_box(bad) is None, bad


# ------------------------------------------------------------------------- generators
def test_default_data_unchanged_and_task_generators_deterministic(
    tasks: Path, tmp_path: Path
) -> None:
    off = generate_shapes(tmp_path / "off", SMALL_DEFAULT)
    files = hashlib.sha256()
    for p in sorted(q for q in off.iterdir() if q.suffix in (".json", ".jsonl")):
        if p.name == "meta.json":
            continue
        files.update(p.name.encode() + b"\0" + p.read_bytes())
    pixels = hashlib.sha256()
    for p in sorted(off.glob("images/*/*.png")):
        pixels.update(str(p.relative_to(off)).encode() + b"\0" + Image.open(p).tobytes())
    assert (files.hexdigest(), pixels.hexdigest()) == (SMALL_DEFAULT_FILES, SMALL_DEFAULT_PIXELS)

    assert tree_hash(generate_shapes(tmp_path / "again", TASKS)) == tree_hash(tasks)
    other = generate_shapes(tmp_path / "seed1", ShapesConfig(**{**TASKS.__dict__, "seed": 1}))
    assert (other / "ground_train.json").read_bytes() != (tasks / "ground_train.json").read_bytes()
    # Turning the tasks on leaves every other sample file as it was.
    plain = generate_shapes(
        tmp_path / "plain", ShapesConfig(canvas=128, small=10, large=32, **SMALL)
    )
    for name in ("vqa_train.json", "caption_test_unseen.json", "chat_val.json", "text_train.jsonl"):
        assert (plain / name).read_bytes() == (tasks / name).read_bytes(), name
    assert "n_grounding_train" not in json.loads((plain / "meta.json").read_text())["config"]


def test_grounding_and_ocr_samples_match_their_scenes(tasks: Path) -> None:
    meta = json.loads((tasks / "meta.json").read_text())
    held = [tuple(p) for p in TASKS.holdout]
    for split in ("train", "test", "test_unseen"):
        ground, ocr = load(tasks, f"ground_{split}.json"), load(tasks, f"ocr_{split}.json")
        n = TASKS.n_grounding_train if split == "train" else TASKS.n_eval
        assert sorted(s["type"] for s in ground) == ["grounding"] * n + ["referring"] * n
        for s in ground:
            about = tuple(s["about"][0])
            assert (about in held) == (split == "test_unseen")
            obj = next(o for o in s["objects"] if (o["colour"], o["shape"]) == about)
            box = format_box(normalize_box(*obj["bbox"], TASKS.canvas, TASKS.canvas))
            if s["type"] == "grounding":
                assert s["answer"] == box and parse_box(s["answer"]) is not None
            else:
                assert s["question"] == f"What is at {box}?" and s["answer"] == " ".join(about)
        for s in ocr:
            words = [o["word"] for o in s["objects"]]
            asked = next(o for o in s["objects"] if [o["colour"], o["shape"]] == s["about"][0])
            assert len(set(words)) == len(words) and s["answer"] == asked["word"] in WORDS
            assert all(o["size"] == "large" for o in s["objects"])
    assert (
        meta["chance"]["ocr"] == 1 / len(WORDS) and meta["chance_test_unseen"]["referring"] == 0.5
    )
    assert 0 < meta["chance"]["grounding"] < 0.05  # the right size at a random place
    # The word is drawn: the asked shape's pixels hold the text's ink, not only its fill.
    s = load(tasks, "ocr_test.json")[0]
    x0, y0, x1, y1 = s["objects"][0]["bbox"]
    crop = Image.open(tasks / s["image"]).convert("RGB").crop((x0, y0, x1, y1))
    assert {(0, 0, 0), (255, 255, 255)} & {c for _, c in crop.getcolors(4096)}


def test_ocr_answer_is_not_readable_from_the_question(tmp_path: Path) -> None:
    """The asked word must be independent of the asked pair: guessing each pair's most
    frequent word must do no better than chance (it did 5x better when both cycled)."""
    cfg = ShapesConfig(canvas=128, small=20, large=36, n_ocr_train=800, **SMALL)
    ocr = load(generate_shapes(tmp_path / "ocr", cfg), "ocr_train.json")
    by_pair: dict[tuple, Counter] = {}
    for s in ocr:
        by_pair.setdefault(tuple(s["about"][0]), Counter())[s["answer"]] += 1
    best_guess = sum(c.most_common(1)[0][1] for c in by_pair.values()) / len(ocr)
    assert best_guess < 2.5 / len(WORDS), by_pair
    assert Counter(s["answer"] for s in ocr) == Counter({w: 800 // len(WORDS) for w in WORDS})


def test_data_of_an_older_generator_is_kept_unless_its_tasks_changed(tmp_path: Path) -> None:
    """Version 3 changed only OCR samples: version-2 data without OCR is reused as is; with
    OCR it is refused, naming the directory."""
    plain = generate_shapes(tmp_path / "plain", SMALL_DEFAULT)
    with_ocr = generate_shapes(tmp_path / "ocr", TASKS)
    for root in (plain, with_ocr):
        meta = json.loads((root / "meta.json").read_text())
        (root / "meta.json").write_text(json.dumps({**meta, "version": 2}))
    assert ensure_shapes(plain, SMALL_DEFAULT) == plain
    with pytest.raises(ValueError, match=f"delete {with_ocr}"):
        ensure_shapes(with_ocr, TASKS)


def test_ocr_scenes_of_one_shape_change_only_the_ocr_files(tmp_path: Path, tasks: Path) -> None:
    """`ocr_max_objects=1`: every OCR scene holds the asked shape alone; every other file
    (and OCR's own questions and answers' balance) is as without the option."""
    cfg = ShapesConfig(**{**TASKS.__dict__, "ocr_max_objects": 1})
    single = generate_shapes(tmp_path / "single", cfg)
    for split in ("train", "test", "test_unseen"):
        ocr = load(single, f"ocr_{split}.json")
        assert ocr and all(len(s["objects"]) == 1 for s in ocr)
        assert all(s["objects"][0]["word"] == s["answer"] for s in ocr)
        assert Counter(s["answer"] for s in ocr) == Counter(
            s["answer"] for s in load(tasks, f"ocr_{split}.json")
        )
    assert any(len(s["objects"]) > 1 for s in load(tasks, "ocr_train.json"))
    same = {p.name for p in tasks.glob("*.json*") if not p.name.startswith(("ocr_", "meta"))}
    for name in same:
        assert (single / name).read_bytes() == (tasks / name).read_bytes(), name
    assert json.loads((single / "meta.json").read_text())["config"]["ocr_max_objects"] == 1
    assert "ocr_max_objects" not in json.loads((tasks / "meta.json").read_text())["config"]
    with pytest.raises(ValueError, match="ocr_max_objects must be between"):
        generate_shapes(
            "/nonexistent/never", ShapesConfig(**{**TASKS.__dict__, "ocr_max_objects": 4})
        )


def test_generator_options_are_checked() -> None:
    assert shapes_config(3, {"canvas": 128, "holdout": [["red", "circle"]]}) == ShapesConfig(
        seed=3, canvas=128, holdout=(("red", "circle"),)
    )
    with pytest.raises(ValueError, match="data.shapes.n_grounding: not a shapes generator"):
        shapes_config(0, {"n_grounding": 5})
    with pytest.raises(ValueError, match="large >= 32"):
        generate_shapes("/nonexistent/never", ShapesConfig(n_ocr_train=5))


# ---------------------------------------------------------------------------- scoring
def test_grounding_scored_by_iou_and_ocr_by_exact_match() -> None:
    ref = "<box>(250,500),(500,750)</box>"

    def sample(qtype: str, answer: str) -> EvalSample:
        return EvalSample(f"s{qtype}", qtype, "q", answer, [], [])

    cases = [
        (sample("grounding", ref), ref, True),  # exact
        (sample("grounding", ref), "<box>(310,500),(560,750)</box>", True),  # IoU 0.61
        (sample("grounding", ref), "<box>(400,500),(650,750)</box>", False),  # IoU 0.25
        (sample("grounding", ref), "blue square", False),  # not a box
        (sample("grounding", ref), "<box>(250,500),(500,750)", False),  # cut short
        (sample("grounding", ref), "<box>(500,750),(250,500)</box>", False),  # corners swapped
        (sample("ocr", "cat"), "cat", True),
        (sample("ocr", "cat"), "cat.", False),
        (sample("referring", "blue square"), "blue square", True),
    ]
    res = score([c[0] for c in cases], [c[1] for c in cases], {"grounding": 0.01, "ocr": 0.05})
    grounding = res["per_type"]["grounding"]
    assert grounding == {
        "accuracy": 2 / 6,
        "n": 6,
        "chance": 0.01,
        "metric": "iou>=0.5",
        "unparseable": 2,
    }
    assert res["per_type"]["ocr"] == {"accuracy": 0.5, "n": 2, "chance": 0.05}
    assert res["per_type"]["referring"]["accuracy"] == 1.0
    assert res["overall"] == {"accuracy": 4 / 9, "n": 9}
    table = format_table({"ground_test": res})
    assert "| ground_test | grounding (iou>=0.5; 2 not a box) | 33.3% | 1.0% | 6 |" in table


# ---------------------------------------------------------------- through the CLI
def test_multitask_stage_trains_and_evaluates_through_cli(tmp_path: Path) -> None:
    """The user's path: `stage=multitask data=shapes_multitask`, the data generated from
    `data.shapes` options, a 128 px tower set on the stage, eval with every task."""
    root = tmp_path / "data"
    counts = {**SMALL, "n_grounding_train": 8, "n_ocr_train": 8, "n_eval": 4}
    args = base_args(root, tmp_path / "runs") + [
        "stage=multitask",
        "data=shapes_multitask",
        "data.generate=shapes",  # base_args turns generation off
        *[f"data.shapes.{k}={v}" for k, v in counts.items()],
        "stage.max_steps=2",
        "+stage.model.vision.image_size=128",
        "+stage.model.projector.type=pixel_shuffle_mlp",
        "run_name=mt",
    ]
    vlmtrain(args, cwd=REPO)
    stage = tmp_path / "runs" / "mt" / "multitask"
    manifest = json.loads((stage / "artifact" / "manifest.json").read_text())
    assert manifest["config"]["model"]["vision"]["image_size"] == 128
    mixture = manifest["config"]["stage"]["mixture"]
    assert {"text", "ground", "ocr"} <= {k for k, w in mixture.items() if w > 0}
    results = json.loads((stage / "eval" / "eval.json").read_text())
    for split in ("test", "test_unseen"):
        grounding = results[f"ground_{split}"]["per_type"]["grounding"]
        assert grounding["metric"] == "iou>=0.5" and grounding["n"] == 4
        assert 0 <= grounding["unparseable"] <= 4 and 0 < grounding["chance"] < 0.1
        assert results[f"ocr_{split}"]["per_type"]["ocr"]["chance"] == 1 / len(WORDS)
        assert results[split]["overall"]["n"] == 5 * 4  # VQA still evaluated
    assert "ground_test_unseen | referring" in (stage / "eval" / "eval.md").read_text()
    # Every answer is kept, each scored as the table counts it.
    rows = [json.loads(line) for line in (stage / "eval" / "predictions.jsonl").open()]
    scored = {k: r for k, r in results.items() if "examples" in r}  # not preference pairs
    assert {r["file"] for r in rows} == set(scored) and len(scored) == 8
    for key, res in scored.items():
        mine = [r for r in rows if r["file"] == key]
        assert len(mine) == res["overall"]["n"] and "predictions" not in res
        for qtype, row in res["per_type"].items():
            right = [r["correct"] for r in mine if r["type"] == qtype]
            assert sum(right) / len(right) == row["accuracy"], (key, qtype)
    assert {r["id"] for r in rows if r["file"] == "ground_test"} == {
        s["id"] for s in load(root, "ground_test.json")
    }


def test_tiny_multitask_recipe_chains_its_stages_at_the_multitask_resolution(compose) -> None:
    """recipes/tiny_multitask.yaml: the tiny recipe's stages, then a multitask stage starting
    from SFT's artifact; a 128 px multitask stage (the demo's arm) plans 256 image tokens per
    image while the earlier stages keep 64, and its mixture holds the new tasks."""
    from vlmtrain.plan import plan_recipe

    cfg = compose("recipe=tiny_multitask", "+stages.multitask.model.vision.image_size=128")
    plans = plan_recipe(cfg)
    assert [p["stage"] for p in plans] == ["lm_pretrain", "align", "sft", "multitask"]
    tokens = {p["stage"]: p["image_tokens_per_image"] for p in plans}
    assert tokens["align"] == tokens["sft"] == 64 and tokens["multitask"] == 256
    assert set(cfg.stages.multitask.init.values()) == {"from:sft"}
    mixture = cfg.stages.multitask.mixture
    assert mixture.ground > 0 and mixture.ocr > 0 and mixture.text > 0
