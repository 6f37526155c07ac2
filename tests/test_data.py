"""Data pipeline: chat rendering and loss masks, image handling, input checks, collation,
mixtures, and the loss normalization that makes gradient accumulation exact."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import image_processor_for
from PIL import Image

from vlmtrain.data.chat import IGNORE_INDEX, check_chat_template
from vlmtrain.data.encode import SampleEncoder, collate
from vlmtrain.data.mixture import mixture_indices
from vlmtrain.data.module import StageDataModule
from vlmtrain.data.samples import DataError, load_samples, normalize
from vlmtrain.model.lm import load_tokenizer
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.objectives.next_token import (
    REDUCTION_EXPONENTS,
    loss_normalizer,
    micro_batches,
    sample_loss_sums,
    token_loss_sum,
)

TOKENS_PER_IMAGE = 64  # (64 px / 8 px patches)^2 for the tiny model
IMG = "<image>" * TOKENS_PER_IMAGE


# ------------------------------------------------------------------------- helpers
@pytest.fixture()
def cfg(compose):
    return compose()


@pytest.fixture()
def tokenizer(cfg, tokenizer_dir):
    assert Path(cfg.model.tokenizer) == Path(tokenizer_dir)
    return load_tokenizer(cfg.model)


def make_encoder(cfg, tokenizer, image_root, max_length=256) -> SampleEncoder:
    processor, _ = image_processor_for(cfg, image_root)
    return SampleEncoder(tokenizer, processor, cfg.model.image_token, max_length)


def write_png(path: Path, colour=(200, 30, 30), size=(64, 64)) -> str:
    Image.new("RGB", size, colour).save(path, format="PNG")
    return path.name


def conv_sample(sid, turns, images=(), source="test.json"):
    """A normalized conversation sample; turns are (role, content)."""
    record = {
        "id": sid,
        "conversations": [{"from": r, "value": c} for r, c in turns],
    }
    if images:
        record["image"] = list(images)
    return normalize(record, 0, source)


def supervised_spans(labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of supervised label ids."""
    spans, cur = [], []
    for t in labels.tolist():
        if t == IGNORE_INDEX:
            if cur:
                spans.append(cur)
                cur = []
        else:
            cur.append(t)
    if cur:
        spans.append(cur)
    return spans


GOLDEN_TURNS = [
    ("system", "You are a helpful assistant."),
    ("human", "<image>\nWhat colour is the square?"),
    ("gpt", "The square is red."),
    ("human", "How many shapes are there?"),
    ("gpt", "There are 2 shapes."),
]
GOLDEN_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n" + IMG + "\nWhat colour is the square?<|im_end|>\n"
    "<|im_start|>assistant\nThe square is red.<|im_end|>\n"
    "<|im_start|>user\nHow many shapes are there?<|im_end|>\n"
    "<|im_start|>assistant\nThere are 2 shapes.<|im_end|>\n"
)


