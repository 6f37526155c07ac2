"""objective=aim: AIMv2 generative pretraining of the vision tower (vlmtrain.model.aim).

Samples are image-caption pairs from the usual readers (a LLaVA caption JSON: the
image and the assistant's answer). The tower runs with a prefix mask drawn per
sample; a causal decoder regresses the patches after the prefix and predicts the
caption. Loss = L_text + alpha * L_image, each a mean over the whole step (all
micro-batches and ranks): caption tokens for L_text, regressed pixel values for
L_image, so how a batch is split never changes the loss or the gradient.

The LM and projector of the model are not used; the stage trains the tower and the
decoder. The artifact's ``vision`` is a normal tower (later stages use it with full
attention); the decoder is kept beside it as ``decoder.safetensors``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from vlmtrain.config import StageConfig
from vlmtrain.data.chat import IGNORE_INDEX
from vlmtrain.data.images import ImageProcessor
from vlmtrain.data.samples import DataError
from vlmtrain.model.aim import (
    AimDecoder,
    image_loss_sum,
    prefix_attention_mask,
    random_resized_crop,
    sample_prefix_lengths,
    text_loss_sum,
)
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.objectives.common import StageModule
from vlmtrain.objectives.next_token import micro_batches
from vlmtrain.objectives.registry import Objective


@dataclass
class CaptionEncoder:
    """A sample -> one image's pixels and [BOS, caption tokens (, EOS)], only the caption
    supervised. The caption is the sample's last assistant turn. Position 0 holds the
    tokenizer's BOS id (or its pad id: chat tokenizers often have no BOS); the decoder
    replaces it with its own learned BOS embedding either way."""

    tokenizer: PreTrainedTokenizerBase
    images: ImageProcessor
    max_caption_tokens: int

    def caption(self, sample: dict[str, Any]) -> str:
        sid, source = sample["id"], sample["source"]
        if len(sample["images"]) != 1:
            raise DataError(
                sid, source, f"AIM takes one image per sample, not {len(sample['images'])}"
            )
        answers = [m["content"] for m in sample["messages"] if m["role"] == "assistant"]
        if not answers or not answers[-1].strip():
            raise DataError(sid, source, "no caption (an assistant turn with text)")
        return answers[-1].strip()

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        sid, source = sample["id"], sample["source"]
        tokens = self.tokenizer(self.caption(sample), add_special_tokens=False)["input_ids"]
        truncated = len(tokens) > self.max_caption_tokens
        tokens = tokens[: self.max_caption_tokens]
        if not truncated and self.tokenizer.eos_token_id is not None:
            tokens = tokens + [self.tokenizer.eos_token_id]
        bos = self.tokenizer.bos_token_id
        bos = self.tokenizer.pad_token_id if bos is None else bos
        input_ids = torch.tensor([bos, *tokens], dtype=torch.long)
        labels = input_ids.clone()
        labels[0] = IGNORE_INDEX  # the BOS is input only
        image = self.images.load(sample["images"][0], sid, source)
        return {
            "id": sid,
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": self.images([image]),
            "truncated": truncated,
        }

    def length_hints(self, samples) -> list[int]:
        texts = [self.caption(s) for s in samples]
        counts = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [min(len(c), self.max_caption_tokens) + 2 for c in counts]


class AimModule(StageModule):
    def __init__(
        self, model: VisionLanguageModel, stage: StageConfig, decoder: AimDecoder, seed: int
    ):
        super().__init__(model, stage)
        self.decoder = decoder
        self.seed = seed
        self.alpha = stage.aim.alpha
        self._last_step_end: float | None = None
        self._val_sums: list[torch.Tensor] = []

    def optimized_components(self) -> dict[str, nn.Module]:
        return {**self.model.components(), "decoder": self.decoder}

    def artifact_extras(self) -> dict[str, nn.Module]:
        return {"decoder": self.decoder}

    def loss_sums(self, mb: dict, prefix_lengths: torch.Tensor):
        """(text CE sum, text tokens, image SE sum, regressed values) of a micro-batch."""
        tower, spec = self.model.vision_tower, self.model.vision_spec
        pixels = mb["pixel_values"]
        if pixels is None or pixels.shape[0] != mb["input_ids"].shape[0]:
            raise ValueError(f"AIM needs exactly one image per sample; batch {mb['ids']}")
        mask = prefix_attention_mask(
            prefix_lengths.to(pixels.device),
            spec.tokens_per_image,
            spec.has_class_token,
            tower.model.dtype,
        )
        features = tower(pixels, attention_mask=mask)
        predicted, logits = self.decoder(features, mb["input_ids"], mb["attention_mask"])
        text_sum, text_n = text_loss_sum(logits, mb["labels"])
        image_sum, image_n = image_loss_sum(
            predicted, pixels, prefix_lengths.to(pixels.device), spec.patch_size
        )
        return text_sum, text_n, image_sum, image_n

    def _step_counts(self, batch: dict, prefix_lengths: torch.Tensor) -> torch.Tensor:
        """[caption tokens, regressed values] of the whole step, over all ranks."""
        text = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        spec = self.model.vision_spec
        image = (spec.tokens_per_image - prefix_lengths).sum() * 3 * spec.patch_size**2
        counts = torch.stack([text, image]).float().to(self.device)
        return self.trainer.strategy.reduce(counts, reduce_op="sum")

    def training_step(self, batch: dict, batch_idx: int):
        step = self.global_step  # one batch is one optimizer step: Lightning's logging step
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        world = self.trainer.world_size
        n = batch["input_ids"].shape[0]
        # Drawn from (seed, step, rank) alone, not the global RNG (which a resumed run's
        # data loader also draws from): a resumed run draws the very same prefixes.
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + step) * 1_009 + self.global_rank
        )
        prefix_lengths = sample_prefix_lengths(
            n, self.model.vision_spec.tokens_per_image, generator
        )
        crop = self.stage.aim.crop_scale
        if crop is not None and batch["pixel_values"] is not None:  # same draws on resume
            batch = {
                **batch,
                "pixel_values": random_resized_crop(batch["pixel_values"], tuple(crop), generator),
            }
        text_total, image_total = self._step_counts(batch, prefix_lengths)
        if text_total == 0:
            raise RuntimeError(f"step {self.global_step}: no caption token in {batch['ids']}")
        sums = torch.zeros(2, device=self.device)
        size = self.stage.batch_size
        for k, mb in enumerate(micro_batches(batch, size)):
            text_sum, _, image_sum, _ = self.loss_sums(
                mb, prefix_lengths[k * size : (k + 1) * size]
            )
            loss = text_sum / text_total + self.alpha * image_sum / image_total
            self.manual_backward(loss * world)  # DDP averages over ranks
            sums += torch.stack([text_sum, image_sum]).detach()
        self.finish_step(optimizer, scheduler)

        text_sum, image_sum = self.trainer.strategy.reduce(sums, reduce_op="sum")
        text_loss, image_loss = text_sum / text_total, image_sum / image_total
        loss = text_loss + self.alpha * image_loss
        tokens = int(self.trainer.strategy.reduce(batch["attention_mask"].sum().float(), "sum"))
        tokens += n * world * self.model.vision_spec.tokens_per_image
        self.tokens_seen += tokens
        self._log_step(step, loss, text_loss, image_loss, optimizer, tokens, n * world)
        return loss

    def _log_step(
        self, step: int, loss, text_loss, image_loss, optimizer, tokens: int, samples: int
    ):
        now = time.perf_counter()
        dt = now - self._last_step_end if self._last_step_end is not None else None
        self._last_step_end = now
        self.log("train/loss", loss, prog_bar=True, logger=False, on_step=True, batch_size=1)
        if (step + 1) % self.trainer.log_every_n_steps:
            return
        metrics = {
            "train/loss": loss.item(),
            "train/loss_text": text_loss.item(),
            "train/loss_image": image_loss.item(),
        }
        self.log_row(step, metrics, optimizer, dt, tokens, samples)

    # -------------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int):
        # The same prefixes at every validation: a generator seeded by the batch.
        generator = torch.Generator().manual_seed(batch_idx)
        n = batch["input_ids"].shape[0]
        prefix_lengths = sample_prefix_lengths(
            n, self.model.vision_spec.tokens_per_image, generator
        )
        text_sum, text_n, image_sum, image_n = self.loss_sums(batch, prefix_lengths)
        self._val_sums.append(
            torch.tensor([text_sum.item(), text_n, image_sum.item(), image_n], device=self.device)
        )

    def on_validation_epoch_end(self) -> None:
        if not self._val_sums:
            return
        total = self.trainer.strategy.reduce(torch.stack(self._val_sums).sum(0), reduce_op="sum")
        self._val_sums.clear()
        text, image = total[0] / total[1], total[2] / total[3]
        self.log("val/loss_text", text, batch_size=1)
        self.log("val/loss_image", image, batch_size=1)
        self.log("val/loss", text + self.alpha * image, prog_bar=True, batch_size=1)


def build_decoder(cfg, spec, vocab_size: int, device=None) -> AimDecoder:
    positions = spec.tokens_per_image + cfg.stage.aim.caption_max_tokens + 2
    with torch.device(device or "cpu"):
        return AimDecoder(
            cfg.stage.aim, spec.hidden_size, 3 * spec.patch_size**2, vocab_size, positions
        )


def _check(cfg) -> None:
    stage = cfg.stage
    t = stage.trainable
    where = f"stage {stage.name!r}"
    if not t.vision:
        raise ValueError(
            f"{where}: objective=aim pretrains the tower; set stage.trainable.vision=true"
        )
    if t.lm or t.projector:
        raise ValueError(
            f"{where}: objective=aim reads neither the LM nor the projector (they would get "
            "no gradient); set stage.trainable.lm=false and stage.trainable.projector=false"
        )
    if cfg.model.vision.type == "vit_hybrid":
        raise ValueError(
            f"{where}: objective=aim masks the tower's attention to a prefix, and "
            "model.vision.type=vit_hybrid (transformers' DPT encoder) takes no attention "
            "mask; use a siglip or clip tower"
        )
    if stage.lora.enabled:
        raise ValueError(
            f"{where}: objective=aim trains no LM, so stage.lora.enabled must be false"
        )
    if stage.aim.alpha < 0 or stage.aim.caption_max_tokens < 1:
        raise ValueError(
            f"{where}: stage.aim.alpha must be >= 0 and stage.aim.caption_max_tokens >= 1"
        )
    crop = stage.aim.crop_scale
    if crop is not None and not (len(crop) == 2 and 0 < crop[0] <= crop[1] <= 1):
        raise ValueError(
            f"{where}: stage.aim.crop_scale={list(crop)} must be [low, high] in (0, 1]"
        )


def _build(cfg, model: VisionLanguageModel, tokenizer, encoder, stage_dir):
    from vlmtrain.data.module import StageDataModule

    captions = CaptionEncoder(tokenizer, encoder.images, cfg.stage.aim.caption_max_tokens)
    torch.manual_seed(cfg.seed)  # the decoder's initial weights follow the seed
    decoder = build_decoder(cfg, model.vision_spec, len(tokenizer))
    datamodule = StageDataModule(cfg.data, cfg.stage, captions, cfg.seed)
    return AimModule(model, cfg.stage, decoder, cfg.seed), datamodule


def decoder_parameters(cfg, spec, vocab_size: int) -> int:
    return sum(p.numel() for p in build_decoder(cfg, spec, vocab_size, "meta").parameters())


def _extra_memory(cfg, counts, bytes_per_param: int) -> dict[str, float]:
    """The decoder trains: its weights, gradients, AdamW's two fp32 moments, and the
    activations of its sequence (image patches + BOS + caption), never checkpointed."""
    from vlmtrain.model.vision import VisionSpec

    v = cfg.model.vision
    if v.path:
        from vlmtrain.model.vision import vision_config_class

        c = vision_config_class(v).from_pretrained(v.path, local_files_only=True)
        spec = VisionSpec(c.hidden_size, c.image_size, c.patch_size, v.type == "clip")
    else:
        spec = VisionSpec(v.hidden_size, v.image_size, v.patch_size, v.type == "clip")
    from vlmtrain.plan import _tokenizer_or_none

    tokenizer = _tokenizer_or_none(cfg)
    vocab = len(tokenizer) if tokenizer is not None else cfg.model.lm.vocab_size + 1
    params = decoder_parameters(cfg, spec, vocab)
    aim = cfg.stage.aim
    tokens = cfg.stage.batch_size * (spec.tokens_per_image + aim.caption_max_tokens + 1)
    # ~34 bytes x width per token per layer in 16 bits, twice that in fp32 (as plan.py).
    act_b = 34 * (2 if bytes_per_param == 4 else 1)
    activations = tokens * aim.decoder_hidden_size * aim.decoder_layers * act_b
    return {
        "decoder": params * (2 * bytes_per_param + 8) + activations,
    }


# The LM never runs in an aim stage (sequences_per_sample=0): the plan counts the tower
# and, through extra_memory, the decoder.
OBJECTIVE = Objective(
    build=_build, check=_check, sequences_per_sample=0, extra_memory=_extra_memory
)
