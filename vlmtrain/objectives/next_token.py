"""Next-token prediction: the objective behind lm_pretrain, align, multitask and SFT stages.

One dataloader batch is one optimizer step for this rank; the module splits it
into micro-batches itself (manual optimization) so that the loss is normalized
by the total weight of the supervised tokens of the whole step (one per token by
default; see ``stage.loss_reduction``), across micro-batches and ranks: how a
batch is split never changes the loss or the gradient.
"""

from __future__ import annotations

import random
import time

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from vlmtrain.config import StageConfig
from vlmtrain.data.chat import IGNORE_INDEX
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.objectives.optim import build_optimizer, param_groups, warmup_cosine

# stage.loss_reduction -> exponent p: a token of a sample with x supervised tokens weighs x^-p.
REDUCTION_EXPONENTS = {"token": 0.0, "square": 0.5, "sample": 1.0}


def reduction_exponent(name: str) -> float:
    if name not in REDUCTION_EXPONENTS:
        raise ValueError(
            f"stage.loss_reduction={name!r}; expected one of {sorted(REDUCTION_EXPONENTS)}"
        )
    return REDUCTION_EXPONENTS[name]


def supervised_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, L-1) mask: position t predicts a supervised token t+1."""
    return labels[:, 1:] != IGNORE_INDEX


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """The same mask over all L positions (the last predicts nothing): where logits matter."""
    return F.pad(supervised_targets(labels), (0, 1), value=False)


def token_weights(labels: torch.Tensor, exponent: float = 0.0) -> torch.Tensor:
    """Weight of each position's next-token loss: 0 where unsupervised, x^-exponent
    elsewhere (x: the sample's supervised tokens). Depends on the sample alone, so
    micro-batches can compute it themselves."""
    supervised = supervised_targets(labels).float()
    if exponent == 0.0:
        return supervised
    per_sample = supervised.sum(1, keepdim=True).clamp(min=1.0)
    return supervised * per_sample.pow(-exponent)


def sample_loss_sums(logits: torch.Tensor, labels: torch.Tensor, exponent: float = 0.0):
    """(B,) per sample: the weighted sum of the cross-entropy of each position predicting
    the next supervised token. ``logits`` are (B, L, V), or (N, V) at
    ``supervised_positions(labels)`` only."""
    at = supervised_targets(labels)
    if logits.dim() == 3:
        logits = logits[:, :-1][at]
    ce = F.cross_entropy(logits.float(), labels[:, 1:][at], reduction="none")
    rows = at.nonzero()[:, 0]  # the sample of each supervised position, in ``at`` order
    sums = torch.zeros(labels.shape[0], dtype=ce.dtype, device=ce.device)
    return sums.index_add(0, rows, ce * token_weights(labels, exponent)[at])


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, exponent: float = 0.0):
    """The batch's weighted cross-entropy sum (see ``sample_loss_sums``)."""
    return sample_loss_sums(logits, labels, exponent).sum()


def loss_normalizer(labels: torch.Tensor, exponent: float = 0.0) -> torch.Tensor:
    """The total weight ``token_loss_sum`` is divided by: supervised tokens for "token",
    samples for "sample"."""
    return token_weights(labels, exponent).sum()


def micro_batches(batch: dict, size: int):
    """Split a step batch into micro-batches of ``size`` samples, images following their samples."""
    n = batch["input_ids"].shape[0]
    counts = batch["image_counts"]
    image_start = torch.cumsum(torch.cat([counts.new_zeros(1), counts]), 0)
    for lo in range(0, n, size):
        hi = min(n, lo + size)
        pixels = batch["pixel_values"]
        if pixels is not None:
            pixels = pixels[image_start[lo] : image_start[hi]]
            pixels = pixels if pixels.shape[0] else None
        yield {
            "datasets": batch.get("datasets", [None] * n)[lo:hi],
            "input_ids": batch["input_ids"][lo:hi],
            "labels": batch["labels"][lo:hi],
            "attention_mask": batch["attention_mask"][lo:hi],
            "pixel_values": pixels,
        }


class NextTokenModule(L.LightningModule):
    def __init__(self, model: VisionLanguageModel, stage: StageConfig):
        super().__init__()
        self.model = model
        self.stage = stage
        self.automatic_optimization = False
        self._last_step_end: float | None = None
        self._val_sums: list[torch.Tensor] = []
        self.tokens_seen = 0  # non-padding tokens (text + image) over all ranks
        self.exponent = reduction_exponent(stage.loss_reduction)
        # Per-dataset training loss, logged beside the total: which source is stuck.
        names = sorted(n for n, w in stage.mixture.items() if w > 0)
        self.dataset_index = {name: k for k, name in enumerate(names)}

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self):
        groups = param_groups(self.model.components(), self.stage.optim, self.stage.trainable)
        optimizer = build_optimizer(groups, self.stage.optim)
        factor = warmup_cosine(
            self.stage.max_steps, self.stage.optim.warmup_ratio, self.stage.optim.min_lr_ratio
        )
        scheduler = LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def training_step(self, batch: dict, batch_idx: int):
        step = self.global_step  # one batch is one optimizer step: Lightning's logging step
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        world = self.trainer.world_size
        # One all-reduce for both: the loss normalizer (total token weight of the step)
        # and all non-padding tokens (throughput).
        counts = torch.stack(
            [
                loss_normalizer(batch["labels"], self.exponent),
                batch["attention_mask"].sum().float(),
            ]
        )
        step_weight, all_tokens = self.trainer.strategy.reduce(counts, reduce_op="sum")
        if step_weight == 0:
            raise RuntimeError(
                f"step {self.global_step}: no supervised token in the batch {batch['ids']}"
            )
        # DDP averages gradients over ranks; scaling by world/step_weight makes the
        # result the weighted mean over the whole step.
        scale = world / step_weight
        loss_sum = torch.zeros((), device=self.device)
        # Row 0: weighted loss sums per dataset; row 1: their weights.
        by_dataset = torch.zeros(2, len(self.dataset_index), device=self.device)
        for mb in micro_batches(batch, self.stage.batch_size):
            logits = self.model(
                mb["input_ids"],
                mb["attention_mask"],
                mb["pixel_values"],
                logits_at=supervised_positions(mb["labels"]),
            )
            per_sample = sample_loss_sums(logits, mb["labels"], self.exponent)
            mb_loss = per_sample.sum()
            if mb["pixel_values"] is None and world > 1:
                mb_loss = mb_loss + self._touch_image_path()
            self.manual_backward(mb_loss * scale)
            loss_sum += mb_loss.detach()
            self._add_by_dataset(by_dataset, mb, per_sample.detach())

        if self.global_step == 0:
            self._check_every_trainable_has_grad()
        if self.stage.optim.grad_clip:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.stage.optim.grad_clip,
                gradient_clip_algorithm="norm",
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        loss = self.trainer.strategy.reduce(loss_sum, reduce_op="sum") / step_weight
        self.tokens_seen += int(all_tokens)
        self._log_step(step, loss, batch, optimizer, int(all_tokens), by_dataset)
        return loss

    def _add_by_dataset(self, by_dataset: torch.Tensor, mb: dict, per_sample: torch.Tensor):
        """Add each sample's loss sum and weight to its dataset's column (samples from
        outside the stage's mixture, e.g. a hand-built batch, have none)."""
        names = mb["datasets"]
        columns = torch.tensor([self.dataset_index.get(n, -1) for n in names], device=self.device)
        known = columns >= 0
        weights = token_weights(mb["labels"], self.exponent).sum(1)
        parts = torch.stack([per_sample, weights])[:, known].to(by_dataset.dtype)
        by_dataset.index_add_(1, columns[known], parts)

    def _touch_image_path(self) -> torch.Tensor:
        """A rank whose batch holds no image must still produce gradients (zeros) for the
        trainable vision/projector parameters, or DDP waits forever for them."""
        if not any(
            p.requires_grad
            for m in (self.model.vision_tower, self.model.multi_modal_projector)
            for p in m.parameters()
        ):
            return torch.zeros((), device=self.device)
        spec = self.model.vision_spec
        dummy = torch.zeros(1, 3, spec.image_size, spec.image_size, device=self.device)
        return 0.0 * self.model.image_features(dummy).sum()

    def _check_every_trainable_has_grad(self) -> None:
        missing = [
            n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is None
        ]
        if missing:
            shown = ", ".join(missing[:10]) + (
                f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            )
            raise RuntimeError(
                f"{len(missing)} trainable parameters got no gradient at the first step: {shown}. "
                "Freeze them (stage.trainable) or check the forward path."
            )

    def _log_step(
        self,
        step: int,
        loss: torch.Tensor,
        batch: dict,
        optimizer,
        tokens: int,
        by_dataset: torch.Tensor,
    ) -> None:
        """One logger row per logged step. ``self.log`` feeds only the progress bar and
        ``callback_metrics``: it would re-log a dataset absent from a step with the value
        of the last step that had it, which with ``stage.group_by_length`` is most steps."""
        now = time.perf_counter()
        dt = now - self._last_step_end if self._last_step_end is not None else None
        self._last_step_end = now
        self.log("train/loss", loss, prog_bar=True, logger=False, on_step=True, batch_size=1)
        if (step + 1) % self.trainer.log_every_n_steps:  # the steps Lightning would log
            return
        metrics = {"train/loss": loss.item()}
        # One learning rate per component (its decay and no-decay groups share it).
        for g in optimizer.param_groups:
            metrics[f"train/lr_{g['name'].removesuffix('_no_decay')}"] = g["lr"]
        # The loss of each dataset's samples in this step, as ``train/loss`` weighs them.
        sums, weights = self.trainer.strategy.reduce(by_dataset, reduce_op="sum").tolist()
        for name, k in self.dataset_index.items():
            if weights[k] > 0:  # the dataset had samples in this step
                metrics[f"train/loss_{name}"] = sums[k] / weights[k]
        if dt is not None:
            samples = batch["input_ids"].shape[0] * self.trainer.world_size
            metrics.update(
                {
                    "perf/step_time_s": dt,
                    "perf/tokens_per_s": tokens / dt,
                    "perf/samples_per_s": samples / dt,
                }
            )
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    # -------------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int):
        logits = self.model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            logits_at=supervised_positions(batch["labels"]),
        )
        self._val_sums.append(
            torch.stack(
                [
                    token_loss_sum(logits, batch["labels"], self.exponent).detach(),
                    loss_normalizer(batch["labels"], self.exponent),
                ]
            )
        )

    def on_validation_epoch_end(self) -> None:
        if not self._val_sums:
            return
        total = self.trainer.strategy.reduce(torch.stack(self._val_sums).sum(0), reduce_op="sum")
        self._val_sums.clear()
        self.log("val/loss", total[0] / total[1], prog_bar=True, batch_size=1)

    # ---------------------------------------------------- RNG state, for exact resume
    # Stored as tensors and plain Python values so checkpoints load with weights_only=True.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["vlmtrain_rng"] = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": [
                kind,
                torch.from_numpy(keys.astype(np.int64)),
                int(pos),
                int(has_gauss),
                float(gauss),
            ],
        }
        checkpoint["vlmtrain_tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.tokens_seen = checkpoint.get("vlmtrain_tokens_seen", 0)
        rng = checkpoint.get("vlmtrain_rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            kind, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