# ------------------------------------------------------------------ 1. golden rendering
def test_golden_conversation_rendering(cfg, tokenizer, tmp_path):
    assert cfg.model.vision.image_size // cfg.model.vision.patch_size == 8
    enc = make_encoder(cfg, tokenizer, tmp_path)
    image = write_png(tmp_path / "red.png")
    out = enc(conv_sample("golden-1", GOLDEN_TURNS, [image]))

    ids, labels = out["input_ids"], out["labels"]
    assert out["id"] == "golden-1"
    assert ids.dtype == torch.long and ids.shape == labels.shape
    assert tokenizer.decode(ids.tolist()) == GOLDEN_TEXT

    # Exactly (image_size / patch_size)^2 image tokens, contiguous, never supervised.
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    is_image = ids == image_id
    assert int(is_image.sum()) == TOKENS_PER_IMAGE
    pos = is_image.nonzero().flatten()
    assert (pos[-1] - pos[0] + 1).item() == TOKENS_PER_IMAGE
    assert (labels[is_image] == IGNORE_INDEX).all()

    # Supervised tokens: exactly each answer + <|im_end|>, in two separate spans, labels
    # equal to the inputs there (the shift happens in the loss).
    sup = labels != IGNORE_INDEX
    assert torch.equal(labels[sup], ids[sup])
    assert tokenizer.decode(labels[sup].tolist()) == (
        "The square is red.<|im_end|>There are 2 shapes.<|im_end|>"
    )
    spans = supervised_spans(labels)
    assert [tokenizer.decode(s) for s in spans] == [
        "The square is red.<|im_end|>",
        "There are 2 shapes.<|im_end|>",
    ]
    # Everything before the first answer (system, user, image, assistant header) is masked,
    # and so is the newline after each <|im_end|> and the user turn in between.
    first = int(sup.nonzero()[0])
    assert tokenizer.decode(ids[:first].tolist()).endswith("<|im_start|>assistant\n")
    assert (labels[:first] == IGNORE_INDEX).all()
    unsupervised_text = tokenizer.decode(ids[~sup & ~is_image].tolist())
    assert "You are a helpful assistant." in unsupervised_text
    assert "How many shapes are there?" in unsupervised_text
    assert not sup[-1]  # the trailing "\n" after the last <|im_end|>

    assert out["pixel_values"].shape == (1, 3, 64, 64)
    assert out["pixel_values"].dtype == torch.float32


def test_golden_plain_text_rendering(cfg, tokenizer, tmp_path):
    enc = make_encoder(cfg, tokenizer, tmp_path)
    sample = normalize({"id": "txt-1", "text": "there are 2 shapes."}, 0, "t.jsonl")
    out = enc(sample)
    ids, labels = out["input_ids"], out["labels"]
    assert tokenizer.decode(ids.tolist()) == "there are 2 shapes.<|im_end|>"
    assert ids[-1].item() == tokenizer.eos_token_id
    assert torch.equal(labels, ids)  # every token supervised, including the eos
    assert out["pixel_values"] is None


def test_padded_positions_are_masked_in_a_batch(cfg, tokenizer, tmp_path):
    enc = make_encoder(cfg, tokenizer, tmp_path)
    image = write_png(tmp_path / "red.png")
    long = enc(conv_sample("long", GOLDEN_TURNS, [image]))
    short = enc(normalize({"id": "short", "text": "hi"}, 0, "t.jsonl"))
    batch = collate([short, long], tokenizer.pad_token_id)
    n = len(short["input_ids"])
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, n:] == tokenizer.pad_token_id).all()
    # The loss sees exactly the supervised tokens (shifted by one).
    assert loss_normalizer(batch["labels"]) == (
        (short["labels"][1:] != IGNORE_INDEX).sum() + (long["labels"][1:] != IGNORE_INDEX).sum()
    )


# ---------------------------------------------------------------- 2. images per sample
def test_two_images_in_one_sample(cfg, tokenizer, tmp_path):
    enc = make_encoder(cfg, tokenizer, tmp_path)
    a = write_png(tmp_path / "a.png", (230, 20, 20))  # red
    b = write_png(tmp_path / "b.png", (20, 20, 230))  # blue
    out = enc(
        conv_sample(
            "two",
            [("human", "<image>\n<image>\nCompare the images."), ("gpt", "They differ.")],
            [a, b],
        )
    )
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert int((out["input_ids"] == image_id).sum()) == 2 * TOKENS_PER_IMAGE
    pv = out["pixel_values"]
    assert pv.shape == (2, 3, 64, 64)
    # In the order listed: a (red) then b (blue).
    assert pv[0, 0].mean() > pv[0, 2].mean()
    assert pv[1, 2].mean() > pv[1, 0].mean()
    assert tokenizer.decode(out["input_ids"].tolist()) == (
        "<|im_start|>user\n" + IMG + "\n" + IMG + "\nCompare the images.<|im_end|>\n"
        "<|im_start|>assistant\nThey differ.<|im_end|>\n"
    )


