"""Model FLOPs of a training step, counted by running it on the meta device.

Each part of the model (vision tower, projector, LM) runs forward and backward on
meta tensors under ``torch.utils.flop_counter.FlopCounterMode``: no memory, no
compute, and exactly the operations training runs, because autograd computes
only what the stage's ``requires_grad`` flags ask for. A frozen LM behind a
trainable projector (alignment) therefore counts its activation gradients
(about one forward) but no weight gradients; a frozen tower with nothing
trainable before it counts no backward at all. On meta tensors attention runs
as plain matrix products, so it is counted in full (the causal half included,
as MFU conventionally does); activation checkpointing's recomputation is not
counted (model FLOPs, not hardware FLOPs).

``mfu`` turns achieved tokens/s into model FLOPs utilization against the peak
FLOP/s of one device: ``trainer.peak_flops`` when set, else a table of known
GPUs at the precision trained in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

PARTS = ("vision", "projector", "lm")

# Dense peak FLOP/s per device from vendors' data sheets: 16-bit (bf16/fp16) and TF32.
PEAK_FLOPS = {
    "h200": {"16": 989e12, "32": 494e12},
    "h100": {"16": 989e12, "32": 494e12},
    "a100": {"16": 312e12, "32": 156e12},
    "l40s": {"16": 362e12, "32": 183e12},
    "a10": {"16": 125e12, "32": 62.5e12},
}


@dataclass(frozen=True)
class StepShape:
    """What a step's FLOPs depend on: sequences, their length, images, supervised positions."""

    sequences: int
    length: int
    images: int
    logit_positions: int

    @classmethod
    def of_batch(cls, batch: dict) -> StepShape:
        """One typical unpadded sequence of ``batch`` (mean length, images and supervised
        positions per sample): FLOPs per token of real data, not of padding."""
        n = batch["input_ids"].shape[0]
        mask, labels = batch["attention_mask"], batch["labels"]
        counts = batch.get("image_counts")
        return cls(
            sequences=1,
            length=max(1, round(float(mask.sum()) / n)),
            images=round(float(counts.sum()) / n) if counts is not None else 0,
            logit_positions=max(1, round(float((labels[:, 1:] != -100).sum()) / n)),
        )


def meta_copy(model: nn.Module) -> nn.Module:
    """``model`` with every parameter and buffer on the meta device (no memory), keeping
    each parameter's ``requires_grad``."""
    memo = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    meta = copy.deepcopy(model, memo)
    for m in meta.modules():  # count the eager modules, not a compiled graph (trainer.compile)
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    return meta


def _count(fn) -> tuple[int, object]:
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops(), out


def _backward(output: torch.Tensor | None) -> int:
    """FLOPs of the backward pass from ``output`` (a ones gradient), 0 when nothing in it
    requires a gradient."""
    if output is None or not output.requires_grad:
        return 0
    flops, _ = _count(lambda: output.backward(torch.ones_like(output)))
    return flops


def step_flops(model, shape: StepShape, *, lm_runs: bool = True) -> dict[str, dict[str, int]]:
    """{part: {"forward": flops, "backward": flops}} of one step of ``shape`` on ``model``
    (a ``VisionLanguageModel``, copied to the meta device first unless it is there)."""
    if next(model.parameters()).device.type != "meta":
        model = meta_copy(model)
    for part in (model.vision_tower.model, model.language_model):  # model FLOPs: no recompute
        if getattr(part, "is_activation_checkpointing", False):
            part.activation_checkpointing_disable()
    out = {p: {"forward": 0, "backward": 0} for p in PARTS}
    tower_trains = any(p.requires_grad for p in model.vision_tower.parameters())
    before_lm_trains = tower_trains or any(
        p.requires_grad for p in model.multi_modal_projector.parameters()
    )
    features = None
    if shape.images:
        spec = model.vision_spec
        pixels = torch.empty(shape.images, 3, spec.image_size, spec.image_size, device="meta")
        out["vision"]["forward"], tower_out = _count(lambda: model.vision_tower(pixels))
        tower_in = tower_out.detach().requires_grad_(tower_trains)
        out["projector"]["forward"], features = _count(
            lambda: model.multi_modal_projector(tower_in)
        )
    lm_grad = None
    if lm_runs:
        lm = model.language_model
        d = lm.config.hidden_size
        embeds = torch.empty(shape.sequences, shape.length, d, device="meta")
        embeds.requires_grad_(bool(shape.images) and before_lm_trains)

        def lm_forward():
            # A ready 4D mask: from a 2D one (or none) transformers builds it by reading
            # values, which meta tensors do not have. Its values do not change the FLOPs.
            n, length = shape.sequences, shape.length
            mask = torch.ones(n, 1, length, length, dtype=torch.bool, device="meta")
            hidden = lm.get_decoder()(
                inputs_embeds=embeds, attention_mask=mask, use_cache=False
            ).last_hidden_state
            at = hidden.reshape(-1, d)[: shape.logit_positions]
            return lm.get_output_embeddings()(at)

        out["lm"]["forward"], logits = _count(lm_forward)
        out["lm"]["backward"] = _backward(logits)
        lm_grad = embeds.grad
    if features is not None:
        # The projector's output gradient comes from the LM's input gradient (or none).
        grad_runs = features.requires_grad and (lm_grad is not None or not lm_runs)
        out["projector"]["backward"] = _backward(features if grad_runs else None)
        if tower_trains and grad_runs:
            out["vision"]["backward"] = _backward(tower_out)
    return out


def total(flops: dict[str, dict[str, int]]) -> int:
    return sum(v for part in flops.values() for v in part.values())


def flops_per_token(model, shape: StepShape) -> float:
    """Model FLOPs (forward + backward, all parts) per token of ``shape``'s sequences."""
    return total(step_flops(model, shape)) / (shape.sequences * shape.length)


def peak_flops(trainer_cfg) -> float | None:
    """Peak FLOP/s of one device: ``trainer.peak_flops``, else the visible GPU's from the
    table at the training precision; None when unknown (CPU): MFU is then not logged."""
    configured = getattr(trainer_cfg, "peak_flops", None)
    if configured:
        return float(configured)
    if trainer_cfg.accelerator not in ("gpu", "cuda", "auto") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().lower()
    bits = "16" if str(trainer_cfg.precision).startswith(("bf16", "16")) else "32"
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            return peaks[bits]
    return None


def throughput_metrics(
    tokens: int, dt: float, world: int, per_token: float | None, peak: float | None
) -> dict[str, float]:
    """perf/ metrics of one step: tokens/s per device and, with FLOPs per token known,
    achieved model TFLOP/s per device and MFU (with the device's peak known)."""
    per_device = tokens / dt / world
    row = {"perf/tokens_per_s_per_device": per_device}
    if per_token:
        achieved = per_token * per_device
        row["perf/model_tflops_per_device"] = achieved / 1e12
        if peak:
            row["perf/mfu"] = achieved / peak
    return row
