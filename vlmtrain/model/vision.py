"""Vision towers: transformers SigLIP / CLIP vision models, from a config or a local directory,
or (trained from scratch) a hybrid ViT whose patches come from a small convolutional
backbone (vlmtrain.model.hybrid).

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
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    DPTConfig,
    DPTModel,
    PretrainedConfig,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vlmtrain.config import VisionConfig
from vlmtrain.model.hybrid import check_hybrid, hybrid_backbone

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
        kwargs.update(hybrid_backbone(cfg))
    return config_cls(**kwargs)


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
        check_hybrid(cfg)
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