def test_text_only_conversation_has_no_pixels(cfg, tokenizer, tmp_path):
    enc = make_encoder(cfg, tokenizer, tmp_path)
    out = enc(conv_sample("txt", [("human", "Hello?"), ("gpt", "Hi.")]))
    assert out["pixel_values"] is None
    assert tokenizer.convert_tokens_to_ids("<image>") not in out["input_ids"].tolist()
    assert tokenizer.decode(out["input_ids"].tolist()) == (
        "<|im_start|>user\nHello?<|im_end|>\n<|im_start|>assistant\nHi.<|im_end|>\n"
    )


@pytest.mark.parametrize("vision_type", ["siglip", "clip"])
def test_non_square_image_gives_the_tower_resolution(compose, tokenizer, tmp_path, vision_type):
    cfg = compose(f"model.vision.type={vision_type}")
    enc = make_encoder(cfg, tokenizer, tmp_path)
    image = write_png(tmp_path / "wide.png", size=(100, 40))
    out = enc(conv_sample("wide", [("human", "<image>\nWhat?"), ("gpt", "A.")], [image]))
    assert out["pixel_values"].shape == (1, 3, 64, 64)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert int((out["input_ids"] == image_id).sum()) == TOKENS_PER_IMAGE


# ------------------------------------------------------------------------ 3. bad input
def _bad_image_sample(tmp_path, kind):
    turns = [("human", "<image>\nWhat is it?"), ("gpt", "A shape.")]
    if kind == "missing":
        return conv_sample(
            "bad-missing", turns, ["nope/missing.png"]
        ), tmp_path / "nope/missing.png"
    if kind == "garbage":
        (tmp_path / "garbage.png").write_bytes(b"this is not a png at all" * 10)
        return conv_sample("bad-garbage", turns, ["garbage.png"]), tmp_path / "garbage.png"
    if kind == "tiny":
        write_png(tmp_path / "tiny.png", size=(4, 4))
        return conv_sample("bad-tiny", turns, ["tiny.png"]), tmp_path / "tiny.png"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind,words", [("missing", "not found"), ("garbage", "cannot be decoded"), ("tiny", "4x4")]
)
def test_image_problems_name_sample_and_file(cfg, tokenizer, tmp_path, kind, words):
    enc = make_encoder(cfg, tokenizer, tmp_path)
    sample, path = _bad_image_sample(tmp_path, kind)
    with pytest.raises(DataError) as info:
        enc(sample)
    msg = str(info.value)
    assert sample["id"] in msg and info.value.sample_id == sample["id"]
    assert str(path) in msg
    assert "test.json" in msg  # the data file it came from
    assert words in msg


@pytest.mark.parametrize(
    "sid,turns,n_images,words",
    [
        (
            "ph-missing",
            [("human", "What is it?"), ("gpt", "A shape.")],
            1,
            "0 <image> placeholders but 1 images",
        ),
        (
            "ph-extra",
            [("human", "<image>\nWhat is it?"), ("gpt", "A shape.")],
            0,
            "1 <image> placeholders but 0 images",
        ),
        (
            "ph-two-one",
            [("human", "<image><image>\nWhat?"), ("gpt", "Two.")],
            1,
            "2 <image> placeholders but 1 images",
        ),
        (
            "ph-assistant",
            [("human", "What is it?"), ("gpt", "<image> A shape.")],
            1,
            "inside an assistant turn",
        ),
        ("no-answer", [("system", "Be brief."), ("human", "What is it?")], 0, "no supervised"),
    ],
)
def test_structural_problems_name_the_sample(cfg, tokenizer, tmp_path, sid, turns, n_images, words):
    enc = make_encoder(cfg, tokenizer, tmp_path)
    images = [write_png(tmp_path / f"img{i}.png") for i in range(n_images)]
    with pytest.raises(DataError) as info:
        enc(conv_sample(sid, turns, images))
    msg = str(info.value)
    assert repr(sid) in msg and "test.json" in msg
    assert words in msg


