"""The backbones of ``model.vision.type=vit_hybrid``: DPT's hybrid embedding (a ViT on
the last feature map of a small convolutional network, Dosovitskiy et al. 2021) on
transformers' BiT, ResNet or FocalNet, chosen by ``model.vision.backbone``, with the
checks of the settings each one accepts. Built by vlmtrain.model.vision."""

from __future__ import annotations

from transformers import BitConfig, FocalNetConfig, PretrainedConfig, ResNetConfig

from vlmtrain.config import VisionConfig


def hybrid_backbone(cfg: VisionConfig) -> dict:
    """DPT hybrid's embedding: the backbone's last feature map, whose stride must be the
    patch size, projected to the ViT's width (DPT requires three feature maps)."""
    backbone, channels = BACKBONES[cfg.backbone or "bit"](cfg)
    grid = cfg.image_size // cfg.patch_size
    return dict(
        is_hybrid=True,
        backbone_config=backbone,
        backbone_featmap_shape=[1, channels, grid, grid],
    )


def _bit_backbone(cfg: VisionConfig) -> tuple[PretrainedConfig, int]:
    """A three-stage BiT whose output stride is the patch size: its stem (7x7 stride-2
    convolution, max-pool) and first stage work at 1/4 resolution, the second halves it,
    the third is dilated instead of strided where the patch grid is already reached, so
    a patch's features see its neighbours (what stem_blocks does for stem=conv). Each
    stage has ``stem_blocks`` bottleneck blocks, at least one."""
    h = cfg.hidden_size
    blocks = max(1, cfg.stem_blocks)
    backbone = BitConfig(
        embedding_size=h // 2,
        hidden_sizes=[h, 2 * h, 2 * h],
        depths=[blocks] * 3,
        layer_type="bottleneck",
        num_groups=8,
        output_stride=cfg.patch_size,
        out_features=["stage1", "stage2", "stage3"],
    )
    return backbone, 2 * h


def _resnet_backbone(cfg: VisionConfig) -> tuple[PretrainedConfig, int]:
    """A small BatchNorm ResNet of basic blocks (two 3x3 convolutions), as close to
    stem=conv as transformers' ResNet allows: its stem (7x7 stride-2 convolution,
    max-pool) reaches 1/4 resolution with hidden_size / 4 channels, one block at 1/4
    with hidden_size / 2, then each stage halves the resolution and doubles the
    channels up to hidden_size at the patch grid, where it has ``stem_blocks`` blocks
    (at least one), each widening a patch's view by two patches per side. BatchNorm
    keeps each image's colour, which GroupNorm over a small map normalizes away."""
    h = cfg.hidden_size
    stages = cfg.patch_size.bit_length() - 2  # one at 1/4, then one per halving
    backbone = ResNetConfig(
        embedding_size=h // 4,
        hidden_sizes=[h >> (stages - i) for i in range(1, stages + 1)],
        depths=[1] * (stages - 1) + [max(1, cfg.stem_blocks)],
        layer_type="basic",
        # DPT takes three maps; the last is the patch grid (the others feed DPT's
        # depth head, not the features).
        out_features=(["stem"] + [f"stage{i}" for i in range(1, stages + 1)])[-3:],
    )
    return backbone, h


