"""Export to transformers' Llava classes: parity, the processor round trip, refusals.

Parity is measured the way a user meets the export: plain transformers loads the
directory, the exported processor turns raw images and text into inputs, and its
logits and greedy answers must match vlmtrain's model on the same held-out samples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import trained_model, write_artifact
from PIL import Image

from vlmtrain.eval import build_prompt, read_eval_samples
from vlmtrain.export import NotExportable
from vlmtrain.export import main as export_main
from vlmtrain.model.lm import load_tokenizer
from vlmtrain.model.projector import PixelShuffleMLPProjector
from vlmtrain.model.vlm import VisionLanguageModel

# (tower, projector, LM) combinations Llava represents.
COMBINATIONS = {
    "siglip-mlp2x-llama": ("model=tiny",),
    "clip-linear-qwen2": ("model=tiny_clip_qwen2", "model/projector=linear"),
    "clip-mlp2x-qwen2": ("model=tiny_clip_qwen2",),
    "siglip-linear-llama": ("model=tiny", "model/projector=linear"),
    # A ViT on a BiT stem (transformers' DPT hybrid).
    "vit_hybrid-mlp2x-llama": ("model=tiny", "model.vision.type=vit_hybrid"),
    # The same on a BatchNorm ResNet of basic blocks (its running statistics travel too):
    # recipes/tiny.yaml's tower, so `make train`'s model.
    "vit_hybrid_resnet-mlp2x-llama": (
        "model=tiny",
        "model.vision.type=vit_hybrid",
        "model.vision.backbone=resnet",
        "model.vision.stem_blocks=1",
    ),
    # The same on a FocalNet (LayerNorms, focal modulation; its unused final norm).
    "vit_hybrid_focalnet-mlp2x-llama": (
        "model=tiny",
        "model.vision.type=vit_hybrid",
        "model.vision.backbone=focalnet",
        "model.vision.stem_blocks=2",
    ),
    # Tied input/output embeddings (Qwen2-0.5B ties them): written once, loaded twice.
    "clip-mlp2x-qwen2-tied": ("model=tiny_clip_qwen2", "model.lm.tie_word_embeddings=true"),
}
N_HELD_OUT = 6


def test_make_trains_model_is_an_exported_combination(compose):
    """`make train` runs recipes/tiny.yaml: its model is one the parity test exports."""
    recipe = compose("recipe=tiny").model
    tested = compose(*COMBINATIONS["vit_hybrid_resnet-mlp2x-llama"]).model
    assert recipe == tested


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_export_reloads_with_plain_transformers_and_matches(name, compose, shapes_root, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg = compose(*COMBINATIONS[name])
    model, tokenizer = trained_model(cfg)
    artifact = write_artifact(cfg, model, tokenizer, tmp_path / "run" / "sft" / "artifact")
    out = tmp_path / "export"
    assert export_main([str(artifact), str(out)]) == 0

    hf = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    assert type(hf).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert not list(tmp_path.glob(".export*")), "the temporary directory was left behind"

    worst, answers = 0.0, []
    samples = read_eval_samples(shapes_root / "vqa_test.json", limit=N_HELD_OUT)
    for s in samples:
        # The user's path: raw image, the question in transformers' message format.
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}
        ]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        image = Image.open(shapes_root / s.images[0]).convert("RGB")
        inputs = processor(images=[image], text=prompt, return_tensors="pt")
        # The processor round trip: the very ids vlmtrain trains and evaluates on.
        ours_ids = build_prompt(
            tokenizer, s.messages, model.image_token_id, model.tokens_per_image, 1, s.id
        )
        assert inputs["input_ids"][0].tolist() == ours_ids, s.id
        with torch.no_grad():
            ours = model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
            theirs = hf(**inputs).logits
            worst = max(worst, (ours - theirs).abs().max().item())
            hf_new = hf.generate(**inputs, max_new_tokens=8, do_sample=False)
            hf_new = hf_new[0, inputs["input_ids"].shape[1] :].tolist()
            our_new = model.generate(
                inputs["input_ids"],
                inputs["attention_mask"],
                inputs["pixel_values"],
                max_new_tokens=8,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )[0].tolist()
        # vlmtrain pads finished rows; transformers stops at eos: compare up to eos.
        cut = (
            our_new[: our_new.index(tokenizer.eos_token_id) + 1]
            if tokenizer.eos_token_id in our_new
            else our_new
        )
        assert hf_new[: len(cut)] == cut, s.id
        # The image reaches the logits (so comparing them compares the vision path too).
        other = processor(images=[image.rotate(90)], text=prompt, return_tensors="pt")
        with torch.no_grad():
            assert not torch.allclose(hf(**other).logits, theirs), s.id
        answers.append(processor.decode(hf_new, skip_special_tokens=True))
    print(
        f"{name}: max |logit difference| {worst:.3g} over {len(samples)} held-out samples; {answers}"
    )
    assert worst < 1e-4 and math.isfinite(worst)


def test_pixel_shuffle_layout_matches_internvl():
    """What the refusal claims: vlmtrain's pixel shuffle orders tokens and channels as
    transformers' InternVL does, so the same weights give the same features."""
    from transformers import InternVLConfig
    from transformers.models.internvl.modeling_internvl import (
        InternVLModel,
        InternVLMultiModalProjector,
    )

    torch.manual_seed(0)
    ours = PixelShuffleMLPProjector(16, 24, downsample=2)
    config = InternVLConfig(
        vision_config={"hidden_size": 16},
        text_config={"model_type": "qwen2", "hidden_size": 24},
        downsample_ratio=0.5,
    )
    theirs = InternVLMultiModalProjector(config)
    theirs.layer_norm.load_state_dict(ours.norm.state_dict())
    theirs.linear_1.load_state_dict(ours.linear_1.state_dict())
    theirs.linear_2.load_state_dict(ours.linear_2.state_dict())
    features = torch.randn(2, 64, 16)
    shuffled = InternVLModel.pixel_shuffle(None, features.reshape(2, 8, 8, 16), 0.5)
    assert torch.allclose(ours(features), theirs(shuffled.reshape(2, 16, 64)), atol=1e-6)


