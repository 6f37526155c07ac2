"""Run one stage: assemble the model, initialize its components, train, write the artifact.

This is the training entry every stage goes through; the objective-specific
logic lives in ``vlmtrain.objectives``. Re-running a stage resumes it from its
last checkpoint; a stage whose artifact exists is finished and is skipped.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from vlmtrain.artifacts import (
    artifact_problems,
    config_hash,
    load_component,
    read_manifest,
    reuse_finished,
    same_stage,
    save_artifact,
    set_aside_damaged,
)
from vlmtrain.callbacks import KILL_ENV, KillAfterStep, LastMetrics, StageClock
from vlmtrain.checkpoints import (
    AtomicCheckpointIO,
    CheckpointRecord,
    checkpoint_callback,
    choose_checkpoint,
    resume_point,
    world_size_of,
)
from vlmtrain.composition import (
    check_frozen_fresh,
    resolve_init,
    tokenizer_record,
)
from vlmtrain.config import schema_defaults
from vlmtrain.data.chat import check_chat_template
from vlmtrain.data.encode import SampleEncoder
from vlmtrain.data.fingerprint import data_fingerprints
from vlmtrain.data.images import ImageLimits, ImageProcessor
from vlmtrain.data.quality import DataQuality
from vlmtrain.data.stage_data import resolve_stage_data
from vlmtrain.engines import build_strategy
from vlmtrain.flops import peak_flops
from vlmtrain.hardware import check_strategy
from vlmtrain.loggers import build_logger, log_location
from vlmtrain.model.freezing import apply_trainable, parameter_table
from vlmtrain.model.lm import load_tokenizer
from vlmtrain.model.vision import build_image_processor
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.objectives.registry import objective_for
from vlmtrain.records import (
    current_evaluation,
    mark_evaluated,
    set_aside,
    set_aside_previous,
    write_stage_record,
)
from vlmtrain.requeue import RequeueAtStepBoundary, slurm_plugins
from vlmtrain.runtime import keep_freed_memory
from vlmtrain.sharding import artifact_source

console = Console()


def prepare_data(cfg: DictConfig) -> None:
    """Generate the configured synthetic data if it is not there yet."""
    if cfg.data.generate == "shapes":
        from vlmtrain.data.shapes import ensure_shapes, shapes_config

        ensure_shapes(cfg.data.root, shapes_config(cfg.data.seed, cfg.data.shapes))
    elif cfg.data.generate:
        raise ValueError(f"data.generate={cfg.data.generate!r}: only 'shapes' can be generated")


def build_model(cfg: DictConfig, init: dict[str, str | Path]):
    """Tokenizer and model, each component initialized as ``init`` (see resolve_init) says."""
    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    check_chat_template(tokenizer)
    model = VisionLanguageModel.build(cfg.model, tokenizer)
    for name, source in init.items():
        if isinstance(source, Path):
            load_component(model.components()[name], name, source)
    # from_pretrained leaves modules in eval mode and Lightning keeps the modes it finds:
    # without this a pretrained LM or tower would train with its dropout switched off.
    return tokenizer, model.train()


def build_trainer(
    cfg: DictConfig,
    stage_dir: Path,
    record: CheckpointRecord | None = None,
    *,
    fresh_start: bool = False,
) -> L.Trainer:
    stage = cfg.stage
    check_strategy(cfg.trainer.strategy)
    callbacks: list[Callback] = [
        StageClock(),
        LastMetrics(),
        checkpoint_callback(
            stage_dir / "checkpoints", cfg.trainer.checkpoint_every, cfg.trainer.keep_checkpoints
        ),
        *([record] if record is not None else []),
        DataQuality(
            [n for n, w in stage.mixture.items() if w > 0], cfg.data.max_skipped, stage.max_length
        ),
    ]
    if cfg.trainer.progress_bar:
        callbacks.append(RichProgressBar())
    if cfg.trainer.requeue_signal:
        callbacks.append(RequeueAtStepBoundary(cfg.trainer.requeue_signal))
    if os.environ.get(KILL_ENV):
        callbacks.append(KillAfterStep(int(os.environ[KILL_ENV])))
    return L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=build_strategy(cfg.trainer, world_size_of(cfg.trainer), cfg.stage.optim.grad_clip),
        precision=cfg.trainer.precision,
        max_steps=stage.max_steps,
        max_epochs=-1,
        logger=build_logger(cfg, stage_dir, fresh_start=fresh_start),
        callbacks=callbacks,
        log_every_n_steps=cfg.trainer.log_every,
        val_check_interval=stage.val_every or None,
        check_val_every_n_epoch=None,
        limit_val_batches=stage.val_batches if stage.val_every else 0,
        num_sanity_val_steps=0,
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=False,
        deterministic=cfg.trainer.deterministic,
        default_root_dir=stage_dir,
        plugins=[AtomicCheckpointIO(), *slurm_plugins()],
        use_distributed_sampler=False,  # the datamodule shards by rank itself
    )


def make_encoder(cfg: DictConfig, model: VisionLanguageModel, tokenizer) -> SampleEncoder:
    """Samples -> model inputs for this model: its image processor, its image-token count."""
    processor = build_image_processor(cfg.model.vision, model.vision_spec)
    limits = ImageLimits.from_config(cfg.data)
    images = ImageProcessor.for_model(processor, model, cfg.model, cfg.data.root, limits)
    return SampleEncoder(tokenizer, images, cfg.model.image_token, cfg.stage.max_length)


def run_stage(cfg: DictConfig, run_dir: Path) -> Path:
    """Train ``cfg.stage`` in ``run_dir/<stage name>``; return its artifact directory."""
    cfg = resolve_stage_data(cfg, run_dir)  # data an earlier stage wrote (from:<stage>/<file>)
    stage = cfg.stage
    stage_dir = Path(run_dir) / stage.name
    artifact_dir = stage_dir / "artifact"
    resolved = OmegaConf.to_container(cfg, resolve=True)
    init = resolve_init(stage, cfg.model, run_dir)
    check_frozen_fresh(stage, init)
    objective = objective_for(stage.objective)
    objective.check_stage(cfg)  # before any data or model work
    prepare_data(cfg)
    # A stage is "the same" when its config, the artifacts it starts from and its data are.
    sources = {k: read_manifest(v)["config_hash"] for k, v in init.items() if isinstance(v, Path)}
    hashed = {
        **{k: resolved[k] for k in ("model", "data", "stage", "seed")},
        "sources": sources,
        "data_files": data_fingerprints(cfg.data, stage),
    }
    digest = config_hash(hashed)
    if artifact_dir.exists() and (problems := artifact_problems(artifact_dir)):
        _set_aside_damaged(artifact_dir, problems)
    if cfg.start_from and not artifact_dir.exists():
        _reuse(Path(cfg.start_from) / stage.name / "artifact", artifact_dir, hashed)
    if (artifact_dir / "manifest.json").is_file():
        same, why = same_stage(read_manifest(artifact_dir), hashed, schema_defaults())
        if not same:
            shown = "\n  ".join(why[:12]) + (
                f"\n  ... {len(why) - 12} more" if len(why) > 12 else ""
            )
            raise RuntimeError(
                f"stage {stage.name!r} already finished in {stage_dir} with a different config, "
                f"source artifacts or data; what changed:\n  {shown}\n"
                f"Use another run_name, or delete {artifact_dir} (and {stage_dir / 'checkpoints'}) "
                "to train it again."
            )
        console.print(f"[bold]stage {stage.name}[/] already finished: {artifact_dir}")
        if why:
            console.print("  finished by an older vlmtrain; taken as unchanged: " + "; ".join(why))
        evaluate_if_asked(cfg, artifact_dir, stage_dir)
        return artifact_dir

    # A checkpoint this run cannot continue (other config or number of processes) is
    # refused before any model is built; its model shapes are checked once one is.
    chosen = choose_checkpoint(stage_dir / "checkpoints", _say(stage.name))
    resume_point(chosen, stage_dir, hashed, world_size_of(cfg.trainer), shapes=None)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    if cfg.trainer.keep_freed_memory:
        keep_freed_memory()
    tokenizer, model = build_model(cfg, init)
    apply_trainable(model, stage.trainable, stage.lora)
    if cfg.trainer.activation_checkpointing:
        model.enable_activation_checkpointing()
    if cfg.trainer.compile:
        model.compile()
    _print_start(stage, model, init)

    encoder = make_encoder(cfg, model, tokenizer)
    module, datamodule = objective.build(cfg, model, tokenizer, encoder, stage_dir)
    module.peak_flops = peak_flops(cfg.trainer)
    if cfg.trainer.feature_cache and module.feature_cache is None:
        note = module.feature_cache_note or f"objective {stage.objective} does not use it"
        _say(stage.name)(note if module.feature_cache_note else f"trainer.feature_cache: {note}")

    trainer = build_trainer(
        cfg,
        stage_dir,
        CheckpointRecord(hashed, digest, cfg.trainer.strategy),
        fresh_start=chosen is None,
    )
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    resume = resume_point(chosen, stage_dir, hashed, trainer.world_size, shapes, _say(stage.name))
    _start_records(stage.name, stage_dir, resolved, resuming=resume is not None)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    (clock,) = (c for c in trainer.callbacks if isinstance(c, StageClock))
    (last_metrics,) = (c for c in trainer.callbacks if isinstance(c, LastMetrics))
    (quality,) = (c for c in trainer.callbacks if isinstance(c, DataQuality))
    data_totals = quality.totals(trainer.strategy)

    metrics = last_metrics.metrics()
    metrics.update(
        steps=trainer.global_step,
        tokens_seen=module.tokens_seen,
        wall_time_s=clock.elapsed(),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **quality.metrics(data_totals),
    )
    if torch.cuda.is_available():
        metrics["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    # Under FSDP every rank takes part in gathering the full weights rank 0 writes.
    full_model, extras = artifact_source(module, trainer.is_global_zero)
    if trainer.is_global_zero:
        save_artifact(
            full_model,
            tokenizer,
            artifact_dir,
            {
                "stage": stage.name,
                "objective": stage.objective,
                "config_hash": digest,
                "config": resolved,
                "data_files": hashed["data_files"],
                "skipped_samples": quality.skipped,
                "init": {k: str(v) for k, v in init.items()},
                "tokenizer": tokenizer_record(cfg.model, tokenizer),
                "metrics": metrics,
            },
            image_processor=build_image_processor(cfg.model.vision, full_model.vision_spec),
            extras=extras,
        )
    # Other ranks must not read the artifact (next stage) before rank 0 has written it.
    trainer.strategy.barrier("artifact")
    _print_end(stage, metrics, artifact_dir, trainer, quality.report(data_totals))
    evaluate_if_asked(cfg, artifact_dir, stage_dir)
    return artifact_dir


def _say(name: str):
    return rank_zero_only(lambda msg: console.print(f"[bold]stage {name}[/]: {msg}"))


@rank_zero_only  # other ranks wait for the artifact at the stage's first barrier
def _reuse(source: Path, artifact_dir: Path, identity: dict) -> None:
    said = reuse_finished(source, artifact_dir, identity, schema_defaults())
    console.print(f"[bold]stage {artifact_dir.parent.name}[/]: {said}")


def _set_aside_damaged(artifact_dir: Path, problems: list[str]) -> None:
    """A finished stage whose artifact does not read back is not finished: keep the damaged
    one for inspection and train the stage again (from its newest checkpoint)."""
    aside = artifact_dir.with_name("artifact.damaged")
    if rank_zero_only.rank == 0:
        set_aside_damaged(artifact_dir)
    console.print(
        f"[bold]stage {artifact_dir.parent.name}[/]: its artifact {artifact_dir} is damaged:\n  "
        + "\n  ".join(problems)
        + f"\n  set aside as {aside.name}; the stage is trained again from its newest checkpoint"
    )


@rank_zero_only
def evaluate_if_asked(cfg: DictConfig, artifact_dir: Path, stage_dir: Path) -> None:
    """Evaluate the stage's artifact on its eval splits, once per artifact: results are
    kept; an evaluation of an earlier artifact of this stage is set aside, never reported
    as this one's; a missing or damaged report is written again."""
    from vlmtrain.eval import evaluate_artifact, read_report, write_report

    eval_dir = stage_dir / "eval"
    if not cfg.stage.eval_splits:
        return
    if current_evaluation(eval_dir, artifact_dir) and read_report(eval_dir) is not None:
        return
    if eval_dir.exists():
        moved = set_aside(eval_dir)
        console.print(f"stage {cfg.stage.name}: evaluation of another artifact kept as {moved}")

    results = evaluate_artifact(
        artifact_dir, cfg.data.root, splits=tuple(cfg.stage.eval_splits), limit=cfg.stage.eval_limit
    )
    write_report(results, eval_dir)
    mark_evaluated(eval_dir, artifact_dir, owner="stage", limit=cfg.stage.eval_limit)


