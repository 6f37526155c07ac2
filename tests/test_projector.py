"""Projectors: shapes, and pixel shuffle's token count agreeing with the data pipeline."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmtrain.data.encode import SampleEncoder
from vlmtrain.data.images import ImageProcessor
from vlmtrain.model.lm import load_tokenizer
from vlmtrain.model.projector import PixelShuffleMLPProjector, build_projector
from vlmtrain.model.vision import build_image_processor
from vlmtrain.model.vlm import VisionLanguageModel


def test_pixel_shuffle_groups_2x2_neighbourhoods():
    proj = PixelShuffleMLPProjector(d_vision=1, d_lm=4, downsample=2)
    grid = torch.arange(16, dtype=torch.float).view(1, 16, 1)  # a 4x4 grid, raster order
    side = 2
    x = grid.view(1, side, 2, side, 2, 1).permute(0, 1, 3, 2, 4, 5).reshape(1, 4, 4)
    assert x[0, 0].tolist() == [0, 1, 4, 5] and x[0, 3].tolist() == [10, 11, 14, 15]
    assert proj(grid).shape == (1, 4, 4)


def test_pixel_shuffle_rejects_indivisible_grid():
    with pytest.raises(ValueError, match="divisible by 2"):
        PixelShuffleMLPProjector(8, 8, 2)(torch.zeros(1, 9, 8))


def test_unknown_projector_names_the_key():
    with pytest.raises(ValueError, match="model.projector.type"):
        build_projector("resampler", 8, 8)


def test_pixel_shuffle_model_end_to_end(compose, tmp_path):
    cfg = compose("model/projector=pixel_shuffle_mlp")
    tok = load_tokenizer(cfg.model)
    model = VisionLanguageModel.build(cfg.model, tok)
    assert model.tokens_per_image == 16  # 64 px / patch 8 = 8x8 patches -> 4x4 tokens
    spec = model.vision_spec
    images = ImageProcessor(
        build_image_processor(cfg.model.vision, spec),
        spec.patch_size,
        tmp_path,
        model.token_downsample,
    )
    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    encoder = SampleEncoder(tok, images, "<image>", 128)
    sample = {
        "id": "s1",
        "source": "mem",
        "images": ["a.png"],
        "text": None,
        "messages": [
            {"role": "user", "content": "<image>\nWhat colour?"},
            {"role": "assistant", "content": "red"},
        ],
    }
    enc = encoder(sample)
    assert int((enc["input_ids"] == model.image_token_id).sum()) == 16
    logits = model(enc["input_ids"][None], None, enc["pixel_values"])
    assert logits.shape[:2] == (1, enc["input_ids"].shape[0])
