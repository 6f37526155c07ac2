"""Per-stage models: overrides, hashing, hand-off checks, progressive LM upscaling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_cli import base_args, vlmtrain
from transformers import AutoTokenizer

from vlmtrain.artifacts import config_hash
from vlmtrain.composition import check_handoffs
from vlmtrain.config import ModelConfig
from vlmtrain.model.lm import load_tokenizer
from vlmtrain.plan import plan_recipe
from vlmtrain.recipe import check_order, stage_config, stage_list

WIDE_LM = ("+stages.sft.model.lm.hidden_size=96", "+stages.sft.model.lm.num_hidden_layers=3")


def configs(cfg):
    return [(name, stage_config(cfg, name, stage)) for name, stage in stage_list(cfg)]


def stage_hash(scfg) -> str:
    """What run_stage hashes (no source artifacts here)."""
    resolved = OmegaConf.to_container(scfg, resolve=True)
    return config_hash(
        {k: resolved[k] for k in ("model", "data", "stage", "seed")} | {"sources": {}}
    )


def test_stage_model_merges_over_the_recipe_model(compose):
    cfg = compose("recipe=tiny", *WIDE_LM, "stages.sft.init.projector=fresh")
    by_name = dict(configs(cfg))
    sft, align = by_name["sft"], by_name["align"]
    assert sft.model.lm.hidden_size == 96 and sft.model.lm.num_hidden_layers == 3
    assert sft.model.lm.type == "llama" and sft.model.vision == align.model.vision
    assert align.model.lm.hidden_size == 64  # other stages keep the recipe's model
    assert sft.model.tokenizer == align.model.tokenizer == f"{cfg.data.root}/tokenizer"
    assert sft.stage.model == {}  # the effective model is `model`; nothing is counted twice


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "+stages.sft.model.lm.hiden_size=96",
            "stages.sft.model: Key 'hiden_size' not in 'LMConfig'",
        ),
        (
            "+stages.sft.model.vison.image_size=96",
            "stages.sft.model: Key 'vison' not in 'ModelConfig'",
        ),
        ("+stages.sft.model.lm.hidden_size=wide", "stages.sft.model: Value 'wide'"),
    ],
)
def test_stage_model_is_checked_against_the_schema(compose, override, message):
    with pytest.raises(ValueError, match=message):
        configs(compose("recipe=tiny", override))


def test_config_hash_covers_the_effective_model(compose):
    """However it is spelt (recipe model or stage override), the same model hashes the same;
    another model hashes differently."""
    by_stage = dict(configs(compose("recipe=tiny", "+stages.sft.model.lm.hidden_size=96")))
    by_root = dict(configs(compose("recipe=tiny", "model.lm.hidden_size=96")))
    default = dict(configs(compose("recipe=tiny")))
    assert stage_hash(by_stage["sft"]) == stage_hash(by_root["sft"])
    assert stage_hash(by_stage["sft"]) != stage_hash(default["sft"])
    assert stage_hash(by_stage["align"]) == stage_hash(default["align"])


def test_a_stage_cannot_take_from_itself_or_a_later_stage(compose, tmp_path):
    with pytest.raises(ValueError, match="cannot start from its own"):
        check_order(stage_list(compose("recipe=tiny", "stages.align.init.lm=from:align")))
    # A later stage of the recipe is refused even when a finished copy sits in the run
    # directory: align <- sft <- align would be a cycle.
    (tmp_path / "sft" / "artifact").mkdir(parents=True)
    (tmp_path / "sft" / "artifact" / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="'sft' runs after 'align'"):
        check_order(
            stage_list(compose("recipe=tiny", "stages.align.init.vision=from:sft")), tmp_path
        )


def test_projector_from_a_smaller_lm_fails_naming_tensors(compose):
    cfg = compose("recipe=tiny", *WIDE_LM, "stages.sft.init.lm=fresh")
    with pytest.raises(ValueError) as err:
        check_handoffs(configs(cfg), None)
    text = str(err.value)
    assert "stages.sft.init.projector='from:align'" in text
    assert "linear_1.weight: stage 'align' (64, 64) vs this stage (96, 64)" in text
    assert "init.projector=fresh" in text
    # A fresh projector sized for the new LM, the encoder carried: accepted.
    ok = compose(
        "recipe=tiny", *WIDE_LM, "stages.sft.init.lm=fresh", "stages.sft.init.projector=fresh"
    )
    check_handoffs(configs(ok), None)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("+stages.sft.model.lm.type=qwen2",), "architecture llama, this stage qwen2"),
        (
            (
                "+stages.sft.model.vision.type=clip",
                "+stages.sft.model.vision.backbone=null",
                "+stages.sft.model.vision.stem_blocks=0",
            ),
            r"architecture dpt \(stem ResNet\), this stage clip_vision_model",
        ),
    ],
)
def test_component_from_another_architecture_fails(compose, overrides, message):
    with pytest.raises(ValueError, match=message):
        check_handoffs(configs(compose("recipe=tiny", *overrides)), None)


def test_lm_is_carried_only_with_its_tokenizer(compose, tmp_path):
    cfg = compose("recipe=tiny", f"+stages.sft.model.tokenizer={tmp_path}/other")
    with pytest.raises(ValueError, match="carried only with its own tokenizer"):
        check_handoffs(configs(cfg), None)


def test_stage_describing_another_lm_must_not_inherit_a_path(compose):
    cfg = compose(
        "recipe=tiny", "model.lm.path=/models/small", "+stages.sft.model.lm.hidden_size=96"
    )
    with pytest.raises(ValueError, match=r"stages.sft.model.lm sets hidden_size but inherits"):
        configs(cfg)


def test_progressive_recipe_plans_at_real_size(compose, capsys):
    """InternVL2.5-26B (InternViT-6B + InternLM2.5-20B, 25.5B) then -78B (the same encoder +
    Qwen2.5-72B, 78.4B), 256 tokens per 448 px tile, with a fresh projector for the 72B."""
    plans = {
        p["stage"]: p
        for p in plan_recipe(
            compose("recipe=internvl25_progressive", "trainer=gpu", "trainer.devices=8")
        )
    }
    assert list(plans) == ["mlp_warmup", "vit_incremental", "full", "mlp_warmup_78b", "full_78b"]

    def total(p):
        return sum(c["trainable"] + c["frozen"] for c in p["parameters"].values())

    def params(p, comp):
        return p["parameters"][comp]["trainable"] + p["parameters"][comp]["frozen"]

    assert abs(total(plans["full"]) - 25.5e9) / 25.5e9 < 0.01
    assert abs(total(plans["full_78b"]) - 78.4e9) / 78.4e9 < 0.01
    assert abs(params(plans["full_78b"], "lm") - 72.7e9) / 72.7e9 < 0.005
    assert params(plans["full"], "vision") == params(plans["full_78b"], "vision")
    assert (
        params(plans["full_78b"], "projector")
        == 12800 * 2 + 12800 * 8192 + 8192 + 8192 * 8192 + 8192
    )
    assert all(p["image_tokens_per_image"] == 256 for p in plans.values())
    warmup = plans["mlp_warmup_78b"]
    assert warmup["init"] == {
        "vision": "from:vit_incremental",
        "projector": "fresh",
        "lm": "pretrained (needs model.lm.path)",
    }
    assert (
        warmup["parameters"]["projector"]["trainable"]
        and not warmup["parameters"]["vision"]["trainable"]
    )
    assert (
        "qwen2 8192x80" in plans["full_78b"]["model"] and "llama 6144x48" in plans["full"]["model"]
    )
    assert plans["vit_incremental"]["samples_per_step"] == 1024
    printed = " ".join(capsys.readouterr().out.split())  # as printed, line breaks aside
    assert "stage full model internvl25_26b: vision siglip 3200x45 448px/14" in printed
    assert "stage full_78b model internvl25_78b:" in printed and "72,706,220,032" in printed


@pytest.fixture(scope="module")
def other_tokenizer(shapes_root, tmp_path_factory) -> Path:
    """Another tokenizer for the same world (a smaller vocabulary: other ids everywhere)."""
    from vlmtrain.data.tokenizer import train_tokenizer

    texts = []
    for name in ("caption_train.json", "vqa_train.json", "chat_train.json"):
        for s in json.loads((shapes_root / name).read_text()):
            texts += [t["value"].replace("<image>\n", "") for t in s["conversations"]]
    for line in (shapes_root / "text_train.jsonl").read_text().splitlines():
        texts.append(json.loads(line)["text"])
    out = tmp_path_factory.mktemp("tok") / "other"
    train_tokenizer(texts, out, vocab_size=350)
    return out


PROGRESSIVE = (
    "stages.mlp_warmup",
    "stages.vit_incremental",
    "stages.full",
    "stages.mlp_warmup_78b",
    "stages.full_78b",
)


def test_progressive_recipe_runs_with_tiny_substitutes(shapes_root, other_tokenizer, tmp_path):
    """The recipe end to end: a tiny llama LM, then a wider qwen2 LM with its own tokenizer.
    The encoder reaches the larger LM bit for bit; its projector is new; image
    placeholders work with the new tokenizer; the manifests record each tokenizer."""
    args = [
        *base_args(shapes_root, tmp_path, PROGRESSIVE),
        "recipe=internvl25_progressive",
        "run_name=prog",
        "model=tiny",
        "model/projector=pixel_shuffle_mlp",
        "data=shapes",
        f"data.root={shapes_root}",
        "data.generate=null",
        "trainer.activation_checkpointing=false",
        "model/lm@stages.mlp_warmup_78b.model.lm=tiny_qwen2",
        "stages.mlp_warmup_78b.model.lm.hidden_size=96",
        f"+stages.mlp_warmup_78b.model.tokenizer={other_tokenizer}",
        "stages.full_78b.eval_splits=[test_unseen]",
        "stages.full_78b.eval_limit=8",
    ]
    for stage in PROGRESSIVE:
        args += [f"{stage}.max_length=128", f"{stage}.max_steps=2", f"{stage}.global_batch_size=8"]
    for stage in ("stages.mlp_warmup", "stages.vit_incremental", "stages.mlp_warmup_78b"):
        args.append(f"{stage}.init.lm=fresh")
    args += ["stages.mlp_warmup.init.vision=fresh", "stages.full.init.lm=from:vit_incremental"]
    vlmtrain(args, cwd=tmp_path)
    again = vlmtrain(args, cwd=tmp_path)  # every stage's effective model hashes the same again
    assert again.stdout.count("already finished") == len(PROGRESSIVE)
    run = tmp_path / "prog"
    summary = {r["stage"]: r["model"] for r in json.loads((run / "summary.json").read_text())}
    assert "lm llama 64x2" in summary["full"] and "lm qwen2 96x2" in summary["full_78b"]
    small = run / "vit_incremental" / "artifact"
    large = run / "mlp_warmup_78b" / "artifact"
    m_small = json.loads((small / "manifest.json").read_text())
    m_large = json.loads((large / "manifest.json").read_text())
    assert m_large["init"]["vision"] == str(small) and m_large["init"]["projector"] == "fresh"
    assert m_large["config"]["model"]["lm"]["type"] == "qwen2"

    # The carried encoder is bit-identical (it is frozen in the warm-up, so also after it).
    a, b = (
        load_file(str(small / "vision.safetensors")),
        load_file(str(large / "vision.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A new projector, sized for the new LM.
    proj_small = load_file(str(small / "projector.safetensors"))
    proj_large = load_file(str(large / "projector.safetensors"))
    assert proj_small["linear_2.weight"].shape == (64, 64)
    assert proj_large["linear_2.weight"].shape == (96, 96)

    # Each stage's tokenizer is recorded; the image token was added to the new one.
    tok_small, tok_large = m_small["tokenizer"], m_large["tokenizer"]
    n_small = len(AutoTokenizer.from_pretrained(shapes_root / "tokenizer"))
    n_large = len(AutoTokenizer.from_pretrained(other_tokenizer))
    assert n_large == 350 < n_small
    assert tok_large["source"] == str(other_tokenizer) and tok_large["vocab_size"] == n_large + 1
    assert tok_large["image_token_id"] == n_large and tok_small["image_token_id"] == n_small
    reloaded = load_tokenizer(ModelConfig(tokenizer=str(large / "tokenizer")))
    assert reloaded.convert_tokens_to_ids("<image>") == n_large

    # The final stage evaluates with the new tokenizer: image placeholders are filled.
    results = json.loads((run / "full_78b" / "eval" / "eval.json").read_text())
    assert results["test_unseen"]["overall"]["n"] == 8


def test_bad_hand_off_fails_before_any_stage_trains(shapes_root, tmp_path):
    """Through the command line: a projector carried to a wider LM stops the recipe before
    its first stage, naming the tensors."""
    stages = ("stages.lm_pretrain", "stages.align", "stages.sft")
    args = [*base_args(shapes_root, tmp_path, stages), "recipe=tiny", "run_name=bad", *WIDE_LM]
    proc = vlmtrain(args, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "stages.sft.init.projector='from:align'" in proc.stderr
    assert "linear_1.weight: stage 'align' (64, 64) vs this stage (96, 64)" in proc.stderr
    assert not any((tmp_path / "bad").glob("*/checkpoints"))
