"""The distributed engines a trainer config names, built on Lightning's strategies.

* ``trainer.strategy=fsdp``: FSDP2 through Lightning's ``ModelParallelStrategy``
  (runs on CPU with gloo as on GPUs). ``StageModule.configure_model`` shards the
  model (``vlmtrain.sharding``); checkpoints are torch distributed checkpoints, a
  directory of per-rank shards, written beside their target and renamed when whole.
* ``trainer.strategy=deepspeed``: Lightning's ``DeepSpeedStrategy`` with
  ``trainer.deepspeed`` (ZeRO stage, offload). GPU only (Lightning refuses a CPU
  accelerator); an optional dependency (``pip install vlmtrain[deepspeed]``).
* Any other name is handed to Lightning as is (``auto``, ``ddp``, ...).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy, Strategy
from omegaconf import DictConfig

from vlmtrain.config import FsdpConfig

FSDP = "fsdp"
DEEPSPEED = "deepspeed"
OWN_STRATEGIES = (FSDP, DEEPSPEED)
# Lightning's registered DeepSpeed names; vlmtrain reads them as trainer.deepspeed settings.
DEEPSPEED_ALIASES = {
    "deepspeed_stage_1": (1, False, False),
    "deepspeed_stage_2": (2, False, False),
    "deepspeed_stage_2_offload": (2, True, False),
    "deepspeed_stage_3": (3, False, False),
    "deepspeed_stage_3_offload": (3, True, True),
}


class FsdpStrategy(ModelParallelStrategy):
    """FSDP2 over all processes (one data-parallel mesh dimension), atomic sharded
    checkpoints, and the sharding settings ``StageModule.configure_model`` applies."""

    def __init__(self, cfg: FsdpConfig, world_size: int, **kwargs: Any):
        super().__init__(data_parallel_size=world_size, tensor_parallel_size=1, **kwargs)
        self.fsdp = cfg

    def shard(self, stage_module) -> None:
        from vlmtrain.sharding import shard_stage

        shard_stage(stage_module, self.device_mesh["data_parallel"], self.fsdp)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any = None) -> None:
        # The shards go to a hidden partial directory, renamed once every rank wrote its
        # part: a kill mid-save leaves no directory that looks like a checkpoint
        # (vlmtrain.durable.remove_partial_files clears it at the next start).
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(f".{path.name}.partial")
        if self.global_rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier()
        if self.global_rank == 0:
            if path.exists():
                shutil.rmtree(path)
            partial.rename(path)
        self.barrier()


class ZeroStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO. DeepSpeed partitions the model itself when the engine is built
    (after ``configure_model``, so artifacts were loaded into whole tensors before: no
    ``torch.Size([0])`` partitions are ever loaded into); ``shard`` only asks
    ``StageModule.configure_model`` to keep the meta skeleton the artifact is
    consolidated into, from the fp32 master weights."""

    def shard(self, stage_module) -> None:
        pass

    def full_state_dict(self, stage_module) -> dict:
        """Collective: every rank gathers each parameter in the same order; rank 0 keeps
        the full tensors. Trainable ones from the optimizer's fp32 master copy, frozen
        ones (not in the optimizer) gathered from their ZeRO-3 partitions."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        full: dict[int, Any] = {}
        for p in stage_module.parameters():
            value = safe_get_full_fp32_param(p) if p.requires_grad else None
            if value is None:
                with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                    value = p.detach().clone()
            if self.global_rank == 0:
                full[id(p)] = value.cpu()
        if self.global_rank != 0:
            return {}
        state = stage_module.state_dict(keep_vars=True)  # tied tensors under both names
        return {k: full.get(id(v), v.detach().cpu()) for k, v in state.items()}


def build_strategy(trainer: DictConfig, world_size: int, grad_clip: float = 0.0) -> str | Strategy:
    name = trainer.strategy
    if name == FSDP:
        return FsdpStrategy(trainer.fsdp, world_size)
    if name == DEEPSPEED or name in DEEPSPEED_ALIASES:
        return deepspeed_strategy(trainer, name, grad_clip)
    if name.startswith(DEEPSPEED):  # e.g. NVMe offload: artifacts would not consolidate
        raise ValueError(
            f"trainer.strategy={name} is not supported by vlmtrain; use trainer=deepspeed_zero2, "
            "deepspeed_zero3 or their _offload variants (trainer.deepspeed.*)"
        )
    return name


def is_deepspeed(strategy) -> bool:
    return isinstance(strategy, DeepSpeedStrategy)


def shards_weights(trainer: DictConfig) -> bool:
    """Whether trainer.strategy partitions the weights themselves (FSDP, ZeRO-3)."""
    name = trainer.strategy
    if name == FSDP:
        return True
    return (name == DEEPSPEED or name in DEEPSPEED_ALIASES) and (
        deepspeed_settings(trainer, name)[0] == 3
    )


def deepspeed_settings(trainer: DictConfig, name: str) -> tuple[int, bool, bool]:
    """(ZeRO stage, offload optimizer, offload parameters) of trainer.deepspeed, or of a
    Lightning name (deepspeed_stage_3_offload) that spells them."""
    if name in DEEPSPEED_ALIASES:
        return DEEPSPEED_ALIASES[name]
    ds = trainer.deepspeed
    if ds.stage not in (1, 2, 3):
        raise ValueError(f"trainer.deepspeed.stage={ds.stage}: ZeRO stage 1, 2 or 3")
    if ds.offload_parameters and ds.stage != 3:
        raise ValueError(
            "trainer.deepspeed.offload_parameters=true needs trainer.deepspeed.stage=3 "
            "(only ZeRO-3 partitions parameters)"
        )
    return ds.stage, ds.offload_optimizer, ds.offload_parameters


def deepspeed_config(stage: int, offload_optimizer: bool, offload_parameters: bool, grad_clip):
    """The DeepSpeed config vlmtrain runs with: one optimizer step per engine step (the
    objectives accumulate micro-batches themselves), DeepSpeed clipping the gradient
    norm (Lightning allows no clipping of its own under DeepSpeed), offload as asked."""
    zero: dict[str, Any] = {"stage": stage, "contiguous_gradients": True, "overlap_comm": True}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        "gradient_clipping": float(grad_clip or 0.0),
        "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: batches are vlmtrain's
        "gradient_accumulation_steps": 1,
        # vlmtrain's fused torch AdamW steps offloaded parameters on the CPU too.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
    }


def deepspeed_strategy(trainer: DictConfig, name: str, grad_clip: float = 0.0) -> Strategy:
    settings = deepspeed_settings(trainer, name)  # a bad setting fails first, anywhere
    if trainer.accelerator == "cpu":
        raise ValueError(
            f"trainer.strategy={name} needs GPUs (Lightning's DeepSpeedStrategy refuses a CPU "
            "accelerator); on CPU use trainer=fsdp or trainer=ddp_cpu"
        )
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ImportError(
            f"trainer.strategy={name} needs DeepSpeed: pip install 'vlmtrain[deepspeed]'"
        ) from None
    return ZeroStrategy(config=deepspeed_config(*settings, grad_clip))


def reshard_refusal(strategy: str) -> str | None:
    """Why a checkpoint of this strategy cannot resume on another number of processes,
    with what to do; None when it can (DDP's single file, FSDP's distributed checkpoint)."""
    if strategy == DEEPSPEED or strategy in DEEPSPEED_ALIASES:
        return (
            "A DeepSpeed ZeRO checkpoint is partitioned per process and Lightning cannot load it "
            "on another number of processes. Resume with the same trainer.devices x "
            "trainer.num_nodes, or convert it to one file with "
            "lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict "
            "and start the stage from that."
        )
    return None
