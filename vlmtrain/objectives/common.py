"""What every objective's LightningModule shares: the optimizer and its step, the
first-step gradient check, the image path a text-only DDP rank must still touch,
RNG state in checkpoints for exact resume, and log-probs of completions.

Objectives use manual optimization: one dataloader batch is one optimizer step
for this rank, split into micro-batches by the objective, each loss scaled by a
normalizer over the whole step (all micro-batches and ranks).
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from vlmtrain.config import StageConfig
from vlmtrain.data.chat import IGNORE_INDEX
from vlmtrain.engines import is_deepspeed
from vlmtrain.flops import throughput_metrics
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.objectives.optim import build_optimizer, param_groups, warmup_cosine


def completion_logps(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) summed log-probs of each sequence's supervised tokens, and (B,) their counts.

    ``logits`` are (N, V) at the positions predicting a supervised token (the model's
    ``logits_at=supervised_positions(labels)``), in row-major order."""
    at = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][at]
    token_logps = torch.log_softmax(logits.float(), -1).gather(1, targets[:, None])[:, 0]
    rows = at.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=logits.device)
    return sums.index_add(0, rows, token_logps), at.sum(1)


class StageModule(L.LightningModule):
    """Base of the objectives' LightningModules (manual optimization)."""

    def __init__(self, model: VisionLanguageModel, stage: StageConfig):
        super().__init__()
        self.model = model
        self.stage = stage
        self.automatic_optimization = False
        self.tokens_seen = 0  # non-padding tokens (text + image) over all ranks
        # trainer.strategy=fsdp: the unsharded, meta-device copy of the children
        # (configure_model) that the artifact's full weights are consolidated into.
        self.sharded_skeleton: dict[str, torch.nn.Module] | None = None
        self._tokens_pending: torch.Tensor | None = None  # added on the device, not yet read
        # Model FLOPs per token (vlmtrain.flops), set once per stage by an objective that
        # counts them; with the device's peak FLOP/s (set by train.py) MFU is logged.
        self.flops_per_token: float | None = None
        self.peak_flops: float | None = None
        # trainer.feature_cache (vlmtrain.model.feature_cache), where the objective uses
        # one, and why a stage runs without it.
        self.feature_cache = None
        self.feature_cache_note: str | None = None

    def optimized_components(self) -> dict[str, torch.nn.Module]:
        """What the optimizer trains, by name (``stage.trainable.lr_mult`` keys): the
        model's components, and any module an objective adds (AIM's decoder)."""
        return self.model.components()

    def artifact_extras(self) -> dict[str, torch.nn.Module]:
        """Modules beside the model's components that the stage's artifact keeps (as
        ``<name>.safetensors``) but later stages never need, e.g. AIM's decoder."""
        return {}

    def configure_model(self) -> None:
        """Under trainer.strategy=fsdp, shard the model (vlmtrain.sharding) before the
        optimizer is built from the sharded trainable parameters; an unsharded copy on the
        meta device is kept to consolidate the artifact into (also under DeepSpeed,
        which partitions the model itself). Other strategies: nothing."""
        shard = getattr(self._trainer.strategy, "shard", None) if self._trainer else None
        if shard is None or self.sharded_skeleton is not None:
            return
        from vlmtrain.sharding import unsharded_skeleton

        self.sharded_skeleton = unsharded_skeleton(dict(self.named_children()))
        shard(self)

    def configure_optimizers(self):
        groups = param_groups(self.optimized_components(), self.stage.optim, self.stage.trainable)
        optimizer = build_optimizer(groups, self.stage.optim)
        factor = warmup_cosine(
            self.stage.max_steps, self.stage.optim.warmup_ratio, self.stage.optim.min_lr_ratio
        )
        scheduler = LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def add_tokens(self, tokens: torch.Tensor) -> None:
        """Count a step's tokens without reading the device value now (a sync per step);
        ``tokens_seen`` is brought up to date when checkpointed and when training ends."""
        pending = self._tokens_pending
        self._tokens_pending = tokens.detach() if pending is None else pending + tokens.detach()

    def _read_tokens(self) -> None:
        if self._tokens_pending is not None:
            self.tokens_seen += int(self._tokens_pending)
            self._tokens_pending = None

    def on_train_end(self) -> None:
        self._read_tokens()

    def finish_step(self, optimizer, scheduler) -> None:
        """After the step's backward passes: check gradients (first step), clip, step."""
        if self.global_step == 0:
            self._check_every_trainable_has_grad()
        if self.stage.optim.grad_clip and not is_deepspeed(self.trainer.strategy):
            # (DeepSpeed clips in its own step: vlmtrain.engines.deepspeed_config)
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.stage.optim.grad_clip,
                gradient_clip_algorithm="norm",
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    def _touch_image_path(self) -> torch.Tensor:
        """A rank whose batch holds no image must still produce gradients (zeros) for the
        trainable vision/projector parameters, or DDP waits forever for them; under FSDP it
        must also gather the (even frozen) tower's shards as often as the other ranks do."""
        params = [
            p
            for m in (self.model.vision_tower, self.model.multi_modal_projector)
            for p in m.parameters()
        ]
        if not any(p.requires_grad for p in params) and self.sharded_skeleton is None:
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

    def log_row(
        self,
        step: int,
        row: dict,
        optimizer,
        dt: float | None,
        tokens: int,
        samples: int,
        unit: str = "samples",
    ) -> None:
        """One logger row per logged step, shared by the objectives: their metrics, one
        learning rate per component, and throughput (``unit`` names what ``samples`` count)."""
        for g in optimizer.param_groups:  # decay and no-decay groups share the rate
            row[f"train/lr_{g['name'].removesuffix('_no_decay')}"] = g["lr"]
        if dt is not None:
            row["perf/step_time_s"] = dt
            row["perf/tokens_per_s"] = tokens / dt
            row[f"perf/{unit}_per_s"] = samples / dt
            world = self.trainer.world_size
            row.update(throughput_metrics(tokens, dt, world, self.flops_per_token, self.peak_flops))
        wait = getattr(getattr(self.trainer, "datamodule", None), "data_wait", None)
        if wait is not None and (mean := wait.take()) is not None:
            row["perf/data_wait_s"] = mean
        for logger in self.loggers:
            logger.log_metrics(row, step=step)

    # ---------------------------------------------------- RNG state, for exact resume
    # Stored as tensors and plain Python values so checkpoints load with weights_only=True.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._read_tokens()
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
        if torch.cuda.is_available():  # dropout on the GPU draws from its own generator
            checkpoint["vlmtrain_rng"]["cuda"] = torch.cuda.get_rng_state()
        # Ranks draw apart (dropout over batches padded to different lengths) and only
        # rank 0's checkpoint dict is written: every hook runs on every rank, so gather.
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            by_rank = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(by_rank, checkpoint["vlmtrain_rng"])
            checkpoint["vlmtrain_rng_by_rank"] = by_rank
        checkpoint["vlmtrain_tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.tokens_seen = checkpoint.get("vlmtrain_tokens_seen", 0)
        rng = checkpoint.get("vlmtrain_rng")
        by_rank = checkpoint.get("vlmtrain_rng_by_rank") or []
        if self.global_rank < len(by_rank):  # on more ranks than saved, rank 0's state
            rng = by_rank[self.global_rank]
        if rng:
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            kind, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
