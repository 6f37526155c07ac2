"""The aim stage as a user runs it: command line, killed and resumed, its tower handed on."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_cli import base_args, kill_and_resume, losses, vlmtrain

from vlmtrain.artifacts import load_model


@pytest.mark.slow  # ~55 s; test_cli's kill/resume test covers the mechanism by default
def test_aim_stage_resumes_exactly_and_hands_a_bidirectional_tower_to_align(shapes_root, tmp_path):
    args = [
        *base_args(shapes_root, tmp_path),
        "stage=aim",
        "stage.max_steps=6",
        "trainer.checkpoint_every=2",
        "stage.aim.caption_max_tokens=16",
        "stage.aim.crop_scale=[0.5,1.0]",  # augmented steps resume exactly too
    ]
    kill_and_resume(args, tmp_path, kill_after=3)

    # The same losses (text, image and total), learning rates and final weights.
    straight_dir, killed_dir = tmp_path / "straight" / "aim", tmp_path / "killed" / "aim"
    want = losses(straight_dir / "logs" / "csv" / "metrics.csv")
    got = losses(killed_dir / "logs" / "csv" / "metrics.csv")
    assert len(want) == 6 and got == want
    artifact = killed_dir / "artifact"
    for name in ("vision", "decoder"):
        a = load_file(straight_dir / "artifact" / f"{name}.safetensors")
        b = load_file(artifact / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert "decoder.safetensors" in manifest["files"], "the decoder is kept and checked"
    first = torch.load(
        next((killed_dir / "checkpoints").glob("*.ckpt")), weights_only=True
    )  # the decoder trains and is checkpointed with the tower
    assert any(k.startswith("decoder.") for k in first["state_dict"])

    # Hand-off: an align stage starts from the aim tower (frozen here, so it stays
    # bit-identical in the align artifact) and runs it with full attention.
    vlmtrain(
        [
            *base_args(shapes_root, tmp_path),
            "run_name=killed",
            "stage=align",
            "stage.max_steps=2",
            "stage.init.vision=from:aim",
            "stage.trainable.vision=false",
        ],
        cwd=tmp_path,
    )
    aligned = tmp_path / "killed" / "align" / "artifact"
    a, b = load_file(artifact / "vision.safetensors"), load_file(aligned / "vision.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (aligned / "decoder.safetensors").exists(), "the decoder stays with aim"
    model, _, _ = load_model(aligned)
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[:, :, 56:, 56:] += 1.0  # the last patch
    with torch.no_grad():
        before, after = model.vision_tower(x), model.vision_tower(y)
    assert (after[:, 0] - before[:, 0]).abs().amax() > 1e-5, "the first patch sees the last"


def test_aim_recipe_plans_with_its_decoder(shapes_root, tmp_path):
    proc = vlmtrain(
        ["recipe=tiny_aim", "plan=true", f"data.root={shapes_root}", "data.generate=null"],
        cwd=tmp_path,
    )
    assert "stage aim" in proc.stdout and "decoder" in proc.stdout, proc.stdout


def test_aimv2_recipe_plans_at_real_size(compose):
    from vlmtrain.plan import plan_recipe

    plans = plan_recipe(compose("recipe=aimv2", "trainer=gpu", "trainer.devices=8"))
    assert [p["stage"] for p in plans] == ["aim", "pretrain", "finetune"]
    aim = plans[0]
    assert aim["parameters"]["vision"]["trainable"] > 300_000_000  # ViT-L: 24 x 1024
    assert aim["parameters"]["lm"]["trainable"] == 0
    assert aim["memory_gib_per_device"]["decoder"] > 1.0  # 1024 x 12 decoder, trained
    # The LM never runs: no LM activations or logits, only the tower's (checkpointed).
    assert aim["logits_per_sample"].startswith("none")
    assert aim["memory_gib_per_device"]["activations"] < 2.0  # was 7.4 with the LM counted
    assert plans[1]["init"]["vision"] == "from:aim"
