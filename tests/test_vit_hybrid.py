"""The hybrid tower (a ViT on a BiT ResNet stem, transformers' DPT hybrid): a convolutional
stem that Llava can hold, so its models export (tests/test_export.py checks the parity)."""

from __future__ import annotations

import pytest
import torch
from transformers import DPTModel

from vlmtrain.config import VisionConfig
from vlmtrain.model.vision import build_vision_tower

HYBRID = dict(type="vit_hybrid", stem_blocks=2, num_hidden_layers=3)


def test_features_are_the_uncut_dpt_models_hidden_states_without_class_token():
    """Llava reads hidden_states[k][:, 1:] of a plain DPTModel: the tower gives exactly that."""
    torch.manual_seed(0)
    tower = build_vision_tower(VisionConfig(feature_layer=-2, **HYBRID)).eval()
    assert len(tower.model.encoder.layer) == 2 and tower.model.pooler is None
    ref = DPTModel(build_vision_tower(VisionConfig(**HYBRID)).config).eval()
    result = ref.load_state_dict(tower.model.state_dict(), strict=False)
    # Only what the cut dropped: the third layer, the final norm, the pooling head.
    assert {k.split(".")[0] for k in result.missing_keys} <= {"encoder", "layernorm", "pooler"}
    pix = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref(pix, output_hidden_states=True).hidden_states[2][:, 1:]
        got = tower(pix)
    assert got.shape == (2, 64, 64)  # the BiT's output stride is the patch size: 8x8 tokens
    assert torch.equal(got, expected)


def test_every_stem_weight_learns():
    tower = build_vision_tower(VisionConfig(**HYBRID))
    backbone = tower.model.embeddings.backbone
    assert [len(s.layers) for s in backbone.bit.encoder.stages] == [2, 2, 2]
    tower(torch.randn(2, 3, 64, 64)).square().mean().backward()
    for name, p in tower.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"stem": "conv"}, r"model\.vision\.stem='conv'.*vit_hybrid has its own"),
        ({"patch_size": 32}, r"patch_size must be 4, 8 or 16, not 32"),
        ({"hidden_size": 48}, r"model\.vision\.hidden_size=48.*multiple of 32"),
        ({"stem_blocks": -1}, r"model\.vision\.stem_blocks=-1"),
    ],
)
def test_misconfigurations_name_the_key(fields, match):
    with pytest.raises(ValueError, match=match):
        build_vision_tower(VisionConfig(type="vit_hybrid", **fields))


def test_aim_refuses_it(compose):
    """AIM masks the tower's attention to a prefix; DPT's encoder takes no mask."""
    from vlmtrain.plan import plan_recipe

    with pytest.raises(ValueError, match=r"objective=aim.*vit_hybrid.*no attention mask"):
        plan_recipe(
            compose("recipe=tiny_aim", "model.vision.type=vit_hybrid", "model.vision.stem=patch")
        )