def test_image_tokens_cut_by_max_length_raise(cfg, tokenizer, tmp_path):
    image = write_png(tmp_path / "red.png")
    sample = conv_sample("cut-img", [("human", "<image>\nWhat?"), ("gpt", "Red.")], [image])
    full = make_encoder(cfg, tokenizer, tmp_path)(sample)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    last_image = int((full["input_ids"] == image_id).nonzero()[-1])

    # One position short of the last image token: refused, naming the sample.
    with pytest.raises(DataError) as info:
        make_encoder(cfg, tokenizer, tmp_path, max_length=last_image)(sample)
    assert "'cut-img'" in str(info.value) and "max_length" in str(info.value)
    with pytest.raises(DataError, match="cut-img"):
        make_encoder(cfg, tokenizer, tmp_path, max_length=40)(sample)
    # All image tokens fit but the answer is cut away: no supervised token left.
    with pytest.raises(DataError, match="no supervised .* after truncation"):
        make_encoder(cfg, tokenizer, tmp_path, max_length=last_image + 2)(sample)
    # Long enough: fine, and untruncated.
    ok = make_encoder(cfg, tokenizer, tmp_path, max_length=len(full["input_ids"]))(sample)
    assert torch.equal(ok["input_ids"], full["input_ids"])


def test_truncation_of_plain_text_keeps_max_length_tokens(cfg, tokenizer, tmp_path):
    text = " ".join(["there is a large red square to the left of a small blue circle."] * 10)
    sample = normalize({"id": "long-text", "text": text}, 0, "t.jsonl")
    full = make_encoder(cfg, tokenizer, tmp_path, max_length=10_000)(sample)
    assert len(full["input_ids"]) > 20
    out = make_encoder(cfg, tokenizer, tmp_path, max_length=20)(sample)
    assert out["input_ids"].shape == (20,)
    assert torch.equal(out["input_ids"], full["input_ids"][:20])
    assert torch.equal(out["labels"], out["input_ids"])


def test_load_samples_json_and_jsonl_agree(tmp_path):
    records = [
        {
            "id": "a",
            "image": "x.png",
            "conversations": [
                {"from": "human", "value": "<image>\nQ?"},
                {"from": "gpt", "value": "A."},
            ],
        },
        {
            "id": "b",
            "images": ["x.png", "y.png"],
            "conversations": [
                {"from": "system", "value": "S."},
                {"from": "human", "value": "<image><image>Q?"},
                {"from": "gpt", "value": "A."},
            ],
        },
        {"id": "c", "text": "plain text."},
        {
            "conversations": [
                {"role": "user", "content": "Q?"},
                {"role": "assistant", "content": "A."},
            ]
        },
    ]
    (tmp_path / "s.json").write_text(json.dumps(records, indent=1))
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    from_json = load_samples(tmp_path / "s.json")
    from_jsonl = load_samples(tmp_path / "s.jsonl")
    assert len(from_json) == len(from_jsonl) == 4
    for x, y in zip(from_json, from_jsonl, strict=True):
        assert x["source"] == str(tmp_path / "s.json") and y["source"] == str(tmp_path / "s.jsonl")
        x.pop("source"), y.pop("source")
        assert x == y
    rows = list(from_json)
    assert rows[0]["images"] == ["x.png"]
    assert rows[0]["messages"] == [
        {"role": "user", "content": "<image>\nQ?"},
        {"role": "assistant", "content": "A."},
    ]
    assert rows[0]["text"] is None
    assert rows[1]["images"] == ["x.png", "y.png"]
    assert [m["role"] for m in rows[1]["messages"]] == ["system", "user", "assistant"]
    assert rows[2] == {
        "id": "c",
        "source": str(tmp_path / "s.json"),
        "images": [],
        "messages": [],
        "text": "plain text.",
    }
    assert rows[3]["id"] == "#3"


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_malformed_record_names_its_id(tmp_path, suffix):
    records = [{"id": "fine", "text": "ok."}, {"id": "broken-42", "image": "x.png"}]
    path = tmp_path / f"bad{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        path.write_text("\n".join(json.dumps(r) for r in records))
    with pytest.raises(DataError) as info:
        load_samples(path)
    assert "broken-42" in str(info.value) and str(path) in str(info.value)
    assert info.value.sample_id == "broken-42"


