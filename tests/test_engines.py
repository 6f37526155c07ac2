"""The engines a trainer config names: plan memory per strategy, DeepSpeed's settings and
refusals (no DeepSpeed or GPU needed), and DeepSpeed end to end where a GPU is present."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_cli import base_args, losses, vlmtrain
from test_fsdp import artifact_difference, assert_same_losses, metrics, stage_args

from vlmtrain.checkpoints import reshard_refusal
from vlmtrain.engines import build_strategy, deepspeed_config
from vlmtrain.plan import plan_recipe

GPU_RECIPE = ("recipe=llava15", "trainer=gpu", "trainer.devices=8", "trainer.device_memory=h100")


def test_plan_memory_per_device_for_fsdp_and_zero_stages(compose):
    """Each strategy's estimate for LLaVA-1.5's fine-tuning stage on 8 GPUs: ZeRO-1 shards
    the optimizer, ZeRO-2 the gradients too, ZeRO-3 and FSDP everything (plus the layers
    gathered at once); offload takes the optimizer (and ZeRO-3's weights) off the GPU."""

    def memory(*overrides: str) -> dict:
        plans = plan_recipe(compose(*GPU_RECIPE, *overrides))
        return {**plans[1]["memory_gib_per_device"], "strategy": plans[1]["strategy"]}

    ddp = memory("trainer.strategy=ddp")
    zero = {
        s: memory("trainer.strategy=deepspeed", f"trainer.deepspeed.stage={s}") for s in (1, 2, 3)
    }
    fsdp = memory("trainer.strategy=fsdp")
    offload = memory(
        "trainer.strategy=deepspeed",
        "trainer.deepspeed.stage=3",
        "trainer.deepspeed.offload_optimizer=true",
        "trainer.deepspeed.offload_parameters=true",
    )
    assert zero[3]["strategy"] == "deepspeed ZeRO-3" and fsdp["strategy"] == "fsdp (FSDP2)"
    assert ddp["total"] > zero[1]["total"] > zero[2]["total"] > zero[3]["total"]
    assert zero[1]["optimizer"] == pytest.approx(ddp["optimizer"] / 8)
    assert zero[2]["grads"] == pytest.approx(ddp["grads"] / 8) and zero[1]["grads"] == ddp["grads"]
    assert ddp["weights"] / 8 < zero[3]["weights"] < ddp["weights"] / 4  # shard + 2 layers
    assert fsdp["weights"] == pytest.approx(zero[3]["weights"])
    assert offload["optimizer"] == 0 and offload["weights"] < zero[3]["weights"]


def test_deepspeed_config_and_refusals(compose):
    """trainer=deepspeed_* spell a DeepSpeed config (ZeRO stage, offload, vlmtrain's
    clipping); on a CPU it is refused with what to use instead; its checkpoints cannot
    move to another number of processes and the refusal says what to do."""
    cfg = deepspeed_config(3, True, True, 1.0)
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["gradient_clipping"] == 1.0 and cfg["gradient_accumulation_steps"] == 1
    cpu = compose("trainer=deepspeed_zero2", "trainer.accelerator=cpu")
    with pytest.raises(ValueError, match="needs GPUs.*trainer=fsdp"):
        build_strategy(cpu.trainer, 1)
    bad = compose("trainer=deepspeed_zero2", "trainer.deepspeed.offload_parameters=true")
    with pytest.raises(ValueError, match="needs trainer.deepspeed.stage=3"):
        build_strategy(bad.trainer, 1)
    refusal = reshard_refusal({"strategy": "deepspeed"})
    assert "same trainer.devices" in refusal and "convert_zero_checkpoint" in refusal
    assert reshard_refusal({"strategy": "fsdp"}) is None
    assert reshard_refusal({"strategy": "ddp"}) is None


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed runs on GPUs only (Lightning refuses a CPU accelerator)",
)
@pytest.mark.parametrize(
    "trainer", ["deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"]
)
def test_deepspeed_matches_one_plain_process(shapes_root, tmp_path, trainer):
    """On one GPU, ZeRO-2 / ZeRO-3 (offload) train the plain run's steps in fp32: same
    losses within tolerance; the frozen tower is never in the optimizer; the artifact
    (consolidated from ZeRO-3's partitions, never torch.Size([0])) equals the plain one;
    a second stage loads it into partitioned parameters and trains."""
    args = [*stage_args(shapes_root, tmp_path), "stage.trainable.vision=false"]
    gpu = ["trainer.accelerator=gpu", "trainer.devices=1", "trainer.precision=32-true"]
    vlmtrain([*args, "run_name=plain", "trainer=gpu", *gpu[2:]], cwd=tmp_path)
    vlmtrain([*args, "run_name=ds", f"trainer={trainer}", *gpu], cwd=tmp_path)
    assert_same_losses(losses(metrics(tmp_path, "ds")), losses(metrics(tmp_path, "plain")), 1e-4)
    assert artifact_difference(tmp_path / "ds/sft/artifact", tmp_path / "plain/sft/artifact") < 1e-3
    # The artifact loaded into ZeRO partitions by the next stage: it trains from it.
    nxt = [*base_args(shapes_root, tmp_path), "stage=sft", "stage.name=next", "stage.max_steps=2"]
    nxt += [
        f"stage.init.vision={tmp_path}/ds/sft/artifact",
        f"stage.init.lm={tmp_path}/ds/sft/artifact",
    ]
    nxt += [
        f"stage.init.projector={tmp_path}/ds/sft/artifact",
        "run_name=ds",
        f"trainer={trainer}",
        *gpu,
    ]
    vlmtrain(nxt, cwd=tmp_path)
