"""Packing (stage.packing): the packer, equal loss and gradients to the unpacked step
under every loss reduction, no attention across samples, and the refusal elsewhere."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from helpers import image_processor_for
from test_cli import base_args, vlmtrain

from vlmtrain.data.encode import SampleEncoder, collate
from vlmtrain.data.module import StageDataModule
from vlmtrain.data.packing import (
    first_fit_decreasing,
    flatten_rows,
    pack_collate,
    padding_fraction,
    split_rows,
)
from vlmtrain.data.samples import load_samples
from vlmtrain.model.lm import load_tokenizer
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.objectives.next_token import (
    REDUCTION_EXPONENTS,
    loss_normalizer,
    micro_batch_loss,
    micro_batches,
    sample_weights,
)
from vlmtrain.objectives.registry import objective_for

REPO = Path(__file__).resolve().parents[1]


def test_first_fit_decreasing():
    assert first_fit_decreasing([5, 3, 8, 2, 4], 10) == [[2, 3], [0, 4], [1]]
    # Ties keep the given order; every bin within capacity; every index once.
    rows = first_fit_decreasing([4, 4, 4, 4, 7, 1], 8)
    assert rows == [[4, 5], [0, 1], [2, 3]]
    with pytest.raises(ValueError, match="sample 1 has 9 tokens"):
        first_fit_decreasing([3, 9], 8)
    # A row per micro-batch: the fullest rows give up their last samples.
    assert split_rows([[0, 1, 2], [3]], 4) == [[0], [3], [2], [1]]
    assert split_rows([[0, 1], [2]], 2) == [[0, 1], [2]]


@pytest.fixture(scope="module")
def world(shapes_root):
    """The tiny model (every component trainable) and encoded samples of every kind:
    a chat, plain text (whose first token is supervised), a caption and two VQA."""
    from hydra import compose, initialize_config_dir

    from vlmtrain.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"data.root={shapes_root}", "data.generate=null"])
    tokenizer = load_tokenizer(cfg.model)
    processor, _ = image_processor_for(cfg, shapes_root)
    enc = SampleEncoder(tokenizer, processor, cfg.model.image_token, 256)
    samples = [
        load_samples(shapes_root / "chat_train.json")[0],
        load_samples(shapes_root / "text_train.jsonl")[1],
        load_samples(shapes_root / "caption_train.json")[0],
        load_samples(shapes_root / "vqa_train.json")[2],
        load_samples(shapes_root / "vqa_train.json")[5],
    ]
    torch.manual_seed(0)
    model = VisionLanguageModel.build(cfg.model, tokenizer).train()
    return model, tokenizer, [{**enc(s), "dataset": s["source"]} for s in samples]


def _step(model, batch, rows_per_micro_batch, exponent, flatten=False):
    """The loss and gradients of one step as NextTokenModule computes them."""
    model.zero_grad(set_to_none=True)
    total = loss_normalizer(batch["labels"], exponent, batch.get("sample_index"))
    loss, per_sample = torch.zeros(()), {}
    for mb in micro_batches(batch, rows_per_micro_batch):
        sums = micro_batch_loss(model, mb, exponent, flatten)
        (sums.sum() / total).backward()
        loss += sums.sum().detach()
        weights = sample_weights(mb["labels"], exponent, mb["sample_index"], len(mb["ids"]))
        for sid, s, w in zip(mb["ids"], sums.tolist(), weights.tolist(), strict=True):
            per_sample.setdefault(sid, [0.0, 0.0])
            per_sample[sid][0] += s
            per_sample[sid][1] += w
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss / total, grads, per_sample


@pytest.mark.parametrize("reduction", sorted(REDUCTION_EXPONENTS))
def test_packed_loss_and_gradients_equal_unpacked(world, reduction):
    model, tokenizer, encoded = world
    exponent = REDUCTION_EXPONENTS[reduction]
    pad = tokenizer.pad_token_id
    lengths = [len(e["input_ids"]) for e in encoded]
    capacity = max(lengths) + min(lengths)  # several rows, some holding two samples
    packed = pack_collate(encoded, pad, capacity)
    assert packed["input_ids"].shape[0] < len(encoded)
    assert (packed["sample_index"].max(1).values - packed["sample_index"][:, 0]).max() >= 1
    assert int(packed["attention_mask"].sum()) == sum(lengths)
    assert packed["image_counts"].sum() == 4 and packed["pixel_values"].shape[0] == 4

    # As many micro-batches as unpacked (DDP ranks run as many backward passes).
    for size in (1, 2, 5):
        split = pack_collate(encoded, pad, 1000, batch_size=size)
        assert len(list(micro_batches(split, size))) == -(-len(encoded) // size)

    want_loss, want_grads, want_parts = _step(model, collate(encoded, pad), 2, exponent)
    assert want_grads["vision_tower.model.embeddings.patch_embedding.weight"].abs().sum() > 0
    for rows, flatten in ((1, False), (2, False), (8, False), (2, True), (0, False)):
        batch = packed if rows else pack_collate(encoded, pad, 1000, batch_size=2)
        loss, grads, parts = _step(model, batch, rows or 2, exponent, flatten)
        assert torch.allclose(loss, want_loss, rtol=1e-5, atol=1e-6), (rows, flatten)
        assert grads.keys() == want_grads.keys()
        for name, g in want_grads.items():
            assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-6), (rows, flatten, name)
        # Per-sample sums and weights (the per-dataset logs) too.
        assert parts.keys() == want_parts.keys()
        for sid, (s, w) in want_parts.items():
            assert parts[sid][0] == pytest.approx(s, rel=1e-5)
            assert parts[sid][1] == pytest.approx(w, rel=1e-6)


def test_no_token_attends_across_a_sample_boundary(world):
    """Change everything of the first sample of a packed row (tokens and image): the
    logits of the sample after it do not move. Without the per-sample positions (one
    causal sequence) they would, which shows the check can fail."""
    model, tokenizer, encoded = world
    chat, vqa = encoded[0], encoded[3]  # the packer puts the longer (chat) first
    other = {
        **chat,
        "input_ids": chat["input_ids"].clone(),
        "pixel_values": 1 - chat["pixel_values"],
    }
    text = (other["input_ids"] != model.image_token_id).nonzero()[-3:, 0]
    other["input_ids"][text] = 7

    def second_sample_logits(first, restart=True):
        batch = pack_collate([vqa, first], tokenizer.pad_token_id, 1000)
        assert batch["input_ids"].shape[0] == 1 and batch["ids"] == [first["id"], vqa["id"]]
        n = len(first["input_ids"])
        position_ids = batch["position_ids"] if restart else None
        with torch.no_grad():
            logits = model(batch["input_ids"], None, batch["pixel_values"], position_ids)
        return logits[0, n : n + len(vqa["input_ids"])]

    alone = second_sample_logits(chat)
    assert torch.allclose(second_sample_logits(other), alone, atol=1e-5)
    with torch.no_grad():  # and they are those of the sample on its own
        own = model(vqa["input_ids"][None], None, vqa["pixel_values"])[0]
    assert torch.allclose(own, alone, atol=1e-5)
    leaky = second_sample_logits(chat, restart=False)
    assert not torch.allclose(second_sample_logits(other, restart=False), leaky, atol=1e-3)

    # Flattened (flash attention's layout): the boundaries come from the positions alone.
    flat = flatten_rows(
        next(micro_batches(pack_collate([vqa, other], tokenizer.pad_token_id, 1000), 1))
    )
    with torch.no_grad():
        logits = model(flat["input_ids"], None, flat["pixel_values"], flat["position_ids"])
    assert torch.allclose(logits[0, len(other["input_ids"]) :], alone, atol=1e-5)


@pytest.mark.parametrize("stage", ["dpo", "aim"])
def test_packing_is_refused_where_the_objective_cannot_pack(compose, stage):
    cfg = compose(f"stage={stage}", "stage.packing=true")
    with pytest.raises(ValueError, match=r"stage\.packing=true is not supported"):
        objective_for(cfg.stage.objective).check_stage(cfg)


# ------------------------------------------------------------------- through the CLI
def _cli_args(shapes_root, out, packing: bool) -> list[str]:
    """Tiny SFT on VQA whose steps of 8 samples (micro-batches of 2 rows) pack ~3 per row."""
    return [
        *base_args(shapes_root, out),
        "stage=sft",
        "+stage.mixture.vqa=1.0",
        "stage.batch_size=2",
        "stage.accumulate=4",
        "stage.max_length=256",
        f"stage.packing={str(packing).lower()}",
        "trainer.checkpoint_every=3",
    ]


def _logged(run_dir: Path, key: str) -> dict[int, float]:
    with (run_dir / "sft" / "logs" / "csv" / "metrics.csv").open() as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def _padding(compose, shapes_root, packing: bool, steps: int) -> list[float]:
    """The padding fraction of the first steps of the stage's own data module."""
    cfg = compose(*_cli_args(shapes_root, Path("unused"), packing)[5:])
    processor, _ = image_processor_for(cfg, shapes_root)
    tokenizer = load_tokenizer(cfg.model)
    enc = SampleEncoder(tokenizer, processor, cfg.model.image_token, cfg.stage.max_length)
    dm = StageDataModule(cfg.data, cfg.stage, enc, cfg.seed)
    dm.setup("fit")
    out = []
    for _, batch in zip(range(steps), dm.train_dataloader(), strict=False):
        mbs = list(micro_batches(batch, cfg.stage.batch_size))
        cells = sum(mb["attention_mask"].numel() for mb in mbs)
        out.append(padding_fraction(cells, int(batch["attention_mask"].sum())))
    return out