@rank_zero_only  # once: other DDP ranks re-run this script after rank 0 began logging
def _start_records(name: str, stage_dir: Path, resolved: dict, resuming: bool) -> None:
    """Past every check that could refuse this invocation: a stage started from scratch
    sets an earlier training's logs and evaluation aside (they describe another model),
    then the stage's config and this invocation are recorded."""
    if not resuming:
        for old, new in set_aside_previous(stage_dir):
            console.print(f"stage {name}: earlier training's {old.name}/ kept as {new}")
    write_stage_record(stage_dir, resolved, resumed=resuming)


@rank_zero_only
def _print_start(stage: DictConfig, model: VisionLanguageModel, init: dict[str, Any]) -> None:
    sources = ", ".join(f"{k}: {v}" for k, v in init.items())
    console.print(f"[bold]stage {stage.name}[/] ({stage.objective}); init {sources}")
    console.print(parameter_table(model, title=f"stage {stage.name}: parameters"))


@rank_zero_only
def _print_end(
    stage: DictConfig,
    metrics: dict[str, float],
    artifact_dir: Path,
    trainer: L.Trainer,
    data_report: list[str],
) -> None:
    loss = metrics.get("train/loss")
    logs = "\n".join(f"  logs: {log_location(lg)}" for lg in trainer.loggers)
    console.print(
        f"[bold]stage {stage.name}[/] done: {metrics['steps']} steps in {metrics['wall_time_s']:.1f}s"
        + (f", final loss {loss:.4f}" if loss is not None else "")
        + f", peak RSS {metrics['peak_rss_mb']:.0f} MB\n  artifact: {artifact_dir}\n{logs}"
    )
    for line in data_report:
        console.print(f"  data {line}")
