"""Recipes: composition, stage order, artifact hand-off, skip and resume, plans."""

from __future__ import annotations

import json

import pytest
from test_cli import base_args, losses, vlmtrain

from vlmtrain.artifacts import config_hash, same_stage
from vlmtrain.plan import plan_recipe
from vlmtrain.recipe import accumulation, check_order, stage_config, stage_list


def test_tiny_recipe_composes_in_order(compose):
    cfg = compose("recipe=tiny")
    assert cfg.stage is None
    assert [name for name, _ in stage_list(cfg)] == ["lm_pretrain", "align", "sft"]
    assert cfg.stages.sft.init.projector == "from:align"
    check_order(stage_list(cfg))


def test_per_stage_override_touches_only_that_stage(compose):
    cfg = compose("recipe=tiny", "stages.sft.optim.lr=1e-5")
    assert cfg.stages.sft.optim.lr == 1e-5
    assert cfg.stages.align.optim.lr != 1e-5
    sft = stage_config(cfg, "sft", cfg.stages.sft)
    assert sft.stage.name == "sft" and sft.stage.optim.lr == 1e-5 and not sft.stages


def test_init_from_a_later_stage_fails_before_training(compose):
    cfg = compose("recipe=tiny", "stages.lm_pretrain.init.lm=from:sft")
    with pytest.raises(ValueError, match="stages.lm_pretrain.init.lm"):
        check_order(stage_list(cfg))


def test_global_batch_size_sets_accumulation(compose):
    cfg = compose("recipe=llava15", "trainer.devices=8")
    assert accumulation(stage_config(cfg, "pretrain", cfg.stages.pretrain)) == 1  # 256 = 32 x 8
    assert accumulation(stage_config(cfg, "finetune", cfg.stages.finetune)) == 1  # 128 = 16 x 8
    cfg = compose("recipe=llava15", "trainer.devices=2")
    assert accumulation(stage_config(cfg, "pretrain", cfg.stages.pretrain)) == 4
    cfg = compose("recipe=llava15", "trainer.devices=3")
    with pytest.raises(ValueError, match="global_batch_size"):
        accumulation(stage_config(cfg, "pretrain", cfg.stages.pretrain))


