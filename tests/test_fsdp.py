"""trainer=fsdp on CPU (FSDP2 over gloo) as a user runs it: the same losses and artifact
as one process, exact resume after a kill, resume on another number of processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import base_args, kill_and_resume, losses, vlmtrain

from vlmtrain.checkpoints import SHARDED_SHAPES, DamagedCheckpoint, read_checkpoint
from vlmtrain.config import COMPONENTS

FSDP_CPU = ["trainer=fsdp", "trainer.accelerator=cpu"]


def stage_args(shapes_root: Path, out: Path, steps: int = 3) -> list[str]:
    """SFT on instructions mixed with text-only samples, two samples per micro-batch: a
    rank often gets a micro-batch with no image while the other has some (under FSDP it
    must still gather the tower's shards, or both wait forever). The global batch is
    fixed, so one process and two run the very same steps."""
    return [
        *base_args(shapes_root, out),
        "stage=sft",
        f"stage.max_steps={steps}",
        "stage.batch_size=2",
        "stage.global_batch_size=8",
        "+stage.mixture.text=1.0",
        "trainer.checkpoint_every=2",
    ]


def metrics(out: Path, run: str) -> Path:
    return out / run / "sft" / "logs" / "csv" / "metrics.csv"


def assert_same_losses(got: dict, want: dict, tol: float = 1e-5) -> float:
    """Loss, learning rates and per-dataset losses of every step agree within ``tol``
    (the ranks sum in another order than one process); returns the largest difference."""
    assert sorted(got) == sorted(want)
    worst = 0.0
    for step, row in want.items():
        for a, b in zip(got[step], row, strict=True):
            diff = abs(float(a) - float(b))
            assert diff <= tol * max(1.0, abs(float(b))), (step, got[step], row)
            worst = max(worst, diff)
    return worst


def artifact_difference(a: Path, b: Path) -> float:
    """Largest absolute difference over every tensor of every component; the two
    artifacts must hold the same tensors with the same shapes."""
    worst = 0.0
    for name in COMPONENTS:
        x, y = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert x.keys() == y.keys(), name
        for k in x:
            assert x[k].shape == y[k].shape, k
            worst = max(worst, float((x[k].float() - y[k].float()).abs().max()))
    return worst


# slow: two gloo processes (about 22 s); the default suite keeps the sharding-unit test
@pytest.mark.slow
def test_fsdp_two_processes_match_one(shapes_root, tmp_path):
    """`trainer=fsdp trainer.accelerator=cpu trainer.devices=2` trains the same steps as
    one plain process: losses within float tolerance, a consolidated artifact with every
    tensor full-sized and equal within tolerance; its checkpoint is sharded (one file per
    rank). The frozen vision tower is sharded too: text-only micro-batches must not hang."""
    args = [*stage_args(shapes_root, tmp_path), "stage.trainable.vision=false"]
    vlmtrain([*args, "run_name=one", "trainer=cpu"], cwd=tmp_path)
    vlmtrain([*args, "run_name=two", *FSDP_CPU, "trainer.devices=2"], cwd=tmp_path)

    want, got = losses(metrics(tmp_path, "one")), losses(metrics(tmp_path, "two"))
    assert len(want) == 3
    assert_same_losses(got, want)
    diff = artifact_difference(tmp_path / "two/sft/artifact", tmp_path / "one/sft/artifact")
    assert diff < 1e-4
    ckpt = tmp_path / "two" / "sft" / "checkpoints" / "step-0000002.ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "meta.pt",
    ]
    # What a resume reads of it: the record, and every tensor's global (unsharded) shape.
    contents = read_checkpoint(ckpt)
    assert contents["vlmtrain"]["world_size"] == 2 and contents["vlmtrain"]["strategy"] == "fsdp"
    shapes = contents[SHARDED_SHAPES]
    full = load_file(tmp_path / "one/sft/artifact/lm.safetensors")
    embed = next(k for k in full if k.endswith("embed_tokens.weight"))
    assert shapes[f"model.language_model.{embed}"] == tuple(full[embed].shape)
    (ckpt / "__1_0.distcp").unlink()  # a rank's shard lost: damaged, never half loaded
    with pytest.raises(DamagedCheckpoint, match="__1_0.distcp"):
        read_checkpoint(ckpt)


@pytest.mark.slow
def test_fsdp_kill_and_rerun_resumes_exactly(shapes_root, tmp_path):
    """Two FSDP ranks killed after step 3 resume from the sharded checkpoint of step 2
    and reproduce the uninterrupted run bit for bit; LoRA on the LM (adapters and their
    frozen base weights in separate units) and activation checkpointing on."""
    args = [
        *stage_args(shapes_root, tmp_path, steps=5),
        *FSDP_CPU,
        "trainer.devices=2",
        "stage.lora.enabled=true",
        "trainer.activation_checkpointing=true",
    ]
    kill_and_resume(args, tmp_path, kill_after=3)
    assert losses(metrics(tmp_path, "killed")) == losses(metrics(tmp_path, "straight"))
    assert (
        artifact_difference(tmp_path / "killed/sft/artifact", tmp_path / "straight/sft/artifact")
        == 0
    )
    assert (tmp_path / "killed" / "sft" / "artifact" / "lora_adapter").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_fsdp_resumes_on_another_number_of_processes(shapes_root, tmp_path, before, after):
    """Checkpointed on ``before`` processes, resumed on ``after``: the weights and optimizer
    state are resharded (torch distributed checkpoint) and the data continue at the same
    global sample, so the steps after the resume match an uninterrupted run."""
    args = [*stage_args(shapes_root, tmp_path, steps=4), *FSDP_CPU]
    vlmtrain([*args, "run_name=straight", f"trainer.devices={before}"], cwd=tmp_path)
    killed = vlmtrain(
        [*args, "run_name=moved", f"trainer.devices={before}"],
        cwd=tmp_path,
        env={"VLMTRAIN_KILL_AFTER_STEP": "3"},
        check=False,
    )
    assert killed.returncode != 0, "the kill hook did not fire"
    resumed = vlmtrain([*args, "run_name=moved", f"trainer.devices={after}"], cwd=tmp_path)
    assert "resuming from" in resumed.stdout
    want, got = losses(metrics(tmp_path, "straight")), losses(metrics(tmp_path, "moved"))
    assert_same_losses(got, want)
    assert (
        artifact_difference(tmp_path / "moved/sft/artifact", tmp_path / "straight/sft/artifact")
        < 1e-4
    )


@pytest.mark.slow
def test_another_step_size_on_resume_is_refused(shapes_root, tmp_path):
    """Without stage.global_batch_size, two processes make a step of twice the samples:
    the resume is refused, saying which value keeps the step."""
    args = [*base_args(shapes_root, tmp_path), "stage=sft", "stage.max_steps=4"]
    args += [*FSDP_CPU, "trainer.checkpoint_every=2", "run_name=r"]
    vlmtrain(
        args + ["trainer.devices=1"],
        cwd=tmp_path,
        env={"VLMTRAIN_KILL_AFTER_STEP": "3"},
        check=False,
    )
    refused = vlmtrain(args + ["trainer.devices=2"], cwd=tmp_path, check=False)
    assert refused.returncode != 0
    assert "stage.global_batch_size=8" in refused.stderr


def test_sharded_units_never_mix_frozen_and_trainable(compose):
    """The unit plan of the tiny model with LoRA: every transformer layer of the tower and
    the LM is a unit, the adapters of each LM layer a unit of their own; each unit is all
    frozen or all trainable, and every parameter is in one."""
    from vlmtrain.model.freezing import apply_trainable
    from vlmtrain.model.lm import load_tokenizer
    from vlmtrain.model.vlm import VisionLanguageModel
    from vlmtrain.objectives.common import StageModule
    from vlmtrain.sharding import check_units, sharding_units

    cfg = compose("stage=sft", "stage.lora.enabled=true", "stage.trainable.vision=false")
    model = VisionLanguageModel.build(cfg.model, load_tokenizer(cfg.model, cfg.data.chat_template))
    apply_trainable(model, cfg.stage.trainable, cfg.stage.lora)
    module = StageModule(model, cfg.stage)
    units = sharding_units(module)
    check_units(module, units)  # raises on a mixed unit or a parameter in none
    names = [n for n, _ in units]
    layers = cfg.model.vision.num_hidden_layers + cfg.model.lm.num_hidden_layers
    assert sum(n.endswith(tuple(f"layers.{i}" for i in range(8))) for n in names) == layers
    adapters = [n for n in names if "lora_A" in n]
    assert len(adapters) == cfg.model.lm.num_hidden_layers
    owned: set[int] = set()  # a unit manages the parameters no inner unit took
    for _, modules in units:
        mine = [p for m in modules for p in m.parameters() if id(p) not in owned]
        owned.update(id(p) for p in mine)
        assert len({p.requires_grad for p in mine}) <= 1
    assert owned == {id(p) for p in module.parameters()}

    # A module holding both kinds (a frozen weight beside a trainable bias) is refused.
    proj = model.multi_modal_projector
    first = next(m for m in proj.modules() if isinstance(m, torch.nn.Linear))
    first.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="mixes frozen .* and trainable"):
        check_units(module, sharding_units(module))
