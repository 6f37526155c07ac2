"""Vision towers: transformers SigLIP / CLIP vision models, from a config or a local directory,
or (trained from scratch) a hybrid ViT whose patches come from a small ResNet (BiT).

The tower is cut at the configured feature layer, so layers after it (and the
pooling head / post-layernorm, which the token features never pass through)
are neither computed nor left as unused parameters, which would break DDP.
Feature semantics follow transformers' Llava: the features of layer ``k`` are
``hidden_states[k]`` of the uncut tower, with the class token dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    BitConfig,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    DPTConfig,
    DPTModel,
    FocalNetConfig,
    PretrainedConfig,
    ResNetConfig,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vlmtrain.config import VisionConfig

# type -> (config class, model class, whether the sequence starts with a class token)
_TOWERS = {
    "siglip": (SiglipVisionConfig, SiglipVisionModel, False),
    "clip": (CLIPVisionConfig, CLIPVisionModel, True),
    # ViT-Hybrid (Dosovitskiy et al. 2021): a ViT on the feature map of a ResNet (BiT).
    # transformers holds it as DPT's hybrid embedding and ViT encoder, so Llava can too.
    "vit_hybrid": (DPTConfig, DPTModel, True),
}
# The attribute under which each config keeps how many layers the tower was cut to.
CUT_ATTR = "vlmtrain_feature_layers"


@dataclass(frozen=True)
class VisionSpec:
    """What the rest of the model needs to know about a tower's output."""

    hidden_size: int
    image_size: int
    patch_size: int
    has_class_token: bool

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class VisionTower(nn.Module):
    """Wraps a transformers vision model; ``forward`` returns patch features (B, N, D)."""

    def __init__(self, model: nn.Module, has_class_token: bool):
        super().__init__()
        self.model = model
        self.has_class_token = has_class_token

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    def spec(self) -> VisionSpec:
        c = self.config
        return VisionSpec(c.hidden_size, c.image_size, c.patch_size, self.has_class_token)

    def forward(
        self, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``attention_mask``: an additive (B, 1, S, S) mask over the tower's sequence
        (class token first when it has one), handed to every encoder layer; None is the
        tower's own bidirectional attention (e.g. AIM's prefix mask, vlmtrain.model.aim)."""
        extra = {} if attention_mask is None else {"attention_mask": attention_mask}
        hidden = self.model(pixel_values=pixel_values.to(self.model.dtype), **extra)
        hidden = hidden.last_hidden_state
        return hidden[:, 1:] if self.has_class_token else hidden


def _config_from_dims(cfg: VisionConfig) -> PretrainedConfig:
    config_cls, _, _ = _TOWERS[cfg.type]
    kwargs = dict(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
    )
    if cfg.type == "siglip":
        kwargs["vision_use_head"] = False
    if cfg.type == "vit_hybrid":
        kwargs.update(_hybrid_backbone(cfg))
    return config_cls(**kwargs)


def _hybrid_backbone(cfg: VisionConfig) -> dict:
    """DPT hybrid's embedding: the backbone's last feature map, whose stride must be the
    patch size, projected to the ViT's width (DPT requires three feature maps)."""
    backbone, channels = _BACKBONES[cfg.backbone or "bit"](cfg)
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
    halvings = cfg.patch_size.bit_length() - 3  # after the patchify stem's 1/4
    backbone = FocalNetConfig(
        image_size=cfg.image_size,
        patch_size=4,
        embed_dim=h >> halvings,  # each stage's downsampling doubles it
        hidden_sizes=[h >> (halvings - 1 - i) for i in range(halvings)] + [h],
        depths=[1] * halvings + [max(1, cfg.stem_blocks)],
        drop_path_rate=0.0,
        use_layerscale=False,
        # DPT takes three maps; the last is the patch grid.
        out_features=(["stem"] + [f"stage{i}" for i in range(1, halvings + 2)])[-3:],
    )
    return backbone, h


_BACKBONES = {"bit": _bit_backbone, "resnet": _resnet_backbone, "focalnet": _focalnet_backbone}


