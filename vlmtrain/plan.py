"""Plan a recipe without training: models built on the meta device from configs.

No weights are read or allocated and nothing is downloaded, so a 7B recipe can
be planned on a laptop. Memory figures are estimates (weights, gradients, AdamW
state, a rough activation term), meant for choosing a strategy, not a promise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from vlmtrain.composition import check_handoffs, describe_model
from vlmtrain.data.tiling import max_tower_inputs
from vlmtrain.flops import StepShape, step_flops, total
from vlmtrain.hardware import check_strategy, device_memory_gib
from vlmtrain.model.freezing import apply_trainable, parameter_counts
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.objectives.registry import objective_for
from vlmtrain.recipe import check_order, stage_config, stage_list

console = Console()


def _bytes_per_param(precision: str) -> int:
    return 2 if precision in ("bf16-true", "16-true") else 4


def _tokenizer_or_none(cfg: DictConfig):
    from vlmtrain.model.lm import load_tokenizer

    path = cfg.model.tokenizer or cfg.model.lm.path  # the LM's own by default
    if path and Path(path).is_dir():
        return load_tokenizer(cfg.model)
    return None


def estimate_memory(
    counts: dict[str, tuple[int, int]],
    model: VisionLanguageModel,
    cfg: DictConfig,
    supervised_per_sample: float | None = None,
) -> dict[str, float]:
    """Rough per-device bytes, in GiB. ``supervised_per_sample``: the positions a sample's
    logits are computed at (measured on the data when it is present); by default every
    position but one image's tokens."""
    if supervised_per_sample is None:
        supervised_per_sample = max(cfg.stage.max_length - model.tokens_per_image, 1)
    stage, trainer = cfg.stage, cfg.trainer
    devices = _devices(trainer)
    total = sum(t + f for t, f in counts.values())
    trainable = sum(t for t, _ in counts.values())
    weight_b = _bytes_per_param(trainer.precision)
    weights = total * weight_b
    grads = trainable * weight_b
    optim = trainable * 8 + (trainable * 4 if "mixed" in trainer.precision and weight_b == 2 else 0)
    sharded = sharded_states(trainer, devices, largest_unit(model) * weight_b)
    weights = weights / sharded["weights"] + sharded["gathered"]
    grads, optim = grads / sharded["grads"], optim / sharded["optimizer"]
    # Activations kept for backward: ~34 bytes x hidden per token per layer (no recompute,
    # 16-bit), doubled for fp32; the LM keeps them whenever anything before it trains.
    # Checkpointed, a layer keeps only its input (2 or 4 bytes x hidden) and one layer's
    # full set lives while backward recomputes it.
    act_b = 34 * (2 if weight_b == 4 and "mixed" not in trainer.precision else 1)

    def kept(tokens: int, hidden: int, layers: int) -> float:
        if trainer.activation_checkpointing:
            return tokens * hidden * (layers * act_b / 17 + act_b)
        return tokens * hidden * layers * act_b

    lm_cfg = model.language_model.config
    objective = objective_for(stage.objective)
    # A preference pair runs two sequences through the LM (its image once).
    tokens = stage.batch_size * stage.max_length * objective.sequences_per_sample
    activations = 0.0
    if trainable:
        activations += kept(tokens, lm_cfg.hidden_size, lm_cfg.num_hidden_layers)
        # Training computes logits only at supervised positions (fp32, and their gradient),
        # in every sequence the LM runs.
        logit_positions = stage.batch_size * supervised_per_sample * objective.sequences_per_sample
        activations += logit_positions * lm_cfg.vocab_size * 4 * 2
    if counts["vision"][0]:
        spec = model.vision_spec
        v = model.vision_tower.config
        # A tiled image is up to max_tiles (+ thumbnail) tower inputs (model.tiling).
        tiles = max_tower_inputs(cfg.model)
        activations += kept(
            stage.batch_size * tiles * spec.tokens_per_image, v.hidden_size, v.num_hidden_layers
        )
    extra = objective.extra_memory(cfg, counts, weight_b)  # e.g. a reference model
    gib = 2**30
    return {
        "weights": weights / gib,
        "grads": grads / gib,
        "optimizer": optim / gib,
        "activations": activations / gib,
        **{name: b / gib for name, b in extra.items()},
        "total": (weights + grads + optim + activations + sum(extra.values())) / gib,
    }


def _devices(trainer: DictConfig) -> int:
    """Sharded states are split over every process of the job, all nodes included."""
    return (trainer.devices if isinstance(trainer.devices, int) else 1) * trainer.num_nodes


def largest_unit(model: VisionLanguageModel) -> int:
    """Parameters of the largest transformer layer: what FSDP / ZeRO-3 gather at once."""
    from vlmtrain.sharding import transformer_layers

    layers = transformer_layers(model.vision_tower) + transformer_layers(model.language_model)
    return max((sum(p.numel() for p in m.parameters()) for m in layers), default=0)