def _focalnet_backbone(cfg: VisionConfig) -> tuple[PretrainedConfig, int]:
    """A small FocalNet (Yang et al. 2022), ConvNeXt's kin: a linear stride-4 patchify
    convolution and a LayerNorm, residual blocks that add
    a focal modulation (linear maps gated by depthwise 3x3 and 5x5 contexts) and an
    MLP to their input, and a LayerNorm'd linear 2x2 stride-2 convolution between
    stages: the residual stream from the pixels to the patch grid has no ReLU, max-pool or
    BatchNorm (what the resnet backbone's colour was thought to suffer from).
    One block of hidden_size / 2 at 1/4, then a stage per halving up to hidden_size at
    the patch grid, where it has ``stem_blocks`` blocks (at least one). From scratch:
    no drop path, no layer scale. (transformers' ConvNeXt would be the first choice,
    but a DPT around it breaks when Llava asks the tower for hidden states: its nested
    encoder's output hooks are installed twice and the feature maps misalign.)"""
    h = cfg.hidden_size
    stride = cfg.backbone_stride
    halvings = (cfg.patch_size // stride).bit_length() - 1  # after the patchify stem
    backbone = FocalNetConfig(
        image_size=cfg.image_size,
        patch_size=stride,
        use_conv_embed=cfg.backbone_overlap,
        embed_dim=h >> halvings,  # each stage's downsampling doubles it
        hidden_sizes=[h >> (halvings - 1 - i) for i in range(halvings)] + [h],
        depths=[1] * halvings + [max(1, cfg.stem_blocks)],
        drop_path_rate=0.0,
        use_layerscale=False,
        # DPT takes three maps; the last is the patch grid.
        out_features=(["stem"] + [f"stage{i}" for i in range(1, halvings + 2)])[-3:],
    )
    return backbone, h


BACKBONES = {"bit": _bit_backbone, "resnet": _resnet_backbone, "focalnet": _focalnet_backbone}


def check_hybrid(cfg: VisionConfig) -> None:
    kind = cfg.backbone or "bit"
    if kind not in BACKBONES:
        raise ValueError(
            f"model.vision.backbone={cfg.backbone!r}: expected one of {sorted(BACKBONES)}"
        )
    if cfg.stem != "patch":
        raise ValueError(
            f"model.vision.stem={cfg.stem!r}: model.vision.type=vit_hybrid has its own "
            f"convolutional stem (model.vision.backbone={kind}); leave stem=patch"
        )
    if cfg.stem_blocks < 0:
        raise ValueError(f"model.vision.stem_blocks={cfg.stem_blocks}: expected a count >= 0")
    p = cfg.patch_size
    if kind == "bit" and p not in (4, 8, 16):
        raise ValueError(
            "model.vision.type=vit_hybrid: the BiT stem reaches stride 4 and its stages at "
            f"most 16, so model.vision.patch_size must be 4, 8 or 16, not {p}"
        )
    if kind == "resnet" and (p < 8 or p & (p - 1)):
        raise ValueError(
            "model.vision.backbone=resnet: its stem reaches stride 4, each stage after the "
            "first halves it and DPT takes three feature maps, so model.vision.patch_size "
            f"must be a power of two >= 8, not {p}"
        )
    if kind == "focalnet":
        _check_focalnet(cfg)
    else:
        _check_not_focalnet(cfg, kind)
    if kind == "bit" and cfg.hidden_size % 32:
        raise ValueError(
            f"model.vision.hidden_size={cfg.hidden_size}: vit_hybrid's BiT uses 8 norm "
            "groups on bottlenecks of hidden_size / 4 channels, so it must be a multiple of 32"
        )
    divisor = max(4, p // 4)
    if kind == "resnet" and cfg.hidden_size % divisor:
        raise ValueError(
            f"model.vision.hidden_size={cfg.hidden_size}: the resnet backbone halves the "
            "channels per stage down to its stem's hidden_size / 4, so it must be a "
            f"multiple of {divisor}"
        )


def _check_not_focalnet(cfg: VisionConfig, kind: str) -> None:
    for key, default in (("backbone_stride", 4), ("backbone_overlap", False)):
        if getattr(cfg, key) != default:
            raise ValueError(
                f"model.vision.{key}={getattr(cfg, key)!r} is a setting of "
                f"model.vision.backbone=focalnet, not of backbone={kind}"
            )


def _check_focalnet(cfg: VisionConfig) -> None:
    p, stride = cfg.patch_size, cfg.backbone_stride
    if stride not in (2, 4):
        raise ValueError(f"model.vision.backbone_stride={stride}: expected 2 or 4")
    if cfg.backbone_overlap and stride != 4:
        raise ValueError(
            "model.vision.backbone_overlap=true: FocalNet's overlapping stem is a 7x7 "
            f"stride-4 convolution, so model.vision.backbone_stride must be 4, not {stride}"
        )
    if p < 2 * stride or p & (p - 1):
        raise ValueError(
            f"model.vision.backbone=focalnet: its stem reaches stride {stride} "
            "(model.vision.backbone_stride), each stage after the first halves it and DPT "
            "takes three feature maps, so model.vision.patch_size must be a power of two "
            f">= {2 * stride}, not {p}"
        )
    if cfg.hidden_size % (p // stride):
        raise ValueError(
            f"model.vision.hidden_size={cfg.hidden_size}: the focalnet backbone halves the "
            f"channels per stage down to hidden_size / (patch_size / {stride}) at its "
            f"stride-{stride} stem, so it must be a multiple of {p // stride}"
        )