@pytest.mark.parametrize(
    "record,words",
    [
        ({"id": "turn-7", "conversations": [{"from": "robot", "value": "x"}]}, "malformed turn"),
        ({"id": "turn-8", "conversations": [{"from": "gpt", "value": 3}]}, "malformed turn"),
        ({"id": "txt-9", "text": "hi", "image": "x.png"}, "cannot have images"),
        ({"id": "txt-10", "text": ""}, "non-empty string"),
        ({"id": "conv-11", "conversations": []}, "non-empty 'conversations'"),
    ],
)
def test_malformed_records_name_their_id(record, words):
    with pytest.raises(DataError) as info:
        normalize(record, 0, "f.json")
    assert repr(record["id"]) in str(info.value) and "f.json" in str(info.value)
    assert words in str(info.value)


# ------------------------------------------------------------------- 4. chat template
def test_chat_template_without_generation_block_is_refused(tokenizer):
    check_chat_template(tokenizer)  # the shipped template marks assistant turns
    tokenizer.chat_template = (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor -%}"
    )
    with pytest.raises(ValueError, match="generation"):
        check_chat_template(tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        check_chat_template(tokenizer)


def test_chat_template_override_via_load_tokenizer(cfg):
    plain = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok = load_tokenizer(cfg.model, chat_template=plain)
    assert tok.chat_template == plain
    with pytest.raises(ValueError, match="generation"):
        check_chat_template(tok)


# --------------------------------------------------------------------------- 5. collate
def test_collate_pads_right_and_keeps_image_order(cfg, tokenizer, tmp_path):
    enc = make_encoder(cfg, tokenizer, tmp_path)
    red = write_png(tmp_path / "r.png", (230, 20, 20))
    green = write_png(tmp_path / "g.png", (20, 230, 20))
    blue = write_png(tmp_path / "b.png", (20, 20, 230))
    s0 = enc(conv_sample("s0", [("human", "<image>\nQ?"), ("gpt", "Red.")], [red]))
    s1 = enc(conv_sample("s1", [("human", "Just text, a bit longer?"), ("gpt", "Yes.")]))
    s2 = enc(conv_sample("s2", [("human", "<image><image>\nQ?"), ("gpt", "Two.")], [green, blue]))
    samples = [s0, s1, s2]
    pad = tokenizer.pad_token_id
    batch = collate(samples, pad)

    lengths = [len(s["input_ids"]) for s in samples]
    L = max(lengths)
    assert batch["ids"] == ["s0", "s1", "s2"]
    assert (
        batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, L)
    )
    for i, (s, n) in enumerate(zip(samples, lengths, strict=True)):
        assert torch.equal(batch["input_ids"][i, :n], s["input_ids"])
        assert torch.equal(batch["labels"][i, :n], s["labels"])
        assert (batch["input_ids"][i, n:] == pad).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert (
            batch["attention_mask"][i, :n].eq(1).all()
            and batch["attention_mask"][i, n:].eq(0).all()
        )
    assert batch["attention_mask"].sum().item() == sum(lengths)
    assert batch["image_counts"].tolist() == [1, 0, 2]
    pv = batch["pixel_values"]
    assert pv.shape == (3, 3, 64, 64)
    assert torch.equal(pv[0], s0["pixel_values"][0])
    assert torch.equal(pv[1:], s2["pixel_values"])
    dominant = [int(pv[k].mean(dim=(1, 2)).argmax()) for k in range(3)]
    assert dominant == [0, 1, 2]  # red, green, blue

    # Micro-batches carry exactly their own samples' images.
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    mbs = list(micro_batches(batch, 1))
    assert mbs[0]["pixel_values"].shape[0] == 1 and mbs[1]["pixel_values"] is None
    assert torch.equal(mbs[2]["pixel_values"], s2["pixel_values"])
    for size in (1, 2, 3):
        for mb in micro_batches(batch, size):
            n_img = 0 if mb["pixel_values"] is None else mb["pixel_values"].shape[0]
            assert int((mb["input_ids"] == image_id).sum()) == n_img * TOKENS_PER_IMAGE

    # A batch without any image.
    text_only = collate([s1, s1], pad)
    assert text_only["pixel_values"] is None
    assert text_only["image_counts"].tolist() == [0, 0]


