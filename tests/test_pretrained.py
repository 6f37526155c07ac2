"""Pretrained components by path: they train in training mode, and the artifact a stage
writes rebuilds from its own files once the pretrained directories are gone."""

from __future__ import annotations

import json
import shutil

import torch
from test_cli import base_args, vlmtrain
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vlmtrain.artifacts import load_image_processor, load_model
from vlmtrain.eval.cli import main as eval_main
from vlmtrain.train import build_model, resolve_init


def _pretrained_dirs(root, tokenizer_dir):
    """A SigLIP tower (with its pooling head and its own normalization) and a Llama LM
    with dropout, saved as transformers saves them."""
    vision, lm = root / "siglip", root / "llama"
    tower = SiglipVisionConfig(
        image_size=64,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        vision_use_head=True,
    )
    SiglipVisionModel(tower).save_pretrained(vision)
    SiglipImageProcessorPil(
        size={"height": 64, "width": 64}, image_mean=[0.4, 0.45, 0.5], image_std=[0.2, 0.25, 0.3]
    ).save_pretrained(vision)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            attention_dropout=0.1,
        )
    ).save_pretrained(lm)
    return vision, lm


def test_pretrained_modules_train_and_their_artifact_is_self_contained(
    compose, shapes_root, tokenizer_dir, tmp_path
):
    vision, lm = _pretrained_dirs(tmp_path / "hub", tokenizer_dir)
    paths = [f"model.vision.path={vision}", f"model.lm.path={lm}", "model.vision.feature_layer=-2"]

    cfg = compose("stage=sft", *paths)
    _, model = build_model(cfg, resolve_init(cfg.stage, cfg.model, tmp_path))
    assert all(m.training for m in model.modules())  # from_pretrained leaves them in eval

    args = [*base_args(shapes_root, tmp_path), "run_name=pt", "stage=sft", "stage.max_steps=2"]
    vlmtrain([*args, *paths], cwd=tmp_path)
    artifact = tmp_path / "pt" / "sft" / "artifact"
    before, tok, _ = load_model(artifact)
    ids = torch.tensor([tok("a red circle")["input_ids"]])
    pixels = torch.randn(1, 3, 64, 64)

    shutil.move(tmp_path / "hub", tmp_path / "gone")  # the artifact is moved elsewhere
    after, _, model_cfg = load_model(artifact)
    assert model_cfg.vision.path is None and model_cfg.lm.path is None
    assert len(after.vision_tower.model.encoder.layers) == 2  # the cut tower, cut once
    for a, b in zip(before.state_dict().values(), after.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(before.embed(ids, None), after.embed(ids, None)) and torch.equal(
            before.vision_tower(pixels), after.vision_tower(pixels)
        )
    processor = load_image_processor(artifact, model_cfg, after.vision_spec)
    assert list(processor.image_mean) == [0.4, 0.45, 0.5]  # the tower's own normalization
    out = tmp_path / "ev"
    assert (
        eval_main(
            [
                str(artifact),
                "--data-root",
                str(shapes_root),
                "--limit",
                "2",
                "--splits",
                "test",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads((out / "eval.json").read_text())["test"]["overall"]["n"] == 2


def test_lora_adapter_is_saved_on_its_own_beside_the_merged_weights(
    compose, tokenizer_dir, tmp_path
):
    import copy

    from omegaconf import OmegaConf
    from peft import PeftModel

    from vlmtrain.artifacts import LORA_ADAPTER, save_artifact
    from vlmtrain.model.freezing import apply_trainable

    cfg = compose("stage=sft", "stage.lora.enabled=true")
    tok, model = build_model(cfg, resolve_init(cfg.stage, cfg.model, tmp_path))
    base = copy.deepcopy(model.language_model)
    apply_trainable(model, cfg.stage.trainable, cfg.stage.lora)
    with torch.no_grad():  # a trained adapter: lora_B starts at zero
        for name, p in model.language_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    artifact = save_artifact(
        model, tok, tmp_path / "artifact", {"config": OmegaConf.to_container(cfg, resolve=True)}
    )
    adapter = PeftModel.from_pretrained(base, artifact / LORA_ADAPTER).eval()
    merged, _, _ = load_model(artifact)
    ids = torch.tensor([tok("a red circle and a blue square")["input_ids"]])
    with torch.no_grad():
        want = merged.language_model(input_ids=ids).logits
        got = adapter(input_ids=ids).logits
        plain = (
            base.get_base_model()(input_ids=ids).logits if hasattr(base, "get_base_model") else None
        )
    assert torch.allclose(got, want, atol=1e-5)
    assert plain is None or not torch.allclose(plain, want, atol=1e-3)


def test_checkpoints_keep_the_cuda_rng_state_where_there_is_one(
    compose, tokenizer_dir, tmp_path, monkeypatch
):
    from vlmtrain.objectives.next_token import NextTokenModule

    cfg = compose("stage=sft")
    _, model = build_model(cfg, resolve_init(cfg.stage, cfg.model, tmp_path))
    module = NextTokenModule(model, cfg.stage)
    state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    assert torch.equal(checkpoint["vlmtrain_rng"]["cuda"], state)
    module.on_load_checkpoint(checkpoint)
    assert len(restored) == 1 and torch.equal(restored[0], state)
