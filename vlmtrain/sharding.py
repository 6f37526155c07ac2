"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for a stage: which modules form a
sharding unit, and the consolidated full weights an artifact is written from.

Units follow how the model is called, because a unit's parameters are gathered by
a forward hook on that unit's module: every transformer layer of the vision tower
and of the LM is one unit; the vision tower's remainder (patch embedding, final
norm) is one, called through ``VisionTower.forward``; the projector is one; the
LM's input embedding and output head are one (they may be one tied tensor, and
``VisionLanguageModel`` calls them directly, not through the LM's forward); the
LM decoder's remainder (its final norm) is one. An objective's own modules (AIM's
decoder) are one unit each.

Frozen and trainable parameters never share a unit: a frozen unit gets no
gradient buffers and no reduce-scatter. Where a layer mixes them (LoRA adapters
on frozen projections), its trainable submodules become a unit of their own,
sharded before the layer. A unit that would still mix them (one module holding a
frozen weight and a trainable bias) is refused before anything is sharded.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from vlmtrain.config import FsdpConfig

PARAM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model, by the classes it names as
    ``_no_split_modules`` (what transformers itself never splits across devices)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    # Only the outermost of nested matches (a layer class may contain another).
    inner = {id(c) for m in layers for c in m.modules() if c is not m}
    return [m for m in layers if id(m) not in inner]


