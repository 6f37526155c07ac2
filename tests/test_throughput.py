"""Throughput: model FLOPs against a hand count, and what a stage logs about its speed."""

from __future__ import annotations

import csv

import pytest
import torch
from omegaconf import OmegaConf
from test_cli import base_args, kill_and_resume, losses, vlmtrain

from vlmtrain.config import ModelConfig
from vlmtrain.flops import StepShape, step_flops, throughput_metrics
from vlmtrain.model.vlm import VisionLanguageModel


def hand_count(length: int, logits: int, vocab: int) -> dict[str, int]:
    """Forward matmul FLOPs (2 per multiply-add) of the default tiny model (SigLIP tower
    64 wide x 2 layers, MLP 128, patch 8 on 64 px; mlp2x_gelu projector 64 -> 64 -> 64;
    Llama LM 64 wide x 2 layers, SwiGLU 128) on one image and one sequence."""
    d, mlp, layers, n = 64, 128, 2, 64  # n: image tokens
    patch = 2 * n * (3 * 8 * 8) * d
    tower_layer = 4 * 2 * n * d * d + 2 * 2 * n * n * d + 2 * 2 * n * d * mlp
    projector = 2 * n * (d * d + d * d)
    lm_layer = 4 * 2 * length * d * d + 2 * 2 * length * length * d + 3 * 2 * length * d * mlp
    return {
        "patch": patch,
        "tower_layers": layers * tower_layer,
        "projector": projector,
        "lm_layers": layers * lm_layer,
        "head": 2 * logits * d * vocab,
    }


@pytest.fixture()
def tiny_meta():
    cfg = OmegaConf.structured(ModelConfig)
    cfg.lm.vocab_size = 100  # + the image token: 101 rows
    return VisionLanguageModel.build(cfg, None, device="meta")


def test_flops_match_a_hand_count_trainable_and_frozen(tiny_meta):
    shape = StepShape(sequences=1, length=80, images=1, logit_positions=5)
    h = hand_count(80, 5, 101)
    full = step_flops(tiny_meta, shape)
    assert full["vision"]["forward"] == h["patch"] + h["tower_layers"]
    assert full["projector"]["forward"] == h["projector"]
    assert full["lm"]["forward"] == h["lm_layers"] + h["head"]
    # Everything trains: backward is twice the forward, except that no gradient of the
    # pixels is computed (the patch embedding's input gradient).
    assert full["lm"]["backward"] == 2 * full["lm"]["forward"]
    assert full["projector"]["backward"] == 2 * h["projector"]
    assert full["vision"]["backward"] == 2 * h["tower_layers"] + h["patch"]

    # Alignment: tower and LM frozen, projector trains. The LM's backward still runs for
    # its input gradient (matmuls once; attention's Q, K and V gradients twice its
    # forward), with no weight gradient; the tower's backward does not run.
    tiny_meta.requires_grad_(False)
    tiny_meta.multi_modal_projector.requires_grad_(True)
    align = step_flops(tiny_meta, shape)
    attention = 2 * 2 * 2 * 80 * 80 * 64
    assert align["lm"]["backward"] == h["lm_layers"] + attention + h["head"]
    assert align["projector"]["backward"] == h["projector"] + h["projector"] // 2
    assert align["vision"]["backward"] == 0

    # Only the LM trains: nothing before it runs backward.
    tiny_meta.requires_grad_(False)
    tiny_meta.language_model.requires_grad_(True)
    lm_only = step_flops(tiny_meta, shape)
    assert lm_only["projector"]["backward"] == lm_only["vision"]["backward"] == 0
    # Its first norm's weight trains, so even the first layer's input gradient runs.
    assert lm_only["lm"]["backward"] == 2 * lm_only["lm"]["forward"]


def test_mfu_from_tokens_and_peak():
    row = throughput_metrics(tokens=2000, dt=0.5, world=2, per_token=1e9, peak=1e13)
    assert row["perf/tokens_per_s_per_device"] == 2000
    assert row["perf/model_tflops_per_device"] == pytest.approx(2.0)
    assert row["perf/mfu"] == pytest.approx(0.2)
    assert "perf/mfu" not in throughput_metrics(2000, 0.5, 2, 1e9, None)