def _cut(model: nn.Module, feature_layer: int) -> None:
    """Keep the layers up to ``feature_layer`` (Llava's hidden_states index) and drop the rest."""
    encoder = model.encoder
    attr = "layers" if hasattr(encoder, "layers") else "layer"  # ViT-style encoders: .layer
    layers = getattr(encoder, attr)
    total = len(layers)
    # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i.
    keep = feature_layer if feature_layer >= 0 else total + 1 + feature_layer
    if not 1 <= keep <= total:
        raise ValueError(
            f"model.vision.feature_layer={feature_layer} is out of range for a tower with {total} layers"
        )
    setattr(encoder, attr, nn.ModuleList(list(layers)[:keep]))
    model.config.num_hidden_layers = keep
    setattr(model.config, CUT_ATTR, keep)
    # Token features skip the post-layernorm (Llava reads hidden_states) and the pooling head.
    if hasattr(model, "post_layernorm"):
        model.post_layernorm = nn.Identity()
    else:  # ViT-style: the final norm is .layernorm
        model.layernorm = nn.Identity()
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    if getattr(model, "head", None) is not None:
        model.head = None
        model.use_head = False
        model.config.vision_use_head = False
    # FocalNet's final norm only feeds its own pooled output, never the maps DPT reads.
    backbone = getattr(model.embeddings, "backbone", None)
    if hasattr(backbone, "focalnet"):
        backbone.focalnet.layernorm = nn.Identity()


def build_vision_tower(
    cfg: VisionConfig,
    *,
    device: str | torch.device | None = None,
    config: PretrainedConfig | None = None,
) -> VisionTower:
    """Build a tower from dimensions (random init) or load it from ``cfg.path``; with
    ``config`` (a tower an artifact stored, already cut), build that architecture."""
    if cfg.type not in _TOWERS:
        raise ValueError(f"model.vision.type={cfg.type!r}: expected one of {sorted(_TOWERS)}")
    config_cls, model_cls, has_cls = _TOWERS[cfg.type]
    _check_stem(cfg)
    if config is not None:
        with torch.device(device or "cpu"):
            model = _instantiate(model_cls, config)
        _cut(model, getattr(config, CUT_ATTR, config.num_hidden_layers))
        return VisionTower(model, has_cls)
    if cfg.path and str(device) != "meta":
        model = model_cls.from_pretrained(cfg.path, local_files_only=True)
    else:
        # On the meta device (planning), a pretrained path contributes only its config.
        config = (
            config_cls.from_pretrained(cfg.path, local_files_only=True)
            if cfg.path
            else _config_from_dims(cfg)
        )
        with torch.device(device or "cpu"):
            model = _instantiate(model_cls, config)
            if cfg.stem == "conv":
                model.embeddings.patch_embedding = ConvPatchEmbedding(
                    config.patch_size, config.hidden_size, cfg.stem_blocks
                )
    _cut(model, cfg.feature_layer)
    return VisionTower(model, has_cls)


def _instantiate(model_cls, config: PretrainedConfig) -> nn.Module:
    # DPT's pooling head reads the class token, never the patch features: not built.
    return (
        model_cls(config, add_pooling_layer=False) if model_cls is DPTModel else model_cls(config)
    )


class ConvPatchEmbedding(nn.Module):
    """Patch embedding with a convolutional stem beside the linear one (towers from scratch).

    A ViT trained from scratch on little data learns no local shape: on the shapes
    world, a linear probe reads an object's shape from its patch features no better
    than from raw pixels. Stride-2 3x3 convolutions (Xiao et al. 2021, "Early
    convolutions help transformers see better") are translation-equivariant inside
    the patch, so corners and curves are features at any offset. ``blocks`` residual
    3x3 convolutions on the patch grid then widen each patch's view by one patch per
    side per block, so a patch inside a large object sees its outline (hybrid ViTs,
    Dosovitskiy et al. 2021). The linear patch projection is kept and added: without
    it, colour answers got worse.
    Drop-in for the Conv2d of SigLIP/CLIP embeddings, which read ``.weight.dtype``.
    """

    def __init__(self, patch_size: int, hidden_size: int, blocks: int = 0):
        super().__init__()
        depth = patch_size.bit_length() - 1  # log2: one stride-2 conv per halving
        layers: list[nn.Module] = []
        channels = 3
        for i in range(depth):
            # Channels double as the resolution halves, ending at hidden_size, so the convs
            # after the first cost about the same (32-64-64 cost twice as much as 16-32-64).
            out = max(1, hidden_size >> (depth - 1 - i))
            layers.append(nn.Conv2d(channels, out, 3, stride=2, padding=1))
            if i < depth - 1:
                layers.append(nn.GELU())
            channels = out
        self.conv = nn.Sequential(*layers)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.GELU(), nn.Conv2d(hidden_size, hidden_size, 3, padding=1))
            for _ in range(blocks)
        )
        self.linear = nn.Conv2d(3, hidden_size, patch_size, stride=patch_size)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.conv(pixel_values)
        for block in self.blocks:
            x = x + block(x)
        return x + self.linear(pixel_values)


