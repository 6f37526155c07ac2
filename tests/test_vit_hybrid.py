"""The hybrid tower (a ViT on a BiT or plain ResNet stem, transformers' DPT hybrid): a
convolutional stem that Llava can hold, so its models export (tests/test_export.py checks
the parity)."""

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
        ({"backbone": "vgg"}, r"model\.vision\.backbone='vgg': expected one of"),
        ({"backbone": "resnet", "patch_size": 4}, r"backbone=resnet.*power of two >= 8, not 4"),
        ({"backbone": "resnet", "hidden_size": 66}, r"hidden_size=66.*multiple of 4"),
        ({"backbone": "resnet", "stem": "conv"}, r"stem='conv'.*backbone=resnet"),
        ({"backbone": "focalnet", "patch_size": 12}, r"backbone=focalnet.*power of two >= 8"),
        ({"backbone": "focalnet", "patch_size": 16, "hidden_size": 66}, r"multiple of 4"),
        ({"backbone": "focalnet", "backbone_stride": 3}, r"backbone_stride=3: expected 2 or 4"),
        (
            {"backbone": "focalnet", "backbone_stride": 2, "backbone_overlap": True},
            r"backbone_overlap=true.*backbone_stride must be 4, not 2",
        ),
        (
            {"backbone": "focalnet", "backbone_stride": 2, "patch_size": 2},
            r"stride 2.*power of two >= 4, not 2",
        ),
        ({"backbone": "resnet", "backbone_stride": 2}, r"backbone_stride=2 is a setting of"),
        ({"backbone_overlap": True}, r"backbone_overlap=True is a setting of.*backbone=bit"),
    ],
)
def test_misconfigurations_name_the_key(fields, match):
    with pytest.raises(ValueError, match=match):
        build_vision_tower(VisionConfig(type="vit_hybrid", **fields))


def test_backbone_belongs_to_the_hybrid_tower_only():
    with pytest.raises(ValueError, match=r"model\.vision\.backbone='resnet'.*vit_hybrid"):
        build_vision_tower(VisionConfig(type="siglip", backbone="resnet"))


@pytest.mark.parametrize("patch_size, stages", [(8, 2), (16, 3)])
def test_resnet_backbone_reaches_the_patch_grid(patch_size, stages):
    """BatchNorm basic blocks: a stride-4 stem, then one stage per halving, the last
    (hidden_size channels, at the patch grid) with stem_blocks blocks; DPT's three maps."""
    torch.manual_seed(0)
    cfg = VisionConfig(type="vit_hybrid", backbone="resnet", patch_size=patch_size, stem_blocks=2)
    tower = build_vision_tower(cfg)
    resnet = tower.model.embeddings.backbone
    assert type(resnet).__name__ == "ResNetBackbone"
    assert [len(s.layers) for s in resnet.encoder.stages] == [1] * (stages - 1) + [2]
    assert resnet.channels[-1] == cfg.hidden_size and len(resnet.channels) == 3
    pix = torch.randn(4, 3, 64, 64)
    grid = 64 // patch_size
    assert resnet(pix).feature_maps[-1].shape == (4, cfg.hidden_size, grid, grid)
    out = tower(pix)
    assert out.shape == (4, grid * grid, cfg.hidden_size) == (4, tower.spec().tokens_per_image, 64)
    out.square().mean().backward()
    for name, p in tower.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_aim_refuses_it(compose):
    """AIM masks the tower's attention to a prefix; DPT's encoder takes no mask."""
    from vlmtrain.plan import plan_recipe

    with pytest.raises(ValueError, match=r"objective=aim.*vit_hybrid.*no attention mask"):
        plan_recipe(
            compose("recipe=tiny_aim", "model.vision.type=vit_hybrid", "model.vision.stem=patch")
        )