def sharded_states(trainer: DictConfig, devices: int, unit_bytes: int) -> dict[str, Any]:
    """How a strategy divides the model states over ``devices`` (divisors: 1 keeps a full
    copy, inf moves it to CPU memory) and the bytes of gathered layers it holds at once.

    FSDP and ZeRO-3 shard weights, gradients and optimizer state and gather about two
    layers at a time (the running one and the prefetched next); ZeRO-2 shards gradients
    and optimizer state, ZeRO-1 the optimizer state; offload moves them to the CPU."""
    from vlmtrain.engines import DEEPSPEED, DEEPSPEED_ALIASES, FSDP, deepspeed_settings

    full = {"weights": 1, "grads": 1, "optimizer": 1, "gathered": 0, "name": trainer.strategy}
    if devices <= 1 and trainer.strategy not in (FSDP, DEEPSPEED, *DEEPSPEED_ALIASES):
        return full
    if trainer.strategy == FSDP:
        gathered = 2 * unit_bytes / (2 if trainer.fsdp.param_dtype else 1) * (devices > 1)
        return {**full, "weights": devices, "grads": devices, "optimizer": devices,
                "gathered": gathered, "name": "fsdp (FSDP2)"}  # fmt: skip
    if trainer.strategy == DEEPSPEED or trainer.strategy in DEEPSPEED_ALIASES:
        stage, off_optim, off_params = deepspeed_settings(trainer, trainer.strategy)
        out = {**full, "optimizer": devices, "name": f"deepspeed ZeRO-{stage}"}
        if stage >= 2:
            out["grads"] = devices
        if stage == 3:
            out.update(weights=devices, gathered=2 * unit_bytes * (devices > 1))
        if off_optim:
            out["optimizer"] = float("inf")
            out["name"] += " + optimizer offload"
        if off_params:
            out["weights"] = float("inf")
            out["gathered"] = 2 * unit_bytes
            out["name"] += " + parameter offload"
        return out
    return full


def plan_flops(model, cfg: DictConfig, data, samples_per_device: int) -> dict[str, Any]:
    """Model FLOPs of one optimizer step on one device (vlmtrain.flops): a typical sample
    of the data when it is here (mixture-weighted means), else one image and max_length
    tokens per sample; times the samples of the step and the sequences each runs."""
    stage = cfg.stage
    sequences = objective_for(stage.objective).sequences_per_sample
    weights = {r.name: stage.mixture.get(r.name, 0) for r in data or []}
    if data and sum(weights.values()) > 0:

        def mean(key):
            sums = [(r.summary()[key].get("mean") or 0) * weights[r.name] for r in data]
            return sum(sums) / sum(weights.values())

        length, images = round(mean("tokens")), mean("image_tokens") / model.tokens_per_image
        logits, basis = round(mean("supervised_tokens")), "a typical sample of the data"
    else:
        length, images = stage.max_length, 1
        logits, basis = max(stage.max_length - model.tokens_per_image, 1), "max_length, 1 image"
    shape = StepShape(max(sequences, 1), max(length, 1), round(images), max(logits, 1))
    per_sample = step_flops(model, shape, lm_runs=sequences > 0)
    return {
        "per_step": total(per_sample) * samples_per_device,
        "by_part": {
            part: {k: v * samples_per_device for k, v in fb.items()}
            for part, fb in per_sample.items()
        },
        "basis": basis,
    }


def describe_init(cfg: DictConfig) -> dict[str, str]:
    """What each component starts from, without touching the filesystem."""
    out = {}
    for comp in ("vision", "projector", "lm"):
        spec = str(cfg.stage.init[comp])
        path = cfg.model[comp].path if comp != "projector" else None
        if spec in ("auto", "pretrained") and path:
            spec = f"pretrained {path}"
        elif spec == "pretrained":
            spec = f"pretrained (needs model.{comp}.path)"
        elif spec == "auto":
            spec = "fresh"
        out[comp] = spec
    return out


def plan_stage(cfg: DictConfig) -> dict[str, Any]:
    check_strategy(cfg.trainer.strategy)
    objective_for(cfg.stage.objective).check_stage(cfg)
    init = describe_init(cfg)
    tokenizer = _tokenizer_or_none(cfg)
    model = VisionLanguageModel.build(cfg.model, tokenizer, device="meta")
    apply_trainable(model, cfg.stage.trainable, cfg.stage.lora)
    counts = parameter_counts(model)
    data = _data_report(cfg, tokenizer)
    supervised = None
    if data and (means := [r.summary()["supervised_tokens"].get("mean") for r in data]):
        supervised = max((m for m in means if m is not None), default=None)
    stage, trainer = cfg.stage, cfg.trainer
    devices = trainer.devices if isinstance(trainer.devices, int) else 1
    samples_per_step = stage.batch_size * stage.accumulate * devices * trainer.num_nodes
    return {
        "stage": stage.name,
        "objective": stage.objective,
        "model": describe_model(cfg.model),
        "tokenizer": (
            f"{cfg.model.tokenizer} ({len(tokenizer):,} tokens)"
            if tokenizer is not None
            else f"none yet (lm.vocab_size {cfg.model.lm.vocab_size} + image token)"
        ),
        "mixture": dict(stage.mixture),
        "init": init,
        "parameters": {k: {"trainable": t, "frozen": f} for k, (t, f) in counts.items()},
        # At most, for a tiled image: tiles x tokens per tile (model.tiling).
        "image_tokens_per_image": max_tower_inputs(cfg.model) * model.tokens_per_image,
        "tiles_per_image": max_tower_inputs(cfg.model),
        "image_size": model.vision_spec.image_size,
        "samples_per_step": samples_per_step,
        "max_tokens_per_step": samples_per_step * stage.max_length,
        "steps": stage.max_steps,
        "max_length": stage.max_length,
        "memory_gib_per_device": estimate_memory(counts, model, cfg, supervised),
        "strategy": sharded_states(cfg.trainer, _devices(cfg.trainer), 0)["name"],
        "logits_per_sample": (
            "none (this objective does not run the LM)"
            if objective_for(stage.objective).sequences_per_sample == 0
            else f"{supervised:.0f} supervised positions (measured)"
            if supervised is not None
            else f"<= {max(stage.max_length - model.tokens_per_image, 1)} positions "
            "(max_length less one image's tokens; no data to measure)"
        ),
        "data": data,
        "flops": plan_flops(model, cfg, data, stage.batch_size * stage.accumulate),
    }


