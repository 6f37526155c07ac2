"""AIMv2 pieces (Fini et al. 2024): the encoder's prefix attention, the regression
targets, the causal multimodal decoder and the two loss sums.

The sequence is the image's patches, then a BOS and the caption. The vision tower
runs with prefix attention (a random prefix of M patches sees itself
bidirectionally, every later patch sees the prefix and the patches before it);
the decoder is causal over [image features, BOS, caption]. Its output at image
position i regresses patch i+1 (per-patch normalized pixels), supervised only for
patches i+1 >= M: the features of earlier positions saw the whole prefix, so
their next patch would leak. Its output at caption position t predicts token t+1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaModel
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from vlmtrain.config import AimConfig
from vlmtrain.data.chat import IGNORE_INDEX

PATCH_NORM_EPS = 1e-6


def sample_prefix_lengths(
    batch: int, patches: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(batch,) prefix lengths M, uniform over [1, patches - 1]: at least one patch in
    the prefix and at least one regressed."""
    if patches < 2:
        raise ValueError(f"AIM needs at least 2 patches per image, the tower gives {patches}")
    return torch.randint(1, patches, (batch,), generator=generator)


def prefix_allowed(prefix_lengths: torch.Tensor, patches: int) -> torch.Tensor:
    """(B, N, N) bool: query patch i may attend key patch j iff j <= i or j < M."""
    i = torch.arange(patches, device=prefix_lengths.device)[:, None]
    j = torch.arange(patches, device=prefix_lengths.device)[None, :]
    return (j <= i)[None] | (j[None] < prefix_lengths[:, None, None])


def prefix_attention_mask(
    prefix_lengths: torch.Tensor,
    patches: int,
    class_token: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The additive (B, 1, S, S) mask for the tower's encoder (0 allowed, the dtype's
    minimum elsewhere). A class token (CLIP) counts as part of every prefix: every patch
    sees it and it sees the prefix only."""
    # With the class token first and counted in the prefix, the same rule holds over S.
    extra = int(class_token)
    allowed = prefix_allowed(prefix_lengths + extra, patches + extra)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, 3 * p * p): patches in the order of the towers' patch
    embedding (a stride-p convolution, flattened row by row), each patch's values in
    (channel, row, column) order."""
    b, c, h, w = pixel_values.shape
    p = patch_size
    grid = pixel_values.reshape(b, c, h // p, p, w // p, p)
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def normalize_patches(patches: torch.Tensor, eps: float = PATCH_NORM_EPS) -> torch.Tensor:
    """Each patch minus the mean of its values, over sqrt(their variance + eps)."""
    mean = patches.mean(-1, keepdim=True)
    var = patches.var(-1, keepdim=True, unbiased=False)
    return (patches - mean) / torch.sqrt(var + eps)


def image_loss_sum(
    predicted: torch.Tensor,
    pixel_values: torch.Tensor,
    prefix_lengths: torch.Tensor,
    patch_size: int,
) -> tuple[torch.Tensor, int]:
    """(sum of squared errors, number of regressed values). ``predicted`` (B, N, 3p^2) is
    the decoder's output at each image position; position i regresses patch i+1, and
    only patches at or after the prefix length count."""
    targets = normalize_patches(patchify(pixel_values.float(), patch_size))
    n = targets.shape[1]
    regressed = torch.arange(1, n, device=targets.device)[None] >= prefix_lengths[:, None]
    errors = (predicted[:, :-1].float() - targets[:, 1:]) ** 2
    kept = errors[regressed]  # (K, 3p^2): the prefix's targets never enter the graph
    return kept.sum(), kept.numel()


def text_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy, supervised tokens): position t predicts labels[t + 1]."""
    targets = labels[:, 1:]
    at = targets != IGNORE_INDEX
    ce = F.cross_entropy(logits[:, :-1][at].float(), targets[at], reduction="sum")
    return ce, int(at.sum())


def _intermediate(cfg: AimConfig) -> int:
    if cfg.decoder_intermediate_size:
        return cfg.decoder_intermediate_size
    return -(-8 * cfg.decoder_hidden_size // 3 // 8) * 8


class AimDecoder(nn.Module):
    """One causal decoder (Llama blocks: RMSNorm, SwiGLU, no bias) over [image features,
    BOS, caption]. Image features are normalized and linearly projected to its width;
    caption tokens are embedded at its width by its own table (a linear map of one-hot
    tokens, i.e. the projected text embedding). Two heads: normalized pixels of the
    next patch, and the next caption token."""

    def __init__(
        self, cfg: AimConfig, vision_width: int, patch_dim: int, vocab_size: int, positions: int
    ):
        super().__init__()
        width = cfg.decoder_hidden_size
        if width % cfg.decoder_heads:
            raise ValueError(
                f"stage.aim.decoder_hidden_size={width} is not a multiple of "
                f"stage.aim.decoder_heads={cfg.decoder_heads}"
            )
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=_intermediate(cfg),
            num_hidden_layers=cfg.decoder_layers,
            num_attention_heads=cfg.decoder_heads,
            num_key_value_heads=cfg.decoder_heads,
            max_position_embeddings=positions,
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
        )
        self.trunk = LlamaModel(config)
        self.image_norm = LlamaRMSNorm(vision_width)
        self.image_in = nn.Linear(vision_width, width, bias=False)
        self.pixel_head = nn.Linear(width, patch_dim, bias=False)
        self.text_head = nn.Linear(width, vocab_size, bias=False)
        # The caption's first position: a learned start embedding, whatever the tokenizer.
        self.bos = nn.Parameter(torch.randn(width) * config.initializer_range)

    def forward(
        self, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, N, D_vision), caption ids and mask (B, T), right-padded, position 0
        the BOS (whose id is not read) -> pixel predictions (B, N, 3p^2) and caption
        logits (B, T, V)."""
        n = features.shape[1]
        image = self.image_in(self.image_norm(features))
        text = self.trunk.get_input_embeddings()(input_ids[:, 1:])
        text = torch.cat([self.bos.expand(len(input_ids), 1, -1).to(text.dtype), text], 1)
        mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], n), attention_mask], 1)
        hidden = self.trunk(
            inputs_embeds=torch.cat([image, text.to(image.dtype)], 1), attention_mask=mask
        ).last_hidden_state
        return self.pixel_head(hidden[:, :n]), self.text_head(hidden[:, n:])


def random_resized_crop(
    pixels: torch.Tensor,
    scale: tuple[float, float],
    generator: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Inception-style crop per image (B, C, H, W), resized back to H x W (bilinear): a
    crop of ``scale`` x the image's area and an aspect ratio in ``ratio`` (log-uniform),
    at a uniform position; the paper's augmentation for AIM pretraining. Applied to the
    normalized pixels (resizing is linear, so it commutes with the normalization)."""
    b, _, h, w = pixels.shape
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=generator) * h * w
    log_ratio = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    crop_w = torch.sqrt(area * aspect).round().clamp(1, w).long()
    crop_h = torch.sqrt(area / aspect).round().clamp(1, h).long()
    u = torch.rand(b, 2, generator=generator)
    out = torch.empty_like(pixels)
    for k in range(b):
        top = int(u[k, 0] * (h - crop_h[k] + 1))
        left = int(u[k, 1] * (w - crop_w[k] + 1))
        crop = pixels[k : k + 1, :, top : top + crop_h[k], left : left + crop_w[k]]
        out[k] = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
    return out
