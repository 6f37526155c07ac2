"""objective=preference: DPO-family terms (and MPO's sft term) on chosen/rejected pairs.

A step's batch of pairs is split into micro-batches of ``stage.batch_size`` pairs.
Each micro-batch runs ONE policy forward over its chosen and rejected sequences
together, its images encoded once and the features placed in both sequences;
the reference (reference.py) sees exactly the same inputs. Pair terms are
averaged over the pairs of the whole step (all micro-batches and ranks) and the
sft term is normalized by the step's chosen-token weight, so micro-batching
never changes the loss or the gradient.
"""

from __future__ import annotations

import time

import torch

from vlmtrain.config import StageConfig
from vlmtrain.data.preference import PreferenceDataModule
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.objectives.common import StageModule
from vlmtrain.objectives.next_token import loss_normalizer, micro_batches, reduction_exponent
from vlmtrain.objectives.preference import (
    SFT,
    RunningRewardMean,
    Terms,
    check_terms,
    preference_loss,
)
from vlmtrain.objectives.reference import (
    CopyReference,
    DisabledAdapterReference,
    PrecomputedReference,
    cache_key,
    compute_table,
    load_or_compute,
    pair_logps,
)
from vlmtrain.objectives.registry import Objective


class PreferenceModule(StageModule):
    def __init__(
        self, model: VisionLanguageModel, stage: StageConfig, cache_dir=None, encoder=None
    ):
        super().__init__(model, stage)
        pref = stage.preference
        self.terms: Terms = check_terms(pref, stage.lora.enabled, stage.trainable)
        self.beta = float(pref.beta)
        self.label_smoothing = float(pref.label_smoothing)
        self.exponent = reduction_exponent(stage.loss_reduction)
        self.reward_mean = RunningRewardMean()
        self.cache_dir, self.encoder = cache_dir, encoder
        # Kept out of the module's state_dict (a plain attribute holding no nn.Module):
        # checkpoints and artifacts hold the policy only.
        self.reference = {
            "copy": lambda: CopyReference(model),
            "disabled_adapter": lambda: DisabledAdapterReference(model),
            "precomputed": lambda: None,  # in setup(), once the data is known
            "none": lambda: None,
        }[pref.reference]()
        self._last_step_end: float | None = None

    # ------------------------------------------------------------------ reference
    def setup(self, stage: str) -> None:
        """Precomputed reference: runs before Lightning restores a checkpoint, so the
        weights here are the stage's starting weights even when resuming."""
        if self.stage.preference.reference != "precomputed" or self.reference is not None:
            return
        self.reference = self.precompute(self.trainer.datamodule)

    def precompute(self, datamodule) -> PrecomputedReference:
        trainer = self._trainer
        sets = [datamodule.train_set] + ([datamodule.val_set] if datamodule.val_set else [])
        files = {  # the val files too when the stage validates (its pairs are looked up)
            f"{n}.{split}": str(getattr(datamodule.datasets[n], split))
            for n, w in self.stage.mixture.items()
            if w > 0
            for split in ("train", "val")[: len(sets)]
        }
        key = cache_key(self.model, self.encoder, files)
        device = trainer.strategy.root_device if trainer else torch.device("cpu")
        self.model.to(device)

        def compute():
            return compute_table(
                self.model, sets, datamodule.collate, self.stage.batch_size, device
            )

        if trainer is None or trainer.is_global_zero:
            table = load_or_compute(self.cache_dir, key, compute)
        if trainer is not None:
            trainer.strategy.barrier("reference_logps")
            if not trainer.is_global_zero:
                table = load_or_compute(self.cache_dir, key, compute)
        return PrecomputedReference(table)

    def on_fit_start(self) -> None:
        if self.reference is not None:
            self.reference.to(self.device)

    # ------------------------------------------------------------------ training
    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        trainer = self._trainer
        return trainer.strategy.reduce(t, reduce_op="sum") if trainer is not None else t

    def step_loss(
        self, batch: dict, backward: bool = True
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Run the step's micro-batches (backward when asked); the step's loss and metrics."""
        world = self._trainer.world_size if self._trainer is not None else 1
        pairs = batch["input_ids"].shape[0]
        chosen_labels = batch["labels"][:, 0]
        counts = torch.tensor(
            [
                pairs,
                float(loss_normalizer(chosen_labels, self.exponent)),
                float(batch["attention_mask"].sum()),
            ],
            device=self.device,
        )
        step_pairs, sft_weight, tokens = self._reduce(counts)
        # Running sums over the step: loss per term, rewards, accuracy, log-probs.
        names = [
            *self.terms.weights,
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
            "bco_rewards",
        ]
        sums = dict.fromkeys(names, 0.0)
        reward_mean = self.reward_mean.mean
        for mb in micro_batches(batch, self.stage.batch_size):
            b = mb["input_ids"].shape[0]
            pixels = mb["pixel_values"]
            features = self.model.image_features(pixels) if pixels is not None else None
            # Before the LM, where an image batch runs the tower: the ranks' collectives
            # (FSDP gathers) stay in the same order.
            touch = self._touch_image_path() if pixels is None and world > 1 else 0.0
            logps, ntok = pair_logps(self.model, mb, features)
            ref_logps, ref_ntok = (
                self.reference.logps(mb, features) if self.reference else (None, None)
            )
            total = torch.zeros((), device=self.device)
            rewards = None
            for term, weight in self.terms.weights.items():
                if term == SFT:
                    nll = -(logps[:b] * ntok[:b].clamp(min=1).float().pow(-self.exponent)).sum()
                    total = total + weight * nll / sft_weight
                    sums[SFT] += float(nll.detach()) / float(sft_weight)
                    continue
                mean = self.terms.logps_of(term) == "mean"
                pol = logps / ntok.clamp(min=1) if mean else logps
                ref = ref_logps / ref_ntok.clamp(min=1) if mean else ref_logps
                options = {}
                if term in ("sigmoid", "conservative", "robust"):
                    options["label_smoothing"] = self.label_smoothing
                if term == "bco_pair":
                    options["reward_mean"] = reward_mean
                losses, chosen_r, rejected_r = preference_loss(
                    term, pol[:b], pol[b:], ref[:b], ref[b:], beta=self.beta, **options
                )
                total = total + weight * losses.sum() / step_pairs
                sums[term] += float(losses.detach().sum()) / float(step_pairs)
                if term == "bco_pair":
                    sums["bco_rewards"] += float(chosen_r.sum() + rejected_r.sum())
                if rewards is None:  # the first pair term's rewards are the ones logged
                    rewards = (chosen_r, rejected_r)
            total = total + touch
            if backward and self._trainer is not None:
                self.manual_backward(total * world)
            elif backward:  # outside a Trainer (tests, benchmarks)
                total.backward()
            chosen_r, rejected_r = rewards
            sums["rewards/chosen"] += float(chosen_r.sum())
            sums["rewards/rejected"] += float(rejected_r.sum())
            sums["rewards/accuracies"] += float((chosen_r > rejected_r).float().sum())
            sums["logps/chosen"] += float(logps[:b].detach().sum())
            sums["logps/rejected"] += float(logps[b:].detach().sum())
        summed = self._reduce(
            torch.tensor([sums[n] for n in names], dtype=torch.float64, device=self.device)
        )
        metrics = dict(zip(names, summed.tolist(), strict=True))
        if backward and "bco_pair" in self.terms.weights:  # training steps only, not validation
            self.reward_mean.update(metrics["bco_rewards"], 2 * int(step_pairs))
        del metrics["bco_rewards"]
        loss = sum(self.terms.weights[t] * metrics[t] for t in self.terms.weights)
        for n in (
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
        ):
            metrics[n] /= float(step_pairs)
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        metrics["tokens"] = float(tokens)
        return torch.tensor(loss), metrics

    def training_step(self, batch: dict, batch_idx: int):
        step = self.global_step
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        loss, metrics = self.step_loss(batch)
        self.finish_step(optimizer, scheduler)
        tokens = metrics.pop("tokens")  # chosen + rejected, text + image, all ranks
        self.tokens_seen += int(tokens)
        now = time.perf_counter()
        dt = now - self._last_step_end if self._last_step_end is not None else None
        self._last_step_end = now
        self.log("train/loss", loss, prog_bar=True, logger=False, on_step=True, batch_size=1)
        self.log(
            "train/rewards/accuracies", metrics["rewards/accuracies"], logger=False, batch_size=1
        )
        if (step + 1) % self.trainer.log_every_n_steps:
            return loss
        row = {"train/loss": float(loss)}
        row.update({f"train/loss_{t}": metrics.pop(t) for t in self.terms.weights})
        row.update({f"train/{k}": v for k, v in metrics.items()})
        pairs = batch["input_ids"].shape[0] * self.trainer.world_size
        self.log_row(step, row, optimizer, dt, tokens, pairs, unit="pairs")
        return loss

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict, batch_idx: int):
        with torch.no_grad():
            _, metrics = self.step_loss(batch, backward=False)
        self._val.append((batch["input_ids"].shape[0], metrics))

    def on_validation_epoch_start(self) -> None:
        self._val: list[tuple[int, dict[str, float]]] = []

    def on_validation_epoch_end(self) -> None:
        """Pair-weighted means over the validation batches (each already over all ranks)."""
        if not self._val:
            return
        n = sum(b for b, _ in self._val)
        mean = {k: sum(b * m[k] for b, m in self._val) / n for k in self._val[0][1]}
        loss = sum(self.terms.weights[t] * mean[t] for t in self.terms.weights)
        self.log("val/loss", loss, prog_bar=True, batch_size=1)
        for k in ("rewards/accuracies", "rewards/margins"):
            self.log(f"val/{k}", mean[k], batch_size=1)

    # ------------------------------------------------------------- checkpoint state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["vlmtrain_reward_mean"] = self.reward_mean.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "vlmtrain_reward_mean" in checkpoint:
            self.reward_mean.load_state_dict(checkpoint["vlmtrain_reward_mean"])


def _check(cfg) -> None:
    try:
        check_terms(cfg.stage.preference, cfg.stage.lora.enabled, cfg.stage.trainable)
    except ValueError as e:  # in a recipe the keys are stages.<name>.*
        raise ValueError(f"stage {cfg.stage.name!r}: {e}") from None


def _build(cfg, model, tokenizer, encoder, stage_dir):
    datamodule = PreferenceDataModule(cfg.data, cfg.stage, encoder, cfg.seed)
    module = PreferenceModule(model, cfg.stage, stage_dir, datamodule.encoder)
    return module, datamodule


def _extra_memory(
    cfg, counts: dict[str, tuple[int, int]], bytes_per_param: int
) -> dict[str, float]:
    """The reference model's weights: a second copy only for reference=copy."""
    total = sum(t + f for t, f in counts.values())
    kind = cfg.stage.preference.reference
    return {"reference": total * bytes_per_param if kind == "copy" else 0.0}


OBJECTIVE = Objective(
    build=_build, check=_check, sequences_per_sample=2, extra_memory=_extra_memory
)