def _check_stem(cfg: VisionConfig) -> None:
    if cfg.type == "vit_hybrid":
        _check_hybrid(cfg)
        return
    if cfg.backbone is not None:
        raise ValueError(
            f"model.vision.backbone={cfg.backbone!r} chooses the ResNet of "
            f"model.vision.type=vit_hybrid, not of type={cfg.type!r}; leave it null"
        )
    if cfg.stem not in ("patch", "conv"):
        raise ValueError(f"model.vision.stem={cfg.stem!r}: expected 'patch' or 'conv'")
    if cfg.stem == "conv" and cfg.path:
        raise ValueError(
            "model.vision.stem=conv replaces the patch embedding, so the pretrained tower "
            f"at model.vision.path={cfg.path!r} cannot keep its own; use stem=patch"
        )
    if cfg.stem_blocks < 0 or (cfg.stem_blocks and cfg.stem != "conv"):
        raise ValueError(
            f"model.vision.stem_blocks={cfg.stem_blocks}: a count >= 0 of convolutions "
            "added to stem=conv"
            + (f", but model.vision.stem={cfg.stem!r}" if cfg.stem != "conv" else "")
        )
    p = cfg.patch_size
    if cfg.stem == "conv" and (p < 2 or p & (p - 1)):
        raise ValueError(
            f"model.vision.stem=conv halves the image per convolution, so "
            f"model.vision.patch_size must be a power of two >= 2, not {p}"
        )


def _check_hybrid(cfg: VisionConfig) -> None:
    kind = cfg.backbone or "bit"
    if kind not in _BACKBONES:
        raise ValueError(
            f"model.vision.backbone={cfg.backbone!r}: expected one of {sorted(_BACKBONES)}"
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
    if kind in ("resnet", "focalnet") and (p < 8 or p & (p - 1)):
        raise ValueError(
            f"model.vision.backbone={kind}: its stem reaches stride 4, each stage after the "
            "first halves it and DPT takes three feature maps, so model.vision.patch_size "
            f"must be a power of two >= 8, not {p}"
        )
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
    if kind == "focalnet" and cfg.hidden_size % (p // 4):
        raise ValueError(
            f"model.vision.hidden_size={cfg.hidden_size}: the focalnet backbone halves the "
            "channels per stage down to hidden_size / (patch_size / 4) at its stride-4 "
            f"stem, so it must be a multiple of {p // 4}"
        )


def vision_config_class(cfg: VisionConfig) -> type[PretrainedConfig]:
    return _TOWERS[cfg.type][0]


def image_processor_class(cfg: VisionConfig):
    return CLIPImageProcessorPil if cfg.type == "clip" else SiglipImageProcessorPil


def build_image_processor(cfg: VisionConfig, spec: VisionSpec):
    """The transformers PIL image processor matching the tower (no torchvision needed)."""
    size = spec.image_size
    if cfg.type != "clip":  # SigLIP's: resize to the square, scale to [-1, 1]
        kwargs = dict(size={"height": size, "width": size})
        cls = SiglipImageProcessorPil
    else:
        kwargs = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        cls = CLIPImageProcessorPil
    if cfg.path:
        try:
            return cls.from_pretrained(cfg.path, local_files_only=True, **kwargs)
        except OSError:
            pass  # a tower directory without preprocessor_config.json: use the defaults
    return cls(**kwargs)