@pytest.mark.parametrize(
    "overrides, part",
    [
        (("model.vision.stem=conv", "model.vision.stem_blocks=2"), "model.vision.stem='conv'"),
        (("model/projector=pixel_shuffle_mlp",), "model.projector.type=pixel_shuffle_mlp"),
    ],
)
def test_refuses_an_architecture_without_a_standard_class(
    overrides, part, compose, tmp_path, capsys
):
    cfg = compose(*overrides)
    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    model = VisionLanguageModel.build(cfg.model, tokenizer)
    artifact = write_artifact(cfg, model, tokenizer, tmp_path / "artifact")
    out = tmp_path / "export"
    assert export_main([str(artifact), str(out)]) == 2
    err = capsys.readouterr().err
    assert part in err and "no standard" in err, err
    assert not out.exists() and not list(tmp_path.glob(".export*"))
    with pytest.raises(NotExportable, match="InternVL|ConvPatchEmbedding"):
        from vlmtrain.export import export_artifact

        export_artifact(artifact, out)


def test_incomplete_export_is_not_published(compose, tmp_path, monkeypatch):
    """A tensor lost on the way to disk stops the export before the rename."""
    import vlmtrain.export as export

    cfg = compose()
    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    model = VisionLanguageModel.build(cfg.model, tokenizer)
    artifact = write_artifact(cfg, model, tokenizer, tmp_path / "artifact")
    real_save = export.save_weights

    def lossy_save(llava, path):
        real_save(llava, path)
        from safetensors.torch import load_file, save_file

        (file,) = Path(path).glob("*.safetensors")
        tensors = load_file(str(file))
        dropped = sorted(k for k in tensors if "linear_2.weight" in k)[0]
        del tensors[dropped]
        save_file(tensors, str(file), metadata={"format": "pt"})

    monkeypatch.setattr(export, "save_weights", lossy_save)
    with pytest.raises(RuntimeError, match="incomplete; not published"):
        export.export_artifact(artifact, tmp_path / "export")
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".export*"))
    assert json.loads((artifact / "manifest.json").read_text())["stage"]


@pytest.mark.slow
def test_recipe_then_export_command_then_plain_transformers(shapes_root, tmp_path):
    """The README's path: train a recipe, `vlmtrain export`, load with transformers alone."""
    from test_cli import base_args, vlmtrain
    from transformers import AutoModelForImageTextToText, AutoProcessor

    stages = tuple(f"stages.{s}" for s in ("lm_pretrain", "align", "sft"))
    args = ["recipe=tiny", *base_args(shapes_root, tmp_path / "runs", stages)]
    args += ["stages.sft.eval_limit=4"]
    args += [f"{s}.max_steps=3" for s in stages]
    vlmtrain(args, cwd=tmp_path)
    artifact = tmp_path / "runs" / "default" / "sft" / "artifact"
    vlmtrain(["export", str(artifact), str(tmp_path / "hf")], cwd=tmp_path)

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", local_files_only=True)
    processor = AutoProcessor.from_pretrained(tmp_path / "hf", local_files_only=True)
    (s,) = read_eval_samples(shapes_root / "vqa_test.json", limit=1)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.open(shapes_root / s.images[0])
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    card = (tmp_path / "hf" / "README.md").read_text()
    for stage in ("lm_pretrain", "align", "sft"):
        assert f"| {stage} | next_token |" in card
    assert "## Evaluation" in card and (tmp_path / "hf" / "loss_curves.png").is_file()
    refused = vlmtrain(["export", str(artifact), str(tmp_path / "hf")], cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "--force" in refused.stderr