def test_stage_logs_throughput_mfu_and_data_wait(shapes_root, tmp_path):
    """Through the CLI, an alignment stage (frozen tower) with the disk feature cache:
    its losses are those of the same stage without it; every logged step has tokens/s
    per device, model TFLOP/s, MFU against trainer.peak_flops and the time waited for data."""
    args = [
        *base_args(shapes_root, tmp_path),
        "stage=align",
        "stage.max_steps=3",
        "stage.val_every=0",
        "data.cache_encoded=true",  # epochs repeat images: the second reads the cache
        "stage.batch_size=2",
        "data.datasets.caption.train=${data.root}/caption_val.json",  # a small file
    ]
    vlmtrain([*args, "run_name=plain"], cwd=tmp_path)
    cached = vlmtrain(
        [*args, "run_name=cached", "trainer.feature_cache=disk", "trainer.peak_flops=1e12"],
        cwd=tmp_path,
    )
    assert "feature_cache" not in cached.stdout  # used, not turned off
    stored = list((tmp_path / "cached" / "align" / "feature_cache").rglob("*.safetensors"))
    assert len(stored) > 0
    assert losses(tmp_path / "cached" / "align" / "logs" / "csv" / "metrics.csv") == losses(
        tmp_path / "plain" / "align" / "logs" / "csv" / "metrics.csv"
    )
    with (tmp_path / "cached" / "align" / "logs" / "csv" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/step_time_s")]
    assert len(rows) == 2  # the first step has no step time
    for r in rows:
        tps = float(r["perf/tokens_per_s_per_device"])
        tflops = float(r["perf/model_tflops_per_device"])
        assert float(r["perf/mfu"]) == pytest.approx(tflops / 1.0)
        # The tiny model: some hundred thousand FLOPs per token (tower and LM, fwd + bwd).
        assert 1e5 < tflops * 1e12 / tps < 1e8
        assert 0 <= float(r["perf/data_wait_s"]) < float(r["perf/step_time_s"]) * 10


def test_feature_cache_equals_recomputation_and_is_refused_where_it_would_not(compose):
    from helpers import trained_model

    from vlmtrain.model.feature_cache import FeatureCache, pixel_keys, why_not_cacheable

    cfg = compose("stage=align")
    model, *_ = trained_model(cfg, steps=1)
    tower = model.vision_tower.requires_grad_(False)
    pixels = torch.randn(5, 3, 64, 64)
    want = tower(pixels)
    cache = FeatureCache("memory")
    first = cache.tower_features(tower, pixels[:3], pixel_keys(pixels[:3]))  # 3 misses
    both = cache.tower_features(tower, pixels, pixel_keys(pixels))  # 3 hits, 2 misses
    assert (cache.hits, cache.misses) == (3, 5)
    torch.testing.assert_close(first, want[:3], rtol=0, atol=1e-6)
    torch.testing.assert_close(both, want, rtol=0, atol=1e-6)
    assert why_not_cacheable(tower, trainable=True, augmented=False) == "the vision tower trains"
    assert why_not_cacheable(tower, trainable=False, augmented=True)
    assert why_not_cacheable(tower, trainable=False, augmented=False) is None


def test_plan_prints_flops_per_step(compose):
    from vlmtrain.plan import plan_stage

    cfg = compose("stage=align", "stage.batch_size=4")
    plan = plan_stage(cfg)
    parts = plan["flops"]["by_part"]
    assert parts["vision"]["backward"] == 0  # frozen tower, nothing trainable before it
    assert 0 < parts["lm"]["forward"] < parts["lm"]["backward"] < 2 * parts["lm"]["forward"]
    assert plan["flops"]["per_step"] == sum(v for p in parts.values() for v in p.values())


def test_encoded_store_gives_the_encoders_samples_to_workers(compose, tmp_path):
    """The store (built once, memory-mapped) gives loader workers exactly what encoding
    gives; a second data module of the same data and encoder reuses the table."""
    from vlmtrain.data.module import StageDataModule
    from vlmtrain.train import build_model, make_encoder, resolve_init

    store = tmp_path / "store"
    cfg = compose(
        "stage=sft",
        "stage.allow_frozen_fresh=true",
        "stage.val_every=0",
        "stage.batch_size=4",
        "data.num_workers=1",
        f"data.encoded_store={store}",
        "data.datasets.instruct.train=${data.root}/chat_val.json",  # small files
    )
    tokenizer, model = build_model(cfg, resolve_init(cfg.stage, cfg.model, tmp_path))
    encoder = make_encoder(cfg, model, tokenizer)
    stored = StageDataModule(cfg.data, cfg.stage, encoder, cfg.seed)
    stored.setup("fit")
    tables = sorted(p.name for p in store.iterdir())
    assert len(tables) == 1
    cfg.data.encoded_store = None
    plain = StageDataModule(cfg.data, cfg.stage, encoder, cfg.seed)
    plain.setup("fit")
    batches = zip(stored.train_dataloader(), plain.train_dataloader(), strict=True)
    for _, (a, b) in zip(range(3), batches, strict=False):
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[key]), key
            else:
                assert value == b[key], key
    cfg.data.encoded_store = str(store)
    StageDataModule(cfg.data, cfg.stage, encoder, cfg.seed).setup("fit")
    assert sorted(p.name for p in store.iterdir()) == tables  # reused, not rebuilt


@pytest.mark.slow
def test_kill_and_resume_exact_with_workers_store_and_feature_cache(shapes_root, tmp_path):
    args = [
        *base_args(shapes_root, tmp_path),
        "stage=align",
        "stage.max_steps=6",
        "stage.val_every=0",
        "trainer.checkpoint_every=2",
        "data.num_workers=2",
        f"data.encoded_store={tmp_path / 'store'}",
        "trainer.feature_cache=disk",
    ]
    kill_and_resume(args, tmp_path, kill_after=3)
    want = losses(tmp_path / "straight" / "align" / "logs" / "csv" / "metrics.csv")
    assert len(want) == 6
    assert losses(tmp_path / "killed" / "align" / "logs" / "csv" / "metrics.csv") == want