def _data_report(cfg: DictConfig, tokenizer):
    """The stage's data as inspect-data sees it, when the data and tokenizer are here."""
    from vlmtrain.data.inspect import data_present, inspect_stage, stage_encoder

    if tokenizer is None or not data_present(cfg):
        return None
    return inspect_stage(cfg, stage_encoder(cfg), show=1, examine=100)


def plan_recipe(cfg: DictConfig, run_dir: Path | None = None) -> list[dict[str, Any]]:
    stages = stage_list(cfg)
    check_order(stages, run_dir)
    configs = [(name, stage_config(cfg, name, stage)) for name, stage in stages]
    check_handoffs(configs, run_dir)
    plans = [plan_stage(scfg) for _, scfg in configs]
    print_plan(plans, cfg)
    return plans


def print_plan(plans: list[dict[str, Any]], cfg: DictConfig) -> None:
    from vlmtrain.data.inspect import format_reports

    t = cfg.trainer
    available, source = device_memory_gib(t)
    console.print(
        f"[bold]plan[/] model={cfg.model.name} trainer: {t.accelerator} x{t.devices} "
        f"({t.strategy}, {t.precision})"
    )
    for p in plans:
        table = Table(
            title=f"stage {p['stage']} ({p['objective']}), {p['steps']} steps, mixture {p['mixture']}"
        )
        for col in ("component", "init", "trainable", "frozen"):
            table.add_column(col, justify="left" if col in ("component", "init") else "right")
        for comp, c in p["parameters"].items():
            table.add_row(comp, p["init"][comp], f"{c['trainable']:,}", f"{c['frozen']:,}")
        total_t = sum(c["trainable"] for c in p["parameters"].values())
        total_f = sum(c["frozen"] for c in p["parameters"].values())
        table.add_row("all", "", f"{total_t:,}", f"{total_f:,}", style="bold")
        console.print(f"[bold]stage {p['stage']}[/] model {p['model']}; tokenizer {p['tokenizer']}")
        console.print(table)
        mem = p["memory_gib_per_device"]
        console.print(
            f"  image tokens per image {p['image_tokens_per_image']}"
            + (
                f" (up to {p['tiles_per_image']} tiles of {p['image_size']} px)"
                if p["tiles_per_image"] > 1
                else f" ({p['image_size']} px)"
            )
            + f"; samples per step "
            f"{p['samples_per_step']}; tokens per step <= {p['max_tokens_per_step']:,}\n"
            f"  memory per device under {p['strategy']} (estimate at max_length, activation checkpointing "
            f"{'on' if cfg.trainer.activation_checkpointing else 'off'}): {mem['total']:.1f} GiB = weights {mem['weights']:.1f} "
            f"+ grads {mem['grads']:.1f} + optimizer {mem['optimizer']:.1f} + activations {mem['activations']:.1f}"
            + "".join(
                f" + {k} {v:.1f}"
                for k, v in mem.items()
                if k not in ("weights", "grads", "optimizer", "activations", "total")
            )
            + f"\n  logits per sample: {p['logits_per_sample']}"
            + f"\n  model FLOPs per step and device ({p['flops']['basis']}): "
            + f"{p['flops']['per_step']:.3g} = "
            + " + ".join(
                f"{part} {fb['forward']:.3g} fwd / {fb['backward']:.3g} bwd"
                for part, fb in p["flops"]["by_part"].items()
            )
        )
        if available is not None and mem["total"] > available:
            console.print(
                f"  [bold red]warning[/]: the estimate exceeds the {available:.0f} GiB of a "
                f"device ({source}): shard more (trainer.strategy), turn on "
                "trainer.activation_checkpointing, or lower the batch size"
            )
        if p["data"]:
            console.print(format_reports(p["stage"], p["max_length"], p["data"]))
        else:
            console.print("  data: not found here (vlmtrain inspect-data once it is)")
