"""objective=grpo: group-relative policy optimization with verifiable rewards.

One dataloader batch is one generation batch: its prompts' completions are sampled from
the current policy (``rollout.py``, G per prompt, each image encoded once), scored by
the configured reward functions (``rewards.py``), turned into group-normalized
advantages, and scored by the reference once. Then ``stage.grpo.iterations`` optimizer
steps each take the whole generation batch (micro-batches of ``stage.batch_size``
prompts), with the log-probs recorded at sampling as the old policy's (``grpo_loss.py``).
``stage.max_steps`` counts optimizer steps.

Exact resume: checkpoints fall between generation batches (checkpoint_every is a
multiple of the iterations), and sampling draws from a generator seeded by the run's
seed, the generation batch's index and the rank, so a resumed run samples what the
uninterrupted one did.
"""

from __future__ import annotations

import copy
import hashlib
import time

import torch

from vlmtrain.config import StageConfig
from vlmtrain.data.prompts import PromptDataModule, prompt_micro_batches
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.objectives.common import StageModule
from vlmtrain.objectives.grpo_loss import (
    LOSS_TYPES,
    Normalizer,
    group_advantages,
    grpo_token_terms,
)
from vlmtrain.objectives.reference import image_path_frozen
from vlmtrain.objectives.registry import Objective
from vlmtrain.objectives.rewards import resolve_rewards, score
from vlmtrain.objectives.rollout import (
    Rollout,
    completion_token_logps,
    kv_cache_bytes,
    repeat_features,
    sample_completions,
)

REFERENCES = ("copy", "disabled_adapter", "none")


