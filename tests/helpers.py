"""Helpers several test modules share."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from vlmtrain.artifacts import save_artifact
from vlmtrain.data.encode import SampleEncoder, collate
from vlmtrain.data.images import ImageProcessor
from vlmtrain.data.samples import load_samples
from vlmtrain.model.lm import load_tokenizer
from vlmtrain.model.vision import VisionSpec, build_image_processor
from vlmtrain.model.vlm import VisionLanguageModel


def image_processor_for(cfg, image_root: str | Path) -> tuple[ImageProcessor, VisionSpec]:
    """The image processor and tower spec of ``cfg.model.vision`` (a config-only tower),
    without building the model."""
    v = cfg.model.vision
    spec = VisionSpec(v.hidden_size, v.image_size, v.patch_size, v.type == "clip")
    return ImageProcessor(build_image_processor(v, spec), spec.patch_size, image_root), spec


def trained_model(cfg, steps: int = 12):
    """A tiny model from the config, trained a few AdamW steps on real shapes samples
    so that no weight is at its initial value."""
    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    torch.manual_seed(0)
    model = VisionLanguageModel.build(cfg.model, tokenizer)
    processor = build_image_processor(cfg.model.vision, model.vision_spec)
    images = ImageProcessor(
        processor, model.vision_spec.patch_size, cfg.data.root, model.token_downsample
    )
    enc = SampleEncoder(tokenizer, images, cfg.model.image_token, 256)
    root = Path(cfg.data.root)
    vqa, captions = load_samples(root / "vqa_train.json"), load_samples(root / "caption_train.json")
    samples = [vqa[i] for i in range(8)] + [captions[i] for i in range(4)]
    batch = collate([enc(s) for s in samples], tokenizer.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tokenizer


def write_artifact(cfg, model, tokenizer, path: Path) -> Path:
    manifest = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "stage": cfg.stage.name,
        "objective": "next_token",
        "init": {},
        "metrics": {"steps": 12, "tokens_seen": 1234, "wall_time_s": 1.5, "train/loss": 2.0},
    }
    return save_artifact(model, tokenizer, path, manifest)