# --------------------------------------------------------------------------- 6. mixture
def test_mixture_indices_are_deterministic_and_proportional():
    sizes, weights = {"a": 100, "b": 10}, {"a": 0.5, "b": 0.5}
    first = mixture_indices(sizes, weights, seed=3, total=100)
    assert first == mixture_indices(sizes, weights, seed=3, total=100)
    assert first != mixture_indices(sizes, weights, seed=4, total=100)
    assert len(first) == 100
    per = Counter(name for name, _ in first)
    assert per == {"a": 50, "b": 50}
    a_idx = [i for n, i in first if n == "a"]
    b_idx = [i for n, i in first if n == "b"]
    assert len(set(a_idx)) == 50 and all(0 <= i < 100 for i in a_idx)  # no repeat before exhausted
    assert Counter(b_idx) == {i: 5 for i in range(10)}
    # b cycles through whole permutations: each block of 10 holds every index once.
    for k in range(5):
        assert sorted(b_idx[10 * k : 10 * (k + 1)]) == list(range(10))
    # Shuffled, not in file order.
    assert a_idx != sorted(a_idx)


def test_mixture_indices_default_total_and_zero_weight():
    out = mixture_indices({"a": 30, "b": 10, "c": 5}, {"a": 3, "b": 1, "c": 0}, seed=0)
    per = Counter(n for n, _ in out)
    assert per == {"a": 30, "b": 10}  # default total: sum of the used sources' sizes
    with pytest.raises(ValueError, match="positive weight"):
        mixture_indices({"a": 3}, {"a": 0.0}, seed=0)


@pytest.mark.parametrize(
    "weights,total",
    [({"a": 0.5, "b": 0.5}, 5), ({"a": 1, "b": 1, "c": 1}, 100), ({"a": 1, "b": 1, "c": 1}, 2)],
)
def test_mixture_indices_give_exactly_total_draws(weights, total):
    sizes = {n: 50 for n in weights}
    assert len(mixture_indices(sizes, weights, seed=0, total=total)) == total


def test_unknown_dataset_in_stage_mixture_is_named(compose, tokenizer, tmp_path):
    cfg = compose("+stage.mixture.no_such_set=1.0")
    enc = make_encoder(cfg, tokenizer, tmp_path)
    with pytest.raises(ValueError, match="no_such_set"):
        StageDataModule(cfg.data, cfg.stage, enc, seed=0)


def test_dataset_added_on_the_command_line_is_checked_and_used(compose, tokenizer, shapes_root):
    captions = f"{shapes_root}/caption_train.json"
    cfg = compose(
        f"+data.datasets.extra={{train: '{captions}'}}",
        "+stage.mixture.extra=1",
        "stage.mixture.instruct=0",
    )
    enc = make_encoder(cfg, tokenizer, cfg.data.root, cfg.stage.max_length)
    dm = StageDataModule(cfg.data, cfg.stage, enc, seed=0)
    dm.setup("fit")
    assert all(i.startswith("cap-train") for i in next(iter(dm.train_dataloader()))["ids"])

    misspelt = compose(f"+data.datasets.extra={{trian: '{captions}'}}", "+stage.mixture.extra=1")
    with pytest.raises(ValueError, match=r"data\.datasets\.extra: Key 'trian'"):
        StageDataModule(misspelt.data, misspelt.stage, enc, seed=0)


