"""Structured config schemas, registered in Hydra's ConfigStore.

Every config group under ``conf/`` is validated against one of these
dataclasses: an unknown key in a YAML file or on the command line fails at
compose time with the key's full name. The root schema is ``VLMTrainConfig``;
``conf/config.yaml`` lists it first in its defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlmtrain.objective_configs import AimConfig, GenerateConfig, GrpoConfig, PreferenceConfig

COMPONENTS = ("vision", "projector", "lm")


# ----------------------------------------------------------------------------- model
@dataclass
class VisionConfig:
    # siglip | clip (transformers vision towers) | vit_hybrid (from scratch: a ViT on a
    # small BiT ResNet, transformers' DPT hybrid; stem_blocks = BiT blocks per stage)
    type: str = "siglip"
    path: str | None = None  # local pretrained directory; dims below are ignored when set
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    # Patch embedding of a tower trained from scratch: "patch" (the linear one of
    # SigLIP/CLIP) or "conv" (a stride-2 3x3 convolution stack beside it; see
    # vlmtrain.model.vision.ConvPatchEmbedding). Pretrained towers keep theirs.
    stem: str = "patch"
    # stem=conv: residual 3x3 convolutions on the patch grid after the stride-2 stack;
    # each lets a patch see one more patch on every side (a whole large object).
    stem_blocks: int = 0
    # type=vit_hybrid: the ResNet its patches come from, built by transformers'
    # load_backbone: "bit" (the default: weight-standardized convolutions, GroupNorm,
    # bottlenecks), "resnet" (BatchNorm, basic 3x3 blocks, like stem=conv) or "focalnet"
    # (linear patchify stem, LayerNorm, residual focal-modulation + MLP blocks).
    backbone: str | None = None
    # backbone=focalnet: the stride of its patchify stem (4, FocalNet's; or 2, a stage
    # more, so nonlinear blocks see 2x2 pixel patches, as stem=conv's first convolution
    # does) and whether it and the downsamplings convolve with overlap (FocalNet's
    # use_conv_embed: 7x7 stride-4 stem, 3x3 stride-2 downsamplings).
    backbone_stride: int = 4
    backbone_overlap: bool = False
    # Which hidden state feeds the projector: -1 last layer, -2 penultimate (LLaVA).
    # Layers after it are dropped from the tower, so nothing is computed or held unused.
    feature_layer: int = -1


@dataclass
class ProjectorConfig:
    type: str = "mlp2x_gelu"  # linear | mlp2x_gelu | pixel_shuffle_mlp
    downsample: int = 2  # pixel_shuffle_mlp: r x r patches per image token


@dataclass
class LMConfig:
    type: str = "llama"  # any transformers causal-LM model_type (llama, qwen2, mistral, ...)
    path: str | None = None  # local pretrained directory; dims below are ignored when set
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 512
    # The tokenizer's size decides; this is used when there is none (planning a recipe).
    vocab_size: int | None = None
    tie_word_embeddings: bool = False
    # Any further keyword for the transformers config (e.g. rope_theta, head_dim).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TilingConfig:
    """Dynamic high resolution (InternVL 1.5+, vlmtrain.data.tiling): each image becomes a
    grid of tiles of the tower's image_size chosen by aspect ratio, plus a thumbnail;
    image tokens = tiles x tokens per tile. Off: one image = one tower input (the
    processor's own resize/crop)."""

    enabled: bool = False
    min_tiles: int = 1
    max_tiles: int = 12  # per sample: a sample's images share it (max(1, max // n) each)
    thumbnail: bool = True  # the whole image as one more tile when there are several


@dataclass
class ModelConfig:
    name: str = "tiny"
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    # Local tokenizer directory; by default the LM's own (model.lm.path).
    tokenizer: str | None = None
    image_token: str = "<image>"


# ------------------------------------------------------------------------------ data
@dataclass
class DatasetConfig:
    train: str = MISSING  # LLaVA JSON or JSONL
    val: str | None = None


@dataclass
class DataConfig:
    name: str = "shapes"
    root: str = MISSING  # image paths in the files are relative to this directory
    # When set, the data is generated into ``root`` if missing (``shapes`` only for now).
    generate: str | None = None
    seed: int = 0
    # Generator options for `generate: shapes` (ShapesConfig fields: canvas, small, large,
    # n_grounding_train, n_ocr_train, ...); empty: the default shapes world.
    shapes: dict[str, Any] = field(default_factory=dict)
    # name -> DatasetConfig fields. Typed Any because OmegaConf cannot add a structured
    # value to a typed dict from the command line (`+data.datasets.mine.train=...`);
    # `dataset_config` checks each entry against DatasetConfig before any training.
    datasets: dict[str, Any] = field(default_factory=dict)
    # The chat template: a name (chatml, llama3, vicuna_v1, mistral, gemma; see
    # vlmtrain.data.templates) or a Jinja string with {% generation %} blocks. Unset: the
    # tokenizer's own, or its family's named template when its own marks no assistant spans.
    chat_template: str | None = None
    num_workers: int = 0
    # Keep every encoded sample (token ids, labels, pixels) in memory after first use:
    # for datasets that fit in RAM and are seen for many epochs (the tiny recipe).
    cache_encoded: bool = False
    # A directory for the encoded store (vlmtrain.data.store): every data file encoded
    # once into memory-mapped Arrow, shared by loader workers, epochs, stages and runs
    # with the same data and encoder settings. None: encode on the fly.
    encoded_store: str | None = None
    # Part of a stage's identity: each data file's size and hash, and, when this is on,
    # each image's size and modification time (a stat per image; turn off for millions
    # of images on a slow shared file system).
    fingerprint_images: bool = True
    # Images beyond these limits are bad input (decompression bombs, banners, strips).
    max_image_pixels: int = 89_478_485  # PIL's own warning threshold
    max_aspect_ratio: float = 20.0
    # Image paths must stay inside ``root`` (no "..", no absolute paths) unless this is on.
    images_outside_root: bool = False
    # Samples with bad input a stage may skip (counted, reported, in the manifest); 0: none.
    max_skipped: int = 0


# ----------------------------------------------------------------------------- stage
@dataclass
class TrainableConfig:
    vision: bool = False
    projector: bool = True
    lm: bool = True
    # Learning-rate multiplier per component (e.g. vision: 0.5).
    lr_mult: dict[str, float] = field(
        default_factory=lambda: {"vision": 1.0, "projector": 1.0, "lm": 1.0}
    )


@dataclass
class LoraConfig:
    enabled: bool = False  # LoRA adapters on the LM; its base weights stay frozen
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


@dataclass
class InitConfig:
    """Where each component's weights come from: "auto" (the model's pretrained path if
    it names one, else fresh), "pretrained" (model.<component>.path, required), "fresh",
    "from:<stage>" (an earlier stage of this run) or a directory holding an artifact
    written by an earlier run."""

    vision: str = "auto"
    projector: str = "auto"
    lm: str = "auto"


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float | None = 1.0


@dataclass
class StageConfig:
    name: str = MISSING
    objective: str = "next_token"
    # Weighted mixture over data.datasets by name, e.g. {vqa: 0.7, caption: 0.3}.
    mixture: dict[str, float] = field(default_factory=dict)
    max_length: int = 256
    # How supervised tokens are weighted (InternVL 2.5): each token of a sample with x
    # supervised tokens weighs x^-p, p = 0 ("token"), 0.5 ("square") or 1 ("sample").
    # "token" lets long answers (captions) drown one-word ones; "sample" the reverse.
    loss_reduction: str = "token"
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    init: InitConfig = field(default_factory=InitConfig)
    # A component that starts fresh (random) and does not train is refused unless this is
    # set: the stage would read a random, frozen network (e.g. a projector-only alignment
    # between an untrained tower and LM). A text-only stage, which never uses the tower and
    # projector, sets it.
    allow_frozen_fresh: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_steps: int = 100
    # Steps of like-length samples (LLaVA's group_by_modality_length): less padding,
    # at the price of steps less mixed than the mixture.
    group_by_length: bool = False
    batch_size: int = 8  # per device, per micro-batch
    # Pack each step's batch_size * accumulate samples end to end into rows of at most
    # max_length tokens (first-fit decreasing), each sample attending only to itself
    # (vlmtrain.data.packing), in `accumulate` micro-batches of at most batch_size rows.
    # The step's samples, tokens and loss are the unpacked stage's: only padding goes.
    # next_token stages only.
    packing: bool = False
    accumulate: int = 1  # micro-batches per optimizer step
    # When set, ``accumulate`` is derived: global = batch_size * accumulate * devices * nodes.
    global_batch_size: int | None = None
    val_every: int = 0  # steps between validations; 0 disables
    val_batches: int = 8
    # Held-out splits evaluated (greedy generation, exact match) when the stage ends.
    eval_splits: list[str] = field(default_factory=list)
    eval_limit: int | None = None  # samples per split; None = all
    # Parts of the model this stage changes, merged over the recipe's ``model`` (another
    # LM, projector, resolution, tokenizer): {lm: {hidden_size: 2048, ...}}. Checked
    # against ModelConfig when the recipe starts (vlmtrain.composition.effective_model);
    # typed Any because a structured value would fill every field with its default.
    model: dict[str, Any] = field(default_factory=dict)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    aim: AimConfig = field(default_factory=AimConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


# --------------------------------------------------------------------------- trainer
@dataclass
class FsdpConfig:
    """trainer.strategy=fsdp (FSDP2 via Lightning's ModelParallelStrategy; vlmtrain.sharding)."""

    # bf16: parameters are all-gathered and computed in bf16, gradients reduced in fp32;
    # the sharded master weights and the optimizer stay fp32. None: everything fp32.
    param_dtype: str | None = None
    # Free each layer's gathered parameters after its forward (gather again in backward):
    # least memory. False keeps them until backward, ZeRO-2-like.
    reshard_after_forward: bool = True


@dataclass
class DeepSpeedConfig:
    """trainer.strategy=deepspeed (Lightning's DeepSpeedStrategy; vlmtrain.engines)."""

    stage: int = 2  # ZeRO stage: 1 optimizer state, 2 + gradients, 3 + parameters sharded
    offload_optimizer: bool = False  # optimizer state and step on the CPU
    offload_parameters: bool = False  # ZeRO-3 only: parameters kept in CPU memory


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"  # a Lightning strategy name (checked: vlmtrain.hardware)
    precision: str = "32-true"
    checkpoint_every: int = 50  # optimizer steps between checkpoints
    # Newest checkpoints kept; a resume falls back to an older one when the newest is damaged.
    keep_checkpoints: int = 2
    log_every: int = 1
    num_threads: int | None = None  # torch intra-op threads (CPU); None leaves torch's default
    # glibc keeps freed memory for reuse (see runtime.keep_freed_memory): fewer page faults.
    keep_freed_memory: bool = True
    # Recompute each transformer layer's activations in backward: far less activation
    # memory for about a third more compute (transformers' gradient checkpointing).
    activation_checkpointing: bool = False
    # torch.compile the components (VisionLanguageModel.compile); the first steps of each
    # new shape compile. Measured in README "Throughput".
    compile: bool = False
    # A frozen vision tower's features computed once per image: memory | disk (under the
    # stage's directory, reused by later runs of the same tower) | null. Stages whose tower
    # trains, has dropout or sees augmented images run without it (and say so).
    feature_cache: str | None = None
    deterministic: bool = False
    progress_bar: bool = True
    # Memory of one device for the plan's warning: GiB or a known GPU (h100, a100-40gb, ...;
    # vlmtrain.hardware). None: the visible GPU's, else an assumed A100-80GB.
    device_memory: Any = None
    # On this signal (SLURM's warning before a time limit or a pre-emption) the next
    # optimizer step saves a checkpoint and the job exits to be requeued (vlmtrain.requeue).
    # cluster=slurm sets submitit's (SIGUSR2); null leaves the signal's default action.
    requeue_signal: str | None = "SIGUSR1"
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    # Peak FLOP/s of one device, for the logged MFU (perf/mfu). None: the visible GPU's
    # from vlmtrain.flops.PEAK_FLOPS at the training precision; none on CPU unless set.
    peak_flops: float | None = None


@dataclass
class LoggerConfig:
    type: str = "csv"  # csv | wandb | tensorboard
    project: str = "vlmtrain"
    mode: str = "offline"  # wandb: offline unless the user asks for online


@dataclass
class SweepConfig:
    """What a run returns to a Hydra sweeper (``-m``): the Optuna sweeper optimizes it, and
    every sweep's summary ranks its jobs by it (vlmtrain.sweep.objective)."""

    # A metric of the stage's artifact (train/loss, val/loss, tokens_seen, ...) or
    # eval/<split> (exact-match accuracy of an eval split). None: the run returns nothing.
    metric: str | None = None
    stage: str | None = None  # the stage it is read from; None: the recipe's last stage
    direction: str = "minimize"  # minimize | maximize (the Optuna sweeper's direction too)


@dataclass
class VLMTrainConfig:
    run_name: str = "default"
    output_dir: str = "runs"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # One stage on its own (stage=<name>) ...
    stage: StageConfig | None = None
    # ... or a recipe (recipe=<name>): named stages, run in order, joined by artifacts.
    recipe: str | None = None
    stages: dict[str, StageConfig] = field(default_factory=dict)
    # Another run's directory: each stage finished there with this very config (same
    # sources, same data) is taken from it (its artifact linked in) instead of retrained.
    start_from: str | None = None
    # Print the plan (stages, parameters, tokens, memory) without training.
    plan: bool = False
    # debug=smoke: cap every stage at this many optimizer steps (and its evaluation at a
    # few samples per split), for a quick end-to-end check of a recipe.
    smoke_steps: int | None = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def dataset_config(data: Any, name: str) -> DatasetConfig:
    """``data.datasets.<name>`` checked against DatasetConfig; errors name the key."""
    entry = data.datasets[name]
    if OmegaConf.is_dict(entry):  # resolve ${data.root} while the node still has its root
        entry = OmegaConf.to_container(entry, resolve=True)
    if not isinstance(entry, dict):
        raise ValueError(
            f"data.datasets.{name} must be {{train: <file>, val: <file>}}, not {entry!r}"
        )
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DatasetConfig), entry))
    except OmegaConfBaseException as e:
        raise ValueError(f"data.datasets.{name}: {str(e).splitlines()[0]}") from None


def schema_defaults() -> dict[str, Any]:
    """The schema's default for every key a stage's config hash covers (same layout)."""
    sections = {"model": ModelConfig, "data": DataConfig, "stage": StageConfig}
    out: dict[str, Any] = {
        k: OmegaConf.to_container(OmegaConf.structured(v)) for k, v in sections.items()
    }
    out["seed"] = VLMTrainConfig.seed
    return out


def register_configs() -> None:
    """Register the root schema; ``conf/config.yaml`` names it first in its defaults."""
    ConfigStore.instance().store(name="vlmtrain_schema", node=VLMTrainConfig)