def sampling_seed(seed: int, generation: int, rank: int) -> int:
    digest = hashlib.sha256(f"{seed}/{generation}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Reference:
    """Token log-probs of sampled completions under the reference: a frozen copy of the
    starting weights, or the LoRA policy with its adapters disabled."""

    def __init__(self, kind: str, model: VisionLanguageModel):
        self.kind, self.policy = kind, model
        self.model = copy.deepcopy(model).requires_grad_(False).eval() if kind == "copy" else None
        # A frozen image path computes the same features in both: the policy's are reused.
        self.share_features = kind != "copy" or image_path_frozen(model)

    def to(self, device) -> None:
        if self.model is not None:
            self.model.to(device)

    @torch.no_grad()
    def token_logps(self, rollout: Rollout, mb: dict, features, temperature: float):
        if self.kind == "disabled_adapter":
            with self.policy.language_model.disable_adapter():
                return completion_token_logps(self.policy, rollout, features, temperature)
        if not self.share_features and mb["pixel_values"] is not None:
            own = self.model.image_features(mb["pixel_values"])
            features = repeat_features(own, mb["image_counts"], rollout.n)
        return completion_token_logps(self.model, rollout, features, temperature)


class GrpoModule(StageModule):
    def __init__(self, model: VisionLanguageModel, stage: StageConfig, tokenizer, seed: int):
        super().__init__(model, stage)
        self.cfg = stage.grpo
        self.tokenizer = tokenizer
        self.seed = seed
        self.rewards = resolve_rewards(self.cfg)
        scale = self.cfg.scale_rewards
        self.scale_rewards = self.cfg.loss_type != "dr_grpo" if scale is None else bool(scale)
        # A plain attribute holding no nn.Module: checkpoints and artifacts hold the policy.
        self.reference = (
            None if self.cfg.reference == "none" else Reference(self.cfg.reference, model)
        )
        self.time_split = {"generation_s": 0.0, "training_s": 0.0}

    def on_fit_start(self) -> None:
        if self.reference is not None:
            self.reference.to(self.device)

    def _reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        trainer = self._trainer
        return (trainer.strategy.reduce(t, reduce_op="sum") if trainer is not None else t).tolist()

    # ------------------------------------------------------------------ generation
    def generate(self, batch: dict, generation: int, rank: int) -> list[tuple[dict, Rollout]]:
        cfg = self.cfg
        gen = torch.Generator(device=self.device).manual_seed(
            sampling_seed(self.seed, generation, rank)
        )
        was_training = self.model.training
        self.model.eval()  # the recorded log-probs are the old policy's, without dropout
        out = []
        for mb in prompt_micro_batches(batch, self.stage.batch_size):
            rollout = sample_completions(
                self.model,
                mb["input_ids"],
                mb["attention_mask"],
                mb["pixel_values"],
                mb["image_counts"],
                n=cfg.num_generations,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                generator=gen,
            )
            out.append((mb, rollout))
        self.model.train(was_training)
        return out

    def texts(self, rollout: Rollout) -> list[str]:
        ids = rollout.completion_ids.masked_fill(
            ~rollout.completion_mask.bool(), self.tokenizer.pad_token_id
        )
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int):
        cfg, g = self.cfg, self.cfg.num_generations
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        trainer = self._trainer
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0

        start = time.perf_counter()
        groups = self.generate(batch, self.global_step // cfg.iterations, rank)
        generated = time.perf_counter()

        # Rewards, advantages and the reference's log-probs, once per generation batch.
        per_fn: dict[str, list[float]] = {name: [] for name in self.rewards}
        prepared = []
        for mb, rollout in groups:
            refs = [r for r in mb["references"] for _ in range(g)]
            types = [t for t in mb["types"] for _ in range(g)]
            scores = score(self.rewards, self.texts(rollout), refs, types)
            total = sum(w * torch.tensor(scores[n]) for n, (_, w) in self.rewards.items())
            for n in scores:
                per_fn[n] += scores[n]
            adv = group_advantages(total.to(self.device, torch.float32), g, self.scale_rewards)
            ref_logps = None
            if self.reference is not None:
                ref_logps = self.reference.token_logps(
                    rollout, mb, self._features(mb, rollout, grad=False), cfg.temperature
                )
            prepared.append((mb, rollout, adv, total, ref_logps))
        totals = self._reduce(
            [
                sum(r.completion_mask.shape[0] for _, r, *_ in prepared),
                sum(float(r.completion_mask.sum()) for _, r, *_ in prepared),
                sum(float(r.attention_mask.sum()) for _, r, *_ in prepared),
            ]
        )
        norm = Normalizer(totals[0], totals[1], cfg.max_new_tokens)
        last = generated
        for _ in range(cfg.iterations):
            sums = self._optimizer_step(prepared, norm, world)
            self.finish_step(optimizer, scheduler)
            now = time.perf_counter()
            self._log_step(sums, per_fn, prepared, totals, optimizer, generated - start, now - last)
            last = now
        self.time_split["generation_s"] += generated - start
        self.time_split["training_s"] += time.perf_counter() - generated
        self.tokens_seen += int(totals[2]) * cfg.iterations
        self.log(
            "train/loss", sums["loss"], prog_bar=True, logger=False, on_step=True, batch_size=1
        )
        return None

    def _features(self, mb: dict, rollout: Rollout, grad: bool):
        if mb["pixel_values"] is None:
            return None
        with torch.set_grad_enabled(grad):
            features = self.model.image_features(mb["pixel_values"])
        return repeat_features(features, mb["image_counts"], rollout.n)

    def _optimizer_step(self, prepared, norm: Normalizer, world: int) -> dict[str, float]:
        cfg = self.cfg
        sums = dict.fromkeys(("loss", "kl", "clipped"), 0.0)
        for mb, rollout, adv, _, ref_logps in prepared:
            features = self._features(mb, rollout, grad=True)
            logps = completion_token_logps(self.model, rollout, features, cfg.temperature)
            mask = rollout.completion_mask.to(logps.dtype)
            per_token, kl, clipped = grpo_token_terms(
                logps,
                rollout.logps,
                ref_logps,
                adv,
                beta=cfg.beta,
                epsilon_low=cfg.epsilon_low,
                epsilon_high=cfg.epsilon_high,
            )
            loss = norm.divide(per_token, mask, cfg.loss_type)
            if features is None and world > 1:
                loss = loss + self._touch_image_path()
            if self._trainer is not None:
                self.manual_backward(loss * world)
            else:
                loss.backward()
            sums["loss"] += float(loss.detach())
            if kl is not None:
                sums["kl"] += float((kl.detach() * mask).sum()) / norm.tokens
            sums["clipped"] += float((clipped.float() * mask).sum()) / norm.tokens
        return dict(zip(sums, self._reduce(list(sums.values())), strict=True))

    def _log_step(
        self, sums, per_fn, prepared, totals, optimizer, gen_s: float, train_s: float
    ) -> None:
        step = self.global_step - 1  # the optimizer step just taken
        if self._trainer is None or (step + 1) % self._trainer.log_every_n_steps:
            return
        rewards = torch.cat([t for *_, t, _ in prepared])
        lengths = torch.cat([r.lengths for _, r, *_ in prepared]).float()
        groups = rewards.view(-1, self.cfg.num_generations)
        row = {
            "train/loss": sums["loss"],
            "train/kl": sums["kl"],
            "train/clip_fraction": sums["clipped"],
            "train/reward": float(rewards.mean()),
            "train/reward_std": float(groups.std(1).mean()),
            "train/zero_std_groups": float((groups.std(1) == 0).float().mean()),
            "train/completion_length": float(lengths.mean()),
            "perf/generation_tokens_per_s": float(lengths.sum()) / max(gen_s, 1e-9),
            "perf/training_tokens_per_s": totals[2] / max(train_s, 1e-9),
            "perf/generation_s": gen_s,
            "perf/training_s": train_s,
        }
        for name, values in per_fn.items():
            v = torch.tensor(values)
            row[f"train/rewards/{name}"] = float(v.mean())
            row[f"train/rewards/{name}_std"] = float(v.std()) if len(v) > 1 else 0.0
        self.log_row(step, row, optimizer, None, 0, 0)

    # ------------------------------------------------------------- checkpoint state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["vlmtrain_grpo_time"] = dict(self.time_split)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.time_split.update(checkpoint.get("vlmtrain_grpo_time", {}))


def check_grpo(cfg) -> None:
    """Refuse, before any model work, what the stage cannot run; errors name the keys."""
    stage, g = cfg.stage, cfg.stage.grpo
    key = f"stage {stage.name!r}: stage.grpo"
    if g.num_generations < 2:
        raise ValueError(f"{key}.num_generations={g.num_generations}: a group needs at least 2")
    if g.loss_type not in LOSS_TYPES:
        raise ValueError(f"{key}.loss_type={g.loss_type!r}; expected one of {LOSS_TYPES}")
    if g.reference not in REFERENCES:
        raise ValueError(f"{key}.reference={g.reference!r}; expected one of {REFERENCES}")
    if g.reference == "none" and g.beta:
        raise ValueError(f"{key}.reference=none needs {key}.beta=0 (the KL is to the reference)")
    if g.reference == "disabled_adapter" and not stage.lora.enabled:
        raise ValueError(f"{key}.reference=disabled_adapter needs stage.lora.enabled=true")
    if g.iterations < 1 or stage.max_steps % g.iterations:
        raise ValueError(
            f"{key}.iterations={g.iterations}: stage.max_steps ({stage.max_steps}) must be a "
            "positive multiple of it (optimizer steps come in whole generation batches)"
        )
    if cfg.trainer.checkpoint_every % g.iterations:
        raise ValueError(
            f"{key}.iterations={g.iterations}: trainer.checkpoint_every "
            f"({cfg.trainer.checkpoint_every}) must be a multiple of it, so checkpoints fall "
            "between generation batches"
        )
    if g.temperature <= 0 or not 0 < g.top_p <= 1 or g.max_new_tokens < 1:
        raise ValueError(
            f"{key}: temperature > 0 (a group of greedy answers is one answer), top_p in "
            "(0, 1] and max_new_tokens >= 1"
        )
    if not 0 <= g.epsilon_low < 1 or g.epsilon_high < 0:
        raise ValueError(f"{key}: epsilon_low in [0, 1), epsilon_high >= 0")
    resolve_rewards(g, f"{key}.rewards")


def _build(cfg, model, tokenizer, encoder, stage_dir):
    datamodule = PromptDataModule(cfg.data, cfg.stage, encoder, cfg.seed)
    return GrpoModule(model, cfg.stage, tokenizer, cfg.seed), datamodule


def _extra_memory(cfg, counts: dict[str, tuple[int, int]], bytes_per_param: int) -> dict:
    """The reference copy, and the generation's KV cache: G completions of each prompt of
    a micro-batch at full length."""
    g = cfg.stage.grpo
    total = sum(t + f for t, f in counts.values())
    sequences = cfg.stage.batch_size * g.num_generations
    length = cfg.stage.max_length + g.max_new_tokens
    return {
        "reference": total * bytes_per_param if g.reference == "copy" else 0.0,
        "generation_kv_cache": kv_cache_bytes(cfg.model.lm, length, sequences, bytes_per_param),
    }


OBJECTIVE = Objective(build=_build, check=check_grpo, extra_memory=_extra_memory)
