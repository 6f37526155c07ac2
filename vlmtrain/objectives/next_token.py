"""Next-token prediction: the objective behind lm_pretrain, align, multitask and SFT stages.

One dataloader batch is one optimizer step for this rank; the module splits it
into micro-batches itself (manual optimization) so that the loss is normalized
by the total weight of the supervised tokens of the whole step (one per token by
default; see ``stage.loss_reduction``), across micro-batches and ranks: how a
batch is split never changes the loss or the gradient.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmtrain.config import StageConfig
from vlmtrain.data.chat import IGNORE_INDEX
from vlmtrain.data.packing import flatten_rows, micro_batch_count, padding_fraction
from vlmtrain.engines import shards_weights
from vlmtrain.flops import StepShape, flops_per_token, meta_copy
from vlmtrain.model.feature_cache import FeatureCache, pixel_keys, weights_digest, why_not_cacheable
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.objectives.common import StageModule
from vlmtrain.objectives.registry import Objective

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


def target_samples(labels: torch.Tensor, sample_index: torch.Tensor | None = None):
    """(B, L-1): the sample each target position belongs to: its row, or in a packed
    batch its ``sample_index`` (a sample's first token is never a target, so a target
    and the position predicting it always share a sample)."""
    if sample_index is not None:
        return sample_index[:, 1:]
    rows = torch.arange(labels.shape[0], device=labels.device)
    return rows[:, None].expand(-1, labels.shape[1] - 1)


def token_weights(
    labels: torch.Tensor, exponent: float = 0.0, sample_index: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight of each position's next-token loss: 0 where unsupervised, x^-exponent
    elsewhere (x: the sample's supervised tokens). Depends on the sample alone (all of
    it lies in one row), so micro-batches can compute it themselves."""
    supervised = supervised_targets(labels).float()
    if exponent == 0.0:
        return supervised
    owner = target_samples(labels, sample_index).clamp(min=0)  # padding: weight 0 anyway
    per_sample = supervised.new_zeros(labels.numel()).index_add_(
        0, owner.flatten(), supervised.flatten()
    )
    return supervised * per_sample[owner].clamp(min=1.0).pow(-exponent)


def _per_sample(values: torch.Tensor, labels, sample_index, num_samples: int | None):
    """(num_samples,) sums of ``values``, one per supervised target in row-major order,
    over each sample's targets."""
    owner = target_samples(labels, sample_index)[supervised_targets(labels)]
    sums = torch.zeros(num_samples or labels.shape[0], dtype=values.dtype, device=values.device)
    return sums.index_add(0, owner, values)


def sample_loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    exponent: float = 0.0,
    sample_index: torch.Tensor | None = None,
    num_samples: int | None = None,
):
    """Per sample (one per row, or ``num_samples`` of a packed batch's ``sample_index``):
    the weighted sum of the cross-entropy of each position predicting the next
    supervised token. ``logits`` are (B, L, V), or (N, V) at
    ``supervised_positions(labels)`` only."""
    at = supervised_targets(labels)
    if logits.dim() == 3:
        logits = logits[:, :-1][at]
    ce = F.cross_entropy(logits.float(), labels[:, 1:][at], reduction="none")
    weights = token_weights(labels, exponent, sample_index)[at]
    return _per_sample(ce * weights, labels, sample_index, num_samples)


def sample_weights(labels, exponent=0.0, sample_index=None, num_samples=None) -> torch.Tensor:
    """Per sample, the total weight of its supervised tokens (``sample_loss_sums``' divisor)."""
    weights = token_weights(labels, exponent, sample_index)[supervised_targets(labels)]
    return _per_sample(weights, labels, sample_index, num_samples)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, exponent: float = 0.0):
    """The batch's weighted cross-entropy sum (see ``sample_loss_sums``)."""
    return sample_loss_sums(logits, labels, exponent).sum()


def loss_normalizer(
    labels: torch.Tensor, exponent: float = 0.0, sample_index: torch.Tensor | None = None
) -> torch.Tensor:
    """The total weight ``token_loss_sum`` is divided by: supervised tokens for "token",
    samples for "sample"."""
    return token_weights(labels, exponent, sample_index).sum()