def _all_trainable(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and all(p.requires_grad for p in params)


def trainable_parts(module: nn.Module) -> list[nn.Module]:
    """The submodules holding trainable parameters of their own, inside a module that
    mixes frozen and trainable ones (LoRA's ``lora_A.default`` Linears in a frozen
    layer). Modules that own the parameters, not their containers: a unit's gathers are
    forward hooks, and a ModuleDict is never called."""
    return [
        m
        for m in module.modules()
        if m is not module
        and (own := list(m.parameters(recurse=False)))
        and all(p.requires_grad for p in own)
    ]


def sharding_units(stage_module: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """(name, modules) of every unit, innermost first (fully_shard runs bottom-up)."""
    model = stage_module.model
    names = {id(m): n for n, m in stage_module.named_modules()}
    units: list[tuple[str, list[nn.Module]]] = []

    def add(modules: Iterable[nn.Module]) -> None:
        modules = list(dict.fromkeys(modules))  # tied input/output embedding: one module
        if any(True for m in modules for _ in m.parameters()):
            units.append(("+".join(names[id(m)] for m in modules), modules))

    lm = model.language_model
    for stack in (model.vision_tower, lm):
        for layer in transformer_layers(stack):
            if any(p.requires_grad for p in layer.parameters()) and not _all_trainable(layer):
                add(trainable_parts(layer))
            add([layer])
    add([model.vision_tower])
    add([model.multi_modal_projector])
    add([lm.get_input_embeddings(), lm.get_output_embeddings()])
    add([lm.get_decoder()])
    units.append(("model", [model]))  # the root: see shard_stage
    for name, child in stage_module.named_children():
        if name != "model":
            add([child])
    return units


def check_units(stage_module: nn.Module, units: list[tuple[str, list[nn.Module]]]) -> None:
    """Every parameter in exactly one unit, and no unit mixing frozen and trainable
    parameters; the error names the unit and the parameters."""
    owner: dict[int, str] = {}
    param_names = {id(p): n for n, p in stage_module.named_parameters()}
    problems = []
    for unit, modules in units:
        mine = [p for m in modules for p in m.parameters() if id(p) not in owner]
        for p in mine:
            owner[id(p)] = unit
        frozen = [param_names[id(p)] for p in mine if not p.requires_grad]
        trained = [param_names[id(p)] for p in mine if p.requires_grad]
        if frozen and trained:
            problems.append(
                f"unit {unit!r} mixes frozen ({', '.join(frozen[:3])}) and trainable "
                f"({', '.join(trained[:3])}) parameters"
            )
    loose = [n for n, p in stage_module.named_parameters() if id(p) not in owner]
    if loose:
        problems.append(f"parameters in no sharding unit: {', '.join(loose[:5])}")
    if problems:
        raise ValueError(
            "trainer.strategy=fsdp cannot shard this model:\n  "
            + "\n  ".join(problems)
            + "\nFreeze or train whole modules (stage.trainable, stage.lora.target_modules)."
        )


def shard_stage(stage_module: nn.Module, mesh, cfg: FsdpConfig) -> None:
    """Apply fully_shard to every unit of ``stage_module`` (idempotent)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if any(isinstance(m, FSDPModule) for m in stage_module.modules()):
        return
    if cfg.param_dtype is not None and cfg.param_dtype not in PARAM_DTYPES:
        raise ValueError(
            f"trainer.fsdp.param_dtype={cfg.param_dtype!r}: one of {sorted(PARAM_DTYPES)} or null"
        )
    # The projector's output is a reshaped view; VisionLanguageModel.embed only reads it
    # (masked_scatter), never changes it in place, which is what FSDP2 warns against.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    units = sharding_units(stage_module)
    check_units(stage_module, units)
    policy = MixedPrecisionPolicy(
        param_dtype=PARAM_DTYPES.get(cfg.param_dtype),
        reduce_dtype=torch.float32,
    )
    for _, modules in units:
        fully_shard(
            modules if len(modules) > 1 else modules[0],
            mesh=mesh,
            mp_policy=policy,
            reshard_after_forward=cfg.reshard_after_forward,
        )
    # FSDP2 takes as its root the first unit to run forward, and refuses a unit of several
    # modules (the tied embedding and head) as root, or a root found after one of its
    # units already ran (a preference step encodes images before the model's forward).
    # The model is made the root now, whichever unit an objective calls first.
    stage_module.model._get_fsdp_state()._lazy_init()


def unsharded_skeleton(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Copies of ``modules`` with every parameter on the meta device (no memory):
    taken before sharding, they receive the consolidated weights at the end."""
    memo: dict[int, nn.Parameter] = {}
    for module in modules.values():
        for p in module.parameters():
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    return {name: copy.deepcopy(m, memo) for name, m in modules.items()}


def consolidate(stage_module: nn.Module, skeleton: dict[str, nn.Module], is_zero: bool):
    """The full weights of the sharded ``stage_module`` loaded into ``skeleton`` (its
    top-level children by name, ``model`` included). Collective: every rank calls it;
    rank 0 gets the filled skeleton, the others None. Every tensor is checked present
    and full-sized, and the parameter count against the sharded model's, before
    anything is published."""
    gather = getattr(stage_module.trainer.strategy, "full_state_dict", fsdp_full_state_dict)
    full = gather(stage_module)
    if not is_zero:
        return None
    expected = {n: full_shape(p) for n, p in stage_module.named_parameters()}
    for name, module in skeleton.items():
        prefix = name + "."
        # Own storage per tensor: the gathered ones may be views of one flat buffer,
        # which safetensors refuses to write.
        part = {k[len(prefix) :]: v.clone() for k, v in full.items() if k.startswith(prefix)}
        module.load_state_dict(part, strict=True, assign=True)
    skeleton["model"].language_model.tie_weights()  # assign=True loaded tied tensors apart
    problems = []
    for name, module in skeleton.items():
        for k, p in module.named_parameters():
            key = f"{name}.{k}"
            if p.is_meta:
                problems.append(f"{key}: not in the consolidated state")
            elif key in expected and tuple(p.shape) != expected[key]:
                problems.append(f"{key}: {tuple(p.shape)}, the model's is {expected[key]}")
    got = sum(p.numel() for m in skeleton.values() for p in m.parameters())
    want = sum(math.prod(full_shape(p)) for p in stage_module.parameters())
    if got != want:
        problems.append(f"{got:,} parameters consolidated, the sharded model has {want:,}")
    if problems:
        raise RuntimeError(
            "consolidating the sharded model for the artifact failed; nothing was written:\n  "
            + "\n  ".join(problems[:12])
        )
    return skeleton


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's unsharded shape: a DTensor's is global; a ZeRO-3 partition's
    ``shape`` is torch.Size([0]) and its real one ``ds_shape``."""
    return tuple(getattr(p, "ds_shape", p.shape))


def fsdp_full_state_dict(stage_module: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank takes part; rank 0 gets the full (fp32 master) tensors on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        stage_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def artifact_source(stage_module, is_zero: bool):
    """(model, extras) to write the stage's artifact from: the module's own when it is
    not sharded; else the consolidated full copies (collective; None on other ranks)."""
    extras = stage_module.artifact_extras()
    skeleton = stage_module.sharded_skeleton
    if skeleton is None:
        return stage_module.model, extras
    full = consolidate(stage_module, skeleton, is_zero)
    if full is None:
        return None, None
    child_name = {id(m): n for n, m in stage_module.named_children()}
    return full["model"], {k: full[child_name[id(m)]] for k, m in extras.items()}