def test_packed_sft_through_the_cli_logs_its_padding(compose, shapes_root, tmp_path):
    """A packed stage trains from the command line and logs the padding it ran on: the
    fraction its data module's steps have, under half of the same steps unpacked."""
    vlmtrain([*_cli_args(shapes_root, tmp_path, True), "stage.max_steps=2"], cwd=tmp_path)
    logged = _logged(tmp_path / "default", "perf/padding_fraction")
    packed = _padding(compose, shapes_root, True, 2)
    assert list(logged.values()) == pytest.approx(packed, abs=1e-9)
    assert sum(packed) < 0.5 * sum(_padding(compose, shapes_root, False, 2))


@pytest.mark.slow
def test_packed_run_equals_unpacked_and_resumes_exactly(shapes_root, tmp_path):
    """Through the CLI: packed and unpacked runs of the same samples log the same loss
    at every step (to float rounding), and a packed run SIGKILLed after step 4 and
    started again with the same command reproduces the uninterrupted one bit for bit."""
    args = [*_cli_args(shapes_root, tmp_path, True), "stage.max_steps=6"]
    vlmtrain([*args, "run_name=straight"], cwd=tmp_path)
    unpacked = [*_cli_args(shapes_root, tmp_path, False), "stage.max_steps=6", "run_name=plain"]
    vlmtrain(unpacked, cwd=tmp_path)
    want = _logged(tmp_path / "straight", "train/loss")
    assert len(want) == 6
    assert want == pytest.approx(_logged(tmp_path / "plain", "train/loss"), rel=1e-5)

    env = {"VLMTRAIN_KILL_AFTER_STEP": "4"}
    killed = vlmtrain([*args, "run_name=killed"], cwd=tmp_path, env=env, check=False)
    assert killed.returncode != 0, "the kill hook did not fire"
    resumed = vlmtrain([*args, "run_name=killed"], cwd=tmp_path)
    assert "resuming from" in resumed.stdout
    for key in ("train/loss", "train/loss_vqa", "train/lr_lm", "perf/padding_fraction"):
        assert _logged(tmp_path / "killed", key) == _logged(tmp_path / "straight", key), key