def test_llava15_plan_matches_published_sizes(compose):
    """LLaVA-1.5-7B: Vicuna-7B (6.74B), CLIP ViT-L/14-336 (303M, last layer unused: 291M
    kept), mlp2x_gelu projector (21M); 576 image tokens; about 7.06B in all."""
    plans = plan_recipe(compose("recipe=llava15", "trainer=gpu", "trainer.devices=8"))
    pretrain, finetune = plans
    params = {k: v["trainable"] + v["frozen"] for k, v in pretrain["parameters"].items()}
    assert params["projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert abs(params["lm"] - 6.74e9) / 6.74e9 < 0.002
    assert abs(params["vision"] - 303.5e6 + 12.6e6) / 291e6 < 0.01
    assert abs(sum(params.values()) - 7.06e9) / 7.06e9 < 0.005
    assert pretrain["image_tokens_per_image"] == 576
    assert pretrain["parameters"]["projector"]["trainable"] == params["projector"]
    assert pretrain["parameters"]["lm"]["trainable"] == 0
    assert finetune["parameters"]["lm"]["trainable"] == params["lm"]
    assert finetune["parameters"]["vision"]["trainable"] == 0
    assert pretrain["samples_per_step"] == 256 and finetune["samples_per_step"] == 128
    assert finetune["init"]["projector"] == "from:pretrain"
    assert "needs model.lm.path" in finetune["init"]["lm"]


def test_llava15_plans_activation_checkpointing_as_published(compose):
    """LLaVA-1.5 checkpoints activations; without it, a finetune device would need ~7x
    the activation memory (16 x 2048 tokens through 32 layers of 4096)."""
    on = plan_recipe(compose("recipe=llava15", "trainer=gpu", "trainer.devices=8"))
    off = plan_recipe(
        compose(
            "recipe=llava15",
            "trainer=gpu",
            "trainer.devices=8",
            "trainer.activation_checkpointing=false",
        )
    )
    for a, b in zip(on, off, strict=True):
        mem_on, mem_off = a["memory_gib_per_device"], b["memory_gib_per_device"]
        assert mem_on["activations"] < 0.2 * mem_off["activations"]
        for part in ("weights", "grads", "optimizer"):
            assert mem_on[part] == mem_off[part]


def test_plan_checks_the_strategy_and_warns_beyond_device_memory(compose, capsys):
    gpu = ("recipe=llava15", "trainer=gpu", "trainer.devices=8", "trainer.device_memory=h100")
    with pytest.raises(ValueError, match=r"trainer.strategy='fdsp'.*fsdp"):
        plan_recipe(compose(*gpu, "trainer.strategy=fdsp"))
    sharded = plan_recipe(compose(*gpu))  # the recipe's ZeRO-3, as LLaVA-1.5 fine-tunes
    assert "exceeds" not in capsys.readouterr().out
    assert sharded[1]["memory_gib_per_device"]["total"] < 80
    unsharded = plan_recipe(compose(*gpu, "trainer.strategy=auto"))
    assert unsharded[1]["memory_gib_per_device"]["total"] > 80
    said = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "exceeds the 80 GiB of a device (trainer.device_memory=h100)" in said
    # Sharded states divide over every process of the job: 2 nodes x 4 = 1 node x 8.
    nodes = [a for a in gpu if not a.startswith("trainer.devices")]
    two_nodes = plan_recipe(compose(*nodes, "trainer.num_nodes=2", "trainer.devices=4"))
    assert two_nodes[1]["memory_gib_per_device"] == sharded[1]["memory_gib_per_device"]


def test_plan_measures_supervised_positions_and_truncation_on_present_data(compose, capsys):
    plans = plan_recipe(compose("recipe=tiny"))  # the test data is present
    sft = plans[2]
    assert "measured" in sft["logits_per_sample"]
    measured = float(sft["logits_per_sample"].split()[0])
    assert 1 <= measured < 40  # one-word answers, captions and chat turns, not max_length
    out = capsys.readouterr().out
    assert "cut at max_length" in out and "«" in out


def test_plan_of_tiny_recipe_on_meta(compose):
    plans = plan_recipe(compose("recipe=tiny"))
    assert [p["stage"] for p in plans] == ["lm_pretrain", "align", "sft"]
    assert plans[0]["parameters"]["vision"]["trainable"] == 0
    assert plans[0]["parameters"]["lm"]["trainable"] > 0


def test_plan_command_line(tmp_path):
    proc = vlmtrain(
        ["recipe=llava15", "plan=true", "trainer=gpu", "trainer.devices=8"], cwd=tmp_path
    )
    assert "6,738,423,808" in proc.stdout and "576" in proc.stdout
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.safetensors"))


TINY = ("stages.lm_pretrain", "stages.align", "stages.sft")
LLAVA = ("stages.pretrain", "stages.finetune")


def _tiny_recipe_args(shapes_root, tmp_path, run_name):
    return [
        *base_args(shapes_root, tmp_path, TINY),
        "recipe=tiny",
        f"run_name={run_name}",
        "stages.lm_pretrain.max_steps=3",
        "stages.align.max_steps=3",
        "stages.sft.max_steps=7",
        "stages.sft.eval_splits=[test]",
        "stages.sft.eval_limit=20",
        "trainer.checkpoint_every=3",
    ]


def test_recipe_runs_skips_and_resumes(shapes_root, tmp_path):
    """Uninterrupted vs killed-in-sft-then-rerun: the same losses; finished stages are
    skipped; artifacts are handed over by reference; a summary and a plot are written."""
    straight = vlmtrain(_tiny_recipe_args(shapes_root, tmp_path, "straight"), cwd=tmp_path)
    assert "recipe summary" in straight.stdout
    run = tmp_path / "straight"
    summary = json.loads((run / "summary.json").read_text())
    assert [r["stage"] for r in summary] == ["lm_pretrain", "align", "sft"]
    assert summary[2]["steps"] == 7 and summary[2]["tokens_seen"] > 0
    assert (run / "loss_curves.png").stat().st_size > 0
    evaluation = json.loads((run / "sft" / "eval" / "eval.json").read_text())
    assert 0.0 <= evaluation["test"]["overall"]["accuracy"] <= 1.0
    manifest = json.loads((run / "sft" / "artifact" / "manifest.json").read_text())
    assert manifest["init"]["lm"].endswith("align/artifact")

    args = _tiny_recipe_args(shapes_root, tmp_path, "killed")
    killed = vlmtrain(args, cwd=tmp_path, env={"VLMTRAIN_KILL_AFTER_STEP": "5"}, check=False)
    # lm_pretrain and align end at step 3, before the kill; sft dies after step 5.
    assert killed.returncode != 0
    resumed = vlmtrain(args, cwd=tmp_path)
    assert "stage lm_pretrain[/]" not in resumed.stdout
    assert "already finished" in resumed.stdout and "resuming from" in resumed.stdout
    for stage in ("lm_pretrain", "align", "sft"):
        a = losses(run / stage / "logs" / "csv" / "metrics.csv")
        b = losses(tmp_path / "killed" / stage / "logs" / "csv" / "metrics.csv")
        assert a == b, stage

    # A finished stage whose config changed is refused, with the way out.
    changed = vlmtrain([*args, "stages.align.optim.lr=0.5"], cwd=tmp_path, check=False)
    assert (
        changed.returncode != 0
        and "align" in changed.stderr
        and "different config" in changed.stderr
        and "stage.optim.lr: 0.001 -> 0.5" in changed.stderr
    )


def test_llava15_recipe_runs_with_tiny_substitutes(shapes_root, tmp_path):
    args = [
        *base_args(shapes_root, tmp_path, LLAVA),
        "recipe=llava15",
        "run_name=l15",
        "trainer.strategy=auto",  # the recipe's ZeRO-3 needs GPUs
        "model=tiny",
        "data=shapes",
        f"data.root={shapes_root}",
        "data.generate=null",
        "stages.pretrain.init.vision=fresh",
        "stages.pretrain.init.lm=fresh",
        "stages.finetune.init.vision=from:pretrain",
        "stages.finetune.init.lm=from:pretrain",
        "stages.pretrain.global_batch_size=8",
        "stages.finetune.global_batch_size=8",
        "stages.pretrain.max_steps=2",
        "stages.finetune.max_steps=2",
    ]
    vlmtrain(args, cwd=tmp_path)
    for stage in ("pretrain", "finetune"):
        m = json.loads((tmp_path / "l15" / stage / "artifact" / "manifest.json").read_text())
        assert m["config"]["stage"]["accumulate"] == 2  # 8 = batch_size 4 x 2
        assert m["metrics"]["steps"] == 2


def test_llava15_refuses_to_start_without_pretrained_paths(shapes_root, tmp_path):
    args = [
        *base_args(shapes_root, tmp_path, LLAVA),
        "recipe=llava15",
        "model=tiny",
        "data=shapes",
        f"data.root={shapes_root}",
        "data.generate=null",
    ]
    proc = vlmtrain(args, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "model.vision.path" in proc.stderr


def test_artifact_with_other_dimensions_fails_before_training(shapes_root, tmp_path):
    args = [*base_args(shapes_root, tmp_path), "run_name=a", "stage=align", "stage.max_steps=1"]
    vlmtrain(args, cwd=tmp_path)
    artifact = tmp_path / "a" / "align" / "artifact"
    proc = vlmtrain(
        [
            *base_args(shapes_root, tmp_path),
            "run_name=b",
            "stage=sft",
            f"stage.init.projector={artifact}",
            "model.lm.hidden_size=32",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "multi_modal_projector" in proc.stderr or "linear_1.weight" in proc.stderr
    assert not (tmp_path / "b" / "sft" / "checkpoints").exists()


def test_same_stage_tells_a_retrained_source_from_a_changed_key():
    hashed = {"stage": {"optim": {"lr": 0.1}}, "seed": 0, "sources": {"lm": "aaaa"}}
    manifest = {"config": {"stage": {"optim": {"lr": 0.1}}, "seed": 0}}
    manifest["config_hash"] = config_hash(hashed)
    assert same_stage(manifest, hashed, {}) == (True, [])
    retrained = {**hashed, "sources": {"lm": "bbbb"}}
    same, why = same_stage(manifest, retrained, {})
    assert not same and "source artifacts" in why[0]
    moved = {**hashed, "stage": {"optim": {"lr": 0.2}}}
    assert same_stage(manifest, moved, {}) == (False, ["stage.optim.lr: 0.1 -> 0.2"])
