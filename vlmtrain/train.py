"""Run one stage: assemble the model, initialize its components, train, write the artifact.

This is the training entry every stage goes through; the objective-specific
logic lives in ``vlmtrain.objectives``. Re-running a stage resumes it from its
last checkpoint; a stage whose artifact exists is finished and is skipped.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from vlmtrain.artifacts import (
    config_hash,
    load_component,
    read_manifest,
    same_stage,
    save_artifact,
)
from vlmtrain.config import COMPONENTS, schema_defaults
from vlmtrain.data.chat import check_chat_template
from vlmtrain.data.encode import SampleEncoder
from vlmtrain.data.images import ImageProcessor
from vlmtrain.loggers import build_logger
from vlmtrain.model.freezing import apply_trainable, parameter_table
from vlmtrain.model.lm import load_tokenizer
from vlmtrain.model.vision import build_image_processor
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.objectives.registry import objective_for
from vlmtrain.runtime import keep_freed_memory

console = Console()


def prepare_data(cfg: DictConfig) -> None:
    """Generate the configured synthetic data if it is not there yet."""
    if cfg.data.generate == "shapes":
        from vlmtrain.data.shapes import ShapesConfig, ensure_shapes

        ensure_shapes(cfg.data.root, ShapesConfig(seed=cfg.data.seed))
    elif cfg.data.generate:
        raise ValueError(f"data.generate={cfg.data.generate!r}: only 'shapes' can be generated")


def resolve_init(stage: DictConfig, model_cfg: DictConfig, run_dir: Path) -> dict[str, str | Path]:
    """component -> 'fresh' | 'pretrained' | artifact directory."""
    out: dict[str, str | Path] = {}
    for name in COMPONENTS:
        spec = str(stage.init[name])
        has_path = name != "projector" and bool(model_cfg[name].path)
        if spec == "auto":
            out[name] = "pretrained" if has_path else "fresh"
        elif spec == "pretrained":
            if not has_path:
                raise ValueError(
                    f"stage.init.{name}=pretrained, but model.{name}.path is not set"
                    + (" (the projector has no pretrained source)" if name == "projector" else "")
                )
            out[name] = "pretrained"
        elif spec == "fresh":
            if has_path:
                raise ValueError(
                    f"stage.init.{name}=fresh, but model.{name}.path names pretrained weights; "
                    f"set one or the other"
                )
            out[name] = "fresh"
        elif spec.startswith("from:"):
            source = run_dir / spec[len("from:") :] / "artifact"
            if not (source / "manifest.json").is_file():
                raise FileNotFoundError(
                    f"stage.init.{name}={spec!r}: that stage has no artifact at {source} "
                    "(it has not finished in this run)"
                )
            out[name] = source
        else:
            read_manifest(Path(spec))  # fails clearly when it is not an artifact
            out[name] = Path(spec)
    return out


def build_model(cfg: DictConfig, init: dict[str, str | Path]):
    """Tokenizer and model, each component initialized as ``init`` (see resolve_init) says."""
    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    check_chat_template(tokenizer)
    model = VisionLanguageModel.build(cfg.model, tokenizer)
    for name, source in init.items():
        if isinstance(source, Path):
            load_component(model.components()[name], name, source)
    return tokenizer, model


# Tests set this to interrupt a run exactly as a pre-empted cluster job is, while the
# command line stays the same for the resume.
KILL_ENV = "VLMTRAIN_KILL_AFTER_STEP"


class KillAfterStep(Callback):
    """SIGKILL the process (no clean-up) once the given optimizer step is done."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class StageClock(Callback):
    """A stage's training time over all its runs: checkpoints carry the time so far, so a
    resumed stage adds its earlier runs' time up to their last checkpoint (steps redone
    after a kill count once, at their redo)."""

    def __init__(self):
        self.before = 0.0  # from the checkpoint resumed
        self.start: float | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return self.before + (time.perf_counter() - self.start if self.start is not None else 0.0)

    def state_dict(self) -> dict[str, float]:
        return {"elapsed_s": self.elapsed()}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.before = state["elapsed_s"]


def build_trainer(cfg: DictConfig, stage_dir: Path) -> L.Trainer:
    stage = cfg.stage
    callbacks: list[Callback] = [
        StageClock(),
        ModelCheckpoint(
            dirpath=stage_dir / "checkpoints",
            every_n_train_steps=cfg.trainer.checkpoint_every,
            save_last=True,
            save_top_k=0,
        ),
    ]
    if cfg.trainer.progress_bar:
        callbacks.append(RichProgressBar())
    if os.environ.get(KILL_ENV):
        callbacks.append(KillAfterStep(int(os.environ[KILL_ENV])))
    return L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
        precision=cfg.trainer.precision,
        max_steps=stage.max_steps,
        max_epochs=-1,
        logger=build_logger(cfg, stage_dir),
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
        use_distributed_sampler=False,  # the datamodule shards by rank itself
    )