def test_focalnet_backbone_reaches_the_patch_grid_and_gives_llava_its_hidden_states():
    """A stride-4 linear patchify stem, one block of hidden/2 at 1/4, stem_blocks blocks
    of hidden at the patch grid, no drop path; its unused final norm is dropped, so every
    weight learns; and it survives what Llava does: asking the tower for hidden states."""
    torch.manual_seed(0)
    cfg = VisionConfig(type="vit_hybrid", backbone="focalnet", stem_blocks=2)
    tower = build_vision_tower(cfg)
    focalnet = tower.model.embeddings.backbone
    assert type(focalnet).__name__ == "FocalNetBackbone"
    assert focalnet.focalnet.embeddings.patch_embeddings.projection.stride == (4, 4)
    assert [len(s.layers) for s in focalnet.focalnet.encoder.stages] == [1, 2]
    assert focalnet.channels == [32, 64, 64]
    layers = [layer for s in focalnet.focalnet.encoder.stages for layer in s.layers]
    assert all(isinstance(layer.drop_path, torch.nn.Identity) for layer in layers)
    pix = torch.randn(4, 3, 64, 64)
    out = tower(pix)
    assert out.shape == (4, 64, 64) == (4, tower.spec().tokens_per_image, cfg.hidden_size)
    with torch.no_grad():
        hidden = tower.model(pix, output_hidden_states=True).hidden_states
    assert torch.equal(hidden[-1][:, 1:], out.detach())
    out.square().mean().backward()
    for name, p in tower.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "fields, kernel, stride, stages, channels",
    [
        ({"backbone_stride": 2}, 2, 2, [1, 1, 1], [32, 64, 64]),
        ({"backbone_overlap": True}, 7, 4, [1, 1], [32, 64, 64]),
    ],
)
def test_focalnet_stem_stride_and_overlap(fields, kernel, stride, stages, channels):
    """backbone_stride=2 adds a stage at 1/2 (16 channels); backbone_overlap is FocalNet's
    use_conv_embed: a 7x7 stride-4 stem and 3x3 stride-2 downsamplings."""
    cfg = VisionConfig(type="vit_hybrid", backbone="focalnet", stem_blocks=1, **fields)
    tower = build_vision_tower(cfg)
    focalnet = tower.model.embeddings.backbone.focalnet
    stem = focalnet.embeddings.patch_embeddings.projection
    assert (stem.kernel_size, stem.stride) == ((kernel, kernel), (stride, stride))
    assert [len(s.layers) for s in focalnet.encoder.stages] == stages
    assert focalnet.encoder.stages[0].layers[0].modulation.projection_in.in_features == (
        cfg.hidden_size * stride // cfg.patch_size
    )
    assert tower.model.embeddings.backbone.channels == channels
    assert tower(torch.randn(2, 3, 64, 64)).shape == (2, 64, 64)


def test_a_frozen_batchnorm_tower_leaves_its_stage_unchanged(shapes_root, tmp_path):
    """A frozen tower runs in eval mode while the projector trains: the ResNet stem's
    BatchNorm statistics would otherwise follow every batch, and the "frozen" tower
    would leave the stage other than it came in."""
    from safetensors.torch import load_file
    from test_cli import base_args, vlmtrain

    args = [
        *base_args(shapes_root, tmp_path),
        "stage=align",
        "stage.max_steps=2",
        "model.vision.type=vit_hybrid",
        "model.vision.backbone=resnet",
        "model.vision.stem_blocks=1",
    ]
    vlmtrain([*args, "run_name=warm", "stage.trainable.vision=true"], cwd=tmp_path)
    warm = tmp_path / "warm" / "align" / "artifact"
    vlmtrain([*args, "run_name=frozen", f"stage.init.vision={warm}"], cwd=tmp_path)
    before = load_file(str(warm / "vision.safetensors"))
    after = load_file(str(tmp_path / "frozen" / "align" / "artifact" / "vision.safetensors"))
    assert any("running_mean" in k for k in after)
    assert sorted(before) == sorted(after)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