def test_stage_datamodule_batches_are_consistent_and_seeded(compose, tokenizer):
    cfg = compose("stage.batch_size=3", "stage.accumulate=2", "stage.val_every=0")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    records = {
        r["id"]: r
        for name, w in cfg.stage.mixture.items()
        if w > 0
        for r in load_samples(cfg.data.datasets[name].train)
    }

    def first_batch(seed):
        enc = make_encoder(cfg, tokenizer, cfg.data.root, cfg.stage.max_length)
        dm = StageDataModule(cfg.data, cfg.stage, enc, seed=seed)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))

    b = first_batch(0)
    assert b["input_ids"].shape[0] == 6  # batch_size * accumulate: one optimizer step
    assert set(b["ids"]) <= set(records)  # drawn from the stage's mixture only
    assert b["image_counts"].tolist() == [len(records[i]["images"]) for i in b["ids"]]
    n_images = int(b["image_counts"].sum())
    assert n_images == (0 if b["pixel_values"] is None else b["pixel_values"].shape[0])
    assert int((b["input_ids"] == image_id).sum()) == TOKENS_PER_IMAGE * n_images
    assert first_batch(0)["ids"] == b["ids"]


def test_cached_encoding_gives_the_same_batches_and_encodes_each_sample_once(compose, tokenizer):
    def batches(cache: bool, calls: Counter):
        cfg = compose("stage.batch_size=4", "stage.val_every=0", f"data.cache_encoded={cache}")
        enc = make_encoder(cfg, tokenizer, cfg.data.root, cfg.stage.max_length)

        def counting(sample):
            calls[sample["id"]] += 1
            return enc(sample)

        dm = StageDataModule(cfg.data, cfg.stage, enc, seed=0)
        dm.setup("fit")
        dm.train_set.encode = counting
        # Two epochs of a 12-sample slice: every sample is drawn twice.
        dm.train_set.index = dm.train_set.index[:12]
        loader = dm.train_dataloader()
        return [b for _ in range(2) for b in loader]

    fresh_calls, cached_calls = Counter(), Counter()
    fresh, cached = batches(False, fresh_calls), batches(True, cached_calls)
    assert set(fresh_calls.values()) == {2} and set(cached_calls.values()) == {1}
    assert len(fresh) == len(cached) == 6
    for a, b in zip(fresh, cached, strict=True):
        assert a["ids"] == b["ids"]
        for key in ("input_ids", "labels", "attention_mask", "pixel_values"):
            assert torch.equal(a[key], b[key])


MIXED = ("+stage.mixture.vqa=1", "+stage.mixture.caption=1")  # beside instruct (sft's)


def test_length_hints_track_encoded_lengths(compose, tokenizer):
    cfg = compose(*MIXED, "stage.max_length=128")
    enc = make_encoder(cfg, tokenizer, cfg.data.root, cfg.stage.max_length)
    samples = [
        s
        for name in ("vqa", "caption", "instruct")
        for s in load_samples(cfg.data.datasets[name].train).select(range(10))
    ]
    hints = enc.length_hints(samples)
    actual = [len(enc(s)["input_ids"]) for s in samples]
    assert enc.images.nominal_tokens == TOKENS_PER_IMAGE
    # The hint leaves out only the chat template's own tokens: a few per turn.
    for h, a, s in zip(hints, actual, samples, strict=True):
        assert 0 <= a - h <= 8 * len(s["messages"]) or a == h == 128, (s["id"], h, a)


def test_group_by_length_pads_less_and_sees_the_same_samples(compose, tokenizer):
    def epoch(grouped: bool):
        cfg = compose(
            *MIXED,
            "stage.batch_size=4",
            "stage.val_every=0",
            f"stage.group_by_length={grouped}",
        )
        enc = make_encoder(cfg, tokenizer, cfg.data.root, cfg.stage.max_length)
        dm = StageDataModule(cfg.data, cfg.stage, enc, seed=0)
        dm.setup("fit")
        mixture = dm.train_set
        ids = Counter(mixture.sources[name][j]["id"] for name, j in mixture.index)
        return list(dm.train_dataloader()), ids

    (plain, ids), (grouped, same_ids) = epoch(False), epoch(True)
    assert ids == same_ids and len(plain) == len(grouped) == sum(ids.values()) // 4
    # Each epoch draws from the mixture without repeats (drop_last leaves under 4 out).
    for batches in (plain, grouped):
        assert not Counter(i for b in batches for i in b["ids"]) - ids

    def padding(batches):
        return sum(int((b["attention_mask"] == 0).sum()) for b in batches)

    assert padding(grouped) < 0.5 * padding(plain)


