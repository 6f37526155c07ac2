"""A tower carried into a stage of another resolution: its position table is resized once,
and the resized tower computes what transformers' own ``interpolate_pos_encoding`` does."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_model

from vlmtrain.artifacts import load_component
from vlmtrain.config import VisionConfig
from vlmtrain.model.resolution import is_position_table, resize_position_table
from vlmtrain.model.vision import build_vision_tower


def _tower(image_size: int, **kw):
    cfg = OmegaConf.structured(VisionConfig(image_size=image_size, hidden_size=32, **kw))
    return build_vision_tower(cfg)


@pytest.mark.parametrize(
    "kind",
    [
        {"type": "siglip"},
        {"type": "clip", "feature_layer": -2},
        {"type": "siglip", "stem": "conv", "stem_blocks": 1},
        {"type": "vit_hybrid", "backbone": "resnet", "stem_blocks": 1},
        {"type": "vit_hybrid", "backbone": "focalnet", "stem_blocks": 1},
    ],
    ids=["siglip", "clip", "siglip-conv-stem", "hybrid-resnet", "hybrid-focalnet"],
)
def test_carried_tower_matches_transformers_interpolation(kind, tmp_path):
    """A 32 px tower (4x4 patches) saved as an artifact component, loaded into a 64 px
    stage (8x8): the same features as the 32 px tower run by transformers with
    interpolate_pos_encoding=True, and the stored table is the resized one."""
    torch.manual_seed(0)
    small = _tower(32, **kind).eval()
    key = next(k for k in small.state_dict() if is_position_table(k))
    with torch.no_grad():  # a table far from its init, so interpolation errors would show
        small.get_parameter(key).normal_()
    save_model(small, str(tmp_path / "vision.safetensors"))
    large = _tower(64, **kind).eval()
    load_component(large, "vision", tmp_path)

    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = large(pixels)
        if kind["type"] == "vit_hybrid":
            # DPT resizes its table at every forward and only checks the input's size.
            small.model.embeddings.image_size = (64, 64)
            theirs = small.model(pixel_values=pixels)
        else:
            theirs = small.model(pixel_values=pixels, interpolate_pos_encoding=True)
        theirs = theirs.last_hidden_state
        theirs = theirs[:, 1:] if small.has_class_token else theirs
    assert ours.shape == (2, 64, 32)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # Every other weight is carried unchanged.
    small_sd, large_sd = small.state_dict(), large.state_dict()
    for name, value in small_sd.items():
        if name != key:
            assert torch.equal(value, large_sd[name]), name
    table = large_sd[key].reshape(-1, 32)
    assert table.shape[0] == 64 + small.has_class_token
    if small.has_class_token:  # the class token's embedding is kept apart, unchanged
        assert torch.equal(table[0], small_sd[key].reshape(-1, 32)[0])


def test_resize_refuses_non_square_grids():
    with pytest.raises(ValueError, match="square patch grids"):
        resize_position_table(torch.zeros(12, 4), 16, has_class_token=False)
    same = torch.randn(17, 4)
    assert torch.equal(resize_position_table(same, 17, has_class_token=True), same)