def micro_batches(batch: dict, size: int):
    """Split a step batch into micro-batches of ``size`` samples, images following them.

    A packed step is split into as many micro-batches as the unpacked one (its rows,
    fullest first, spread evenly), each cut to its longest row; its per-sample fields
    stay whole, as ``sample_index`` refers to them."""
    n = batch["input_ids"].shape[0]
    packed = batch.get("sample_index") is not None
    if packed:
        count = min(n, micro_batch_count(len(batch["ids"]), size))
        bounds = [(k * n // count, (k + 1) * n // count) for k in range(count)]
    else:
        bounds = [(lo, min(n, lo + size)) for lo in range(0, n, size)]
    counts = batch["image_counts"]
    image_start = torch.cumsum(torch.cat([counts.new_zeros(1), counts]), 0)
    keys = batch.get("image_keys")  # frozen-tower feature cache keys, one per image
    for lo, hi in bounds:
        width = int(batch["attention_mask"][lo:hi].sum(1).max()) if packed else None
        pixels = batch["pixel_values"]
        if pixels is not None:
            pixels = pixels[image_start[lo] : image_start[hi]]
            pixels = pixels if pixels.shape[0] else None
        samples = slice(None) if packed else slice(lo, hi)
        rows = {
            k: batch[k][lo:hi, :width] if batch.get(k) is not None else None
            for k in ("input_ids", "labels", "attention_mask", "position_ids", "sample_index")
        }
        yield {
            "image_keys": keys[image_start[lo] : image_start[hi]] if keys is not None else None,
            "ids": batch.get("ids", [None] * n)[samples],
            "datasets": batch.get("datasets", [None] * n)[samples],
            **rows,
            "pixel_values": pixels,
        }


def micro_batch_loss(
    model: VisionLanguageModel,
    mb: dict,
    exponent: float,
    flatten: bool,
    image_features: torch.Tensor | None = None,
):
    """(samples,) weighted loss sums of one micro-batch. A packed one (``sample_index``)
    runs without a 2D mask, so that the LM derives per-sample attention from its
    restarting position ids; ``flatten`` lays it out as one row (flash attention).
    ``image_features`` (projected, e.g. from the feature cache) replace the pixels."""
    pixels = mb["pixel_values"] if image_features is None else None
    if mb.get("sample_index") is None:
        logits = model(
            mb["input_ids"],
            mb["attention_mask"],
            pixels,
            logits_at=supervised_positions(mb["labels"]),
            image_features=image_features,
        )
        return sample_loss_sums(logits, mb["labels"], exponent)
    if flatten:
        mb = flatten_rows(mb)
    logits = model(
        mb["input_ids"],
        None,
        pixels,
        position_ids=mb["position_ids"],
        logits_at=supervised_positions(mb["labels"]),
        image_features=image_features,
    )
    return sample_loss_sums(logits, mb["labels"], exponent, mb["sample_index"], len(mb["ids"]))


class NextTokenModule(StageModule):
    def __init__(self, model: VisionLanguageModel, stage: StageConfig):
        super().__init__(model, stage)
        self._last_step_end: float | None = None
        self._val_sums: list[torch.Tensor] = []
        self.exponent = reduction_exponent(stage.loss_reduction)
        # Per-dataset training loss, logged beside the total: which source is stuck.
        names = sorted(n for n, w in stage.mixture.items() if w > 0)
        self.dataset_index = {name: k for k, name in enumerate(names)}
        # Flash attention reads packed sequences' boundaries from the position ids of
        # one flattened row; sdpa and eager take rows and a derived block-diagonal mask.
        attn = getattr(model.language_model.config, "_attn_implementation", None) or ""
        self.flatten_packed = attn.startswith("flash")

    def training_step(self, batch: dict, batch_idx: int):
        step = self.global_step  # one batch is one optimizer step: Lightning's logging step
        if self.flops_per_token is None:  # once per stage, on a typical sample of its data
            # A sharded model cannot be copied: count on its unsharded skeleton.
            model = self.sharded_skeleton["model"] if self.sharded_skeleton else self.model
            self.flops_per_token = flops_per_token(meta_copy(model), StepShape.of_batch(batch))
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        world = self.trainer.world_size
        packed = batch.get("sample_index")
        mbs = list(micro_batches(batch, self.stage.batch_size))
        # The token cells the LM runs on, of which ``attention_mask`` marks the real ones
        # (a flattened packed micro-batch runs on its real tokens only).
        flat = packed is not None and self.flatten_packed
        cells = sum(
            int(mb["attention_mask"].sum()) if flat else mb["attention_mask"].numel() for mb in mbs
        )
        # One all-reduce for all three: the loss normalizer (total token weight of the
        # step), all non-padding tokens (throughput) and the cells (padding fraction).
        counts = torch.stack(
            [
                loss_normalizer(batch["labels"], self.exponent, packed),
                batch["attention_mask"].sum().float(),
                torch.tensor(float(cells), device=self.device),
            ]
        )
        # No sync here: every batch was checked for a supervised token on the CPU
        # (on_before_batch_transfer), so the weight is positive.
        step_weight, all_tokens, all_cells = self.trainer.strategy.reduce(counts, reduce_op="sum")
        # DDP averages gradients over ranks; scaling by world/step_weight makes the
        # result the weighted mean over the whole step.
        scale = world / step_weight
        loss_sum = torch.zeros((), device=self.device)
        # Row 0: weighted loss sums per dataset; row 1: their weights.
        by_dataset = torch.zeros(2, len(self.dataset_index), device=self.device)
        for mb in mbs:
            # A rank with no image here still runs the tower, before the LM as a rank with
            # images does: DDP gets its gradients, FSDP's gathers stay in the same order.
            no_image = mb["pixel_values"] is None and world > 1
            touch = self._touch_image_path() if no_image else None
            per_sample = micro_batch_loss(
                self.model, mb, self.exponent, self.flatten_packed, self._cached_features(mb)
            )
            mb_loss = per_sample.sum()
            if touch is not None:
                mb_loss = mb_loss + touch
            self.manual_backward(mb_loss * scale)
            loss_sum += mb_loss.detach()
            self._add_by_dataset(by_dataset, mb, per_sample.detach())

        self.finish_step(optimizer, scheduler)

        loss = self.trainer.strategy.reduce(loss_sum, reduce_op="sum") / step_weight
        self.add_tokens(all_tokens)
        self._log_step(step, loss, batch, optimizer, all_tokens, by_dataset, all_cells)
        return loss

    def _cached_features(self, mb: dict) -> torch.Tensor | None:
        """Projected image features from the frozen-tower cache, when the stage has one."""
        if self.feature_cache is None or mb["pixel_values"] is None:
            return None
        tower = self.feature_cache.tower_features(
            self.model.vision_tower, mb["pixel_values"], mb["image_keys"]
        )
        return self.model.multi_modal_projector(tower)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Checks and keys that read values, taken while the batch is on the CPU (no
        device sync): a supervised token in the batch (the encoder guarantees one per
        sample; a hand-built batch may lack it), feature-cache keys (pixel digests)."""
        if self.trainer.training and not bool((batch["labels"][:, 1:] != IGNORE_INDEX).any()):
            raise RuntimeError(
                f"step {self.global_step}: no supervised token in the batch {batch.get('ids')}"
            )
        if self.feature_cache is not None and "pixel_values" in batch:
            batch["image_keys"] = pixel_keys(batch["pixel_values"])
        return batch

    def _add_by_dataset(self, by_dataset: torch.Tensor, mb: dict, per_sample: torch.Tensor):
        """Add each sample's loss sum and weight to its dataset's column (samples from
        outside the stage's mixture, e.g. a hand-built batch, have none)."""
        names = mb["datasets"]
        columns = [self.dataset_index.get(n, -1) for n in names]
        # Indices built on the host: a boolean mask on the device would sync (nonzero).
        rows = [i for i, c in enumerate(columns) if c >= 0]
        known = torch.tensor([columns[i] for i in rows], dtype=torch.long, device=self.device)
        rows = torch.tensor(rows, dtype=torch.long, device=self.device)
        weights = sample_weights(mb["labels"], self.exponent, mb["sample_index"], len(names))
        parts = torch.stack([per_sample, weights]).index_select(1, rows).to(by_dataset.dtype)
        by_dataset.index_add_(1, known, parts)

    def _log_step(
        self,
        step: int,
        loss: torch.Tensor,
        batch: dict,
        optimizer,
        tokens: torch.Tensor,
        by_dataset: torch.Tensor,
        cells: torch.Tensor,
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
        tokens = int(tokens)  # logged steps alone read device values
        metrics = {
            "train/loss": loss.item(),
            "perf/padding_fraction": padding_fraction(int(cells), tokens),
        }
        # The loss of each dataset's samples in this step, as ``train/loss`` weighs them.
        sums, weights = self.trainer.strategy.reduce(by_dataset, reduce_op="sum").tolist()
        for name, k in self.dataset_index.items():
            if weights[k] > 0:  # the dataset had samples in this step
                metrics[f"train/loss_{name}"] = sums[k] / weights[k]
        samples = len(batch["ids"]) * self.trainer.world_size  # packed: fewer rows
        self.log_row(step, metrics, optimizer, dt, tokens, samples)

    # -------------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int):
        features = self._cached_features(batch)
        per_sample = micro_batch_loss(self.model, batch, self.exponent, False, features)
        self._val_sums.append(
            torch.stack(
                [
                    per_sample.sum().detach(),
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


def _build(cfg, model: VisionLanguageModel, tokenizer, encoder, stage_dir):
    from vlmtrain.data.module import StageDataModule

    module = NextTokenModule(model, cfg.stage)
    mode = cfg.trainer.get("feature_cache")
    if mode:
        why = why_not_cacheable(model.vision_tower, cfg.stage.trainable.vision, augmented=False)
        if not why and shards_weights(cfg.trainer):
            # A cache hit skips the tower on one rank while another gathers its shards.
            why = f"trainer.strategy={cfg.trainer.strategy} shards the tower"
        if why:
            module.feature_cache_note = f"trainer.feature_cache={mode} is off here: {why}"
        else:
            directory = Path(stage_dir) / "feature_cache" / weights_digest(model.vision_tower)
            module.feature_cache = FeatureCache(mode, directory if mode == "disk" else None)
    return module, StageDataModule(cfg.data, cfg.stage, encoder, cfg.seed)


OBJECTIVE = Objective(build=_build, packing=True)