def make_encoder(cfg: DictConfig, model: VisionLanguageModel, tokenizer) -> SampleEncoder:
    """Samples -> model inputs for this model: its image processor, its image-token count."""
    spec = model.vision_spec
    images = ImageProcessor(
        build_image_processor(cfg.model.vision, spec),
        spec.patch_size,
        cfg.data.root,
        model.token_downsample,
    )
    return SampleEncoder(tokenizer, images, cfg.model.image_token, cfg.stage.max_length)


def run_stage(cfg: DictConfig, run_dir: Path) -> Path:
    """Train ``cfg.stage`` in ``run_dir/<stage name>``; return its artifact directory."""
    stage = cfg.stage
    stage_dir = Path(run_dir) / stage.name
    artifact_dir = stage_dir / "artifact"
    resolved = OmegaConf.to_container(cfg, resolve=True)
    init = resolve_init(stage, cfg.model, run_dir)
    # A stage is "the same" when its config and the artifacts it starts from are.
    sources = {k: read_manifest(v)["config_hash"] for k, v in init.items() if isinstance(v, Path)}
    hashed = {**{k: resolved[k] for k in ("model", "data", "stage", "seed")}, "sources": sources}
    digest = config_hash(hashed)
    if (artifact_dir / "manifest.json").is_file():
        same, why = same_stage(read_manifest(artifact_dir), hashed, schema_defaults())
        if not same:
            shown = "\n  ".join(why[:12]) + (
                f"\n  ... {len(why) - 12} more" if len(why) > 12 else ""
            )
            raise RuntimeError(
                f"stage {stage.name!r} already finished in {stage_dir} with a different config "
                f"or different source artifacts; what changed:\n  {shown}\n"
                f"Use another run_name, or delete {artifact_dir} (and {stage_dir / 'checkpoints'}) "
                "to train it again."
            )
        console.print(f"[bold]stage {stage.name}[/] already finished: {artifact_dir}")
        if why:
            console.print(
                "  its config lacked keys added since, at their defaults: " + "; ".join(why)
            )
        evaluate_if_asked(cfg, artifact_dir, stage_dir)
        return artifact_dir

    objective = objective_for(stage.objective)
    objective.check(cfg)  # before any data or model work
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    if cfg.trainer.keep_freed_memory:
        keep_freed_memory()
    prepare_data(cfg)
    tokenizer, model = build_model(cfg, init)
    apply_trainable(model, stage.trainable, stage.lora)
    if cfg.trainer.activation_checkpointing:
        model.enable_activation_checkpointing()
    _print_start(stage, model, init)

    encoder = make_encoder(cfg, model, tokenizer)
    module, datamodule = objective.build(cfg, model, tokenizer, encoder, stage_dir)

    trainer = build_trainer(cfg, stage_dir)
    ckpt_dir = stage_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if last.is_file():
        console.print(f"[bold]stage {stage.name}[/]: resuming from {last}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)
    (clock,) = (c for c in trainer.callbacks if isinstance(c, StageClock))

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics.update(
        steps=trainer.global_step,
        tokens_seen=module.tokens_seen,
        wall_time_s=clock.elapsed(),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    if torch.cuda.is_available():
        metrics["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if trainer.is_global_zero:
        save_artifact(
            model,
            tokenizer,
            artifact_dir,
            {
                "stage": stage.name,
                "objective": stage.objective,
                "config_hash": digest,
                "config": resolved,
                "init": {k: str(v) for k, v in init.items()},
                "metrics": metrics,
            },
        )
    # Other ranks must not read the artifact (next stage) before rank 0 has written it.
    trainer.strategy.barrier("artifact")
    _print_end(stage, metrics, artifact_dir, stage_dir)
    evaluate_if_asked(cfg, artifact_dir, stage_dir)
    return artifact_dir


@rank_zero_only
def evaluate_if_asked(cfg: DictConfig, artifact_dir: Path, stage_dir: Path) -> None:
    """Evaluate the stage's artifact on its eval splits, once (results are kept)."""
    if not cfg.stage.eval_splits or (stage_dir / "eval" / "eval.json").is_file():
        return
    from vlmtrain.eval import evaluate_artifact, write_report

    results = evaluate_artifact(
        artifact_dir, cfg.data.root, splits=tuple(cfg.stage.eval_splits), limit=cfg.stage.eval_limit
    )
    write_report(results, stage_dir / "eval")


@rank_zero_only
def _print_start(stage: DictConfig, model: VisionLanguageModel, init: dict[str, Any]) -> None:
    sources = ", ".join(f"{k}: {v}" for k, v in init.items())
    console.print(f"[bold]stage {stage.name}[/] ({stage.objective}); init {sources}")
    console.print(parameter_table(model, title=f"stage {stage.name}: parameters"))


@rank_zero_only
def _print_end(
    stage: DictConfig, metrics: dict[str, float], artifact_dir: Path, stage_dir: Path
) -> None:
    loss = metrics.get("train/loss")
    console.print(
        f"[bold]stage {stage.name}[/] done: {metrics['steps']} steps in {metrics['wall_time_s']:.1f}s"
        + (f", final loss {loss:.4f}" if loss is not None else "")
        + f", peak RSS {metrics['peak_rss_mb']:.0f} MB\n  artifact: {artifact_dir}\n  logs: {stage_dir / 'logs'}"
    )