# ---------------------------------------- 7. gradient accumulation leaves the step unchanged
def _step(model, batch, size, exponent=0.0):
    model.zero_grad(set_to_none=True)
    total = loss_normalizer(batch["labels"], exponent)
    loss_sum = torch.zeros(())
    for mb in micro_batches(batch, size):
        logits = model(mb["input_ids"], mb["attention_mask"], mb["pixel_values"])
        mb_loss = token_loss_sum(logits, mb["labels"], exponent)
        (mb_loss / total).backward()
        loss_sum += mb_loss.detach()
    grads = {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }
    return loss_sum / total, grads


@pytest.mark.parametrize("reduction", sorted(REDUCTION_EXPONENTS))
def test_loss_and_gradients_do_not_depend_on_micro_batch_size(
    compose, tokenizer, shapes_root, reduction
):
    exponent = REDUCTION_EXPONENTS[reduction]
    cfg = compose()
    enc = make_encoder(cfg, tokenizer, shapes_root, max_length=256)
    samples = [
        load_samples(shapes_root / "chat_train.json")[0],
        load_samples(shapes_root / "text_train.jsonl")[1],
        load_samples(shapes_root / "caption_train.json")[0],
        load_samples(shapes_root / "vqa_train.json")[2],
    ]
    encoded = [enc(s) for s in samples]
    lengths = [len(e["input_ids"]) for e in encoded]
    assert len(set(lengths)) == 4
    batch = collate(encoded, tokenizer.pad_token_id)
    assert batch["image_counts"].tolist() == [1, 0, 1, 1]

    torch.manual_seed(0)
    model = VisionLanguageModel.build(cfg.model, tokenizer)  # every component trainable
    model.train()

    ref_loss, ref_grads = _step(model, batch, 4, exponent)
    assert torch.isfinite(ref_loss) and ref_loss > 0
    # The vision tower really gets gradient through the image positions.
    assert ref_grads["vision_tower.model.embeddings.patch_embedding.weight"].abs().sum() > 0
    # Split by sample (the per-dataset logs), the same sum: each part is its sample alone.
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        parts = sample_loss_sums(logits, batch["labels"], exponent)
        total = loss_normalizer(batch["labels"], exponent)
        assert (parts > 0).all() and torch.allclose(parts.sum() / total, ref_loss, atol=1e-6)
        for i, mb in enumerate(micro_batches(batch, 1)):
            alone = model(mb["input_ids"], mb["attention_mask"], mb["pixel_values"])
            assert torch.allclose(parts[i], token_loss_sum(alone, mb["labels"], exponent))
    for size in (1, 2):
        loss, grads = _step(model, batch, size, exponent)
        assert torch.allclose(loss, ref_loss, atol=1e-6), (size, loss, ref_loss)
        for name, g in ref_grads.items():
            assert torch.allclose(grads[name], g, atol=1e-6), (size, name)

    # The weighting itself: with per-sample mean losses m_i over x_i supervised tokens,
    # a token weighs x_i^-p, so the step loss is sum(x_i^(1-p) m_i) / sum(x_i^(1-p)).
    with torch.no_grad():
        means, sizes = [], []
        for mb in micro_batches(batch, 1):
            logits = model(mb["input_ids"], mb["attention_mask"], mb["pixel_values"])
            sizes.append(loss_normalizer(mb["labels"]))
            means.append(token_loss_sum(logits, mb["labels"]) / sizes[-1])
    means, sizes = torch.stack(means), torch.stack(sizes)
    assert len(set(sizes.tolist())) > 1  # else every reduction would agree
    w = sizes ** (1 - exponent)
    assert torch.allclose((w * means).sum() / w.sum(), ref_loss, atol=1e-6)
    # Sanity: the plain mean of sample means is "sample" and nothing else.
    assert torch.allclose(means.mean(), ref_loss, atol=1e-4) == (reduction == "sample")
