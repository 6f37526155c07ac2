"""``vlmtrain export ARTIFACT OUT_DIR``: a stage artifact as transformers' Llava classes.

The output loads with plain transformers, offline::

    model = AutoModelForImageTextToText.from_pretrained(OUT_DIR)   # LlavaForConditionalGeneration
    processor = AutoProcessor.from_pretrained(OUT_DIR)             # LlavaProcessor

vlmtrain's model already follows Llava (submodule names, feature-layer semantics,
image features scattered at placeholder positions), so export maps weights one to
one. What needs care:

- The tower was cut at its feature layer; exported, it keeps those layers and Llava
  reads ``hidden_states[-1]`` (the last kept layer, before the post-layernorm, as
  vlmtrain does). The unused post-layernorm is written as an identity LayerNorm.
- The hybrid ViT (a BiT, ResNet or FocalNet stem, built by transformers' load_backbone)
  is transformers' DPTModel, which Llava builds with AutoModel like any tower; its unused
  final LayerNorm and pooler (and a FocalNet stem's final LayerNorm) are written as an identity and zeros.
- CLIP and the hybrid ViT have a class token that vlmtrain drops: ``vision_feature_select_strategy``
  ``default`` (drop the first token) with one additional token in the processor's
  count; SigLIP has none: ``full``.
- A linear projector is Llava's two-layer projector with an identity activation
  and an identity second layer (exact in fp32).
- The processor's chat template renders the transformers message format
  (``{"type": "image"}`` items) into the string format vlmtrain trained on
  (``<image>\\n`` before the text), then applies the tokenizer's own template.

Architectures with no such standard class are refused, naming the part.
Written to a temporary directory beside OUT_DIR, checked complete (every tensor
present at full size), then renamed into place.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

EXPORTABLE_PROJECTORS = ("linear", "mlp2x_gelu")
EXPORTABLE_TOWERS = ("siglip", "clip", "vit_hybrid")


class NotExportable(ValueError):
    """The artifact's architecture has no standard transformers class."""


def check_exportable(model_cfg) -> None:
    """Refuse, naming the part, an architecture Llava cannot represent exactly."""
    vision, projector = model_cfg.vision, model_cfg.projector
    if vision.stem != "patch":
        raise NotExportable(
            f"model.vision.stem={vision.stem!r} (stem_blocks={vision.stem_blocks}): vlmtrain's "
            "convolutional stem (ConvPatchEmbedding in vlmtrain/model/vision.py) replaces the "
            "tower's patch embedding, and transformers' SigLIP/CLIP vision models, which Llava "
            "uses as its tower, have only a single strided patch convolution; no standard "
            "transformers class holds this tower. To export, train with model.vision.stem=patch, "
            "or model.vision.type=vit_hybrid (model.vision.backbone=focalnet, resnet or bit) for a "
            "convolutional stem Llava can hold."
        )
    if vision.type not in EXPORTABLE_TOWERS:
        raise NotExportable(
            f"model.vision.type={vision.type!r}: export supports {EXPORTABLE_TOWERS} towers"
        )
    if model_cfg.get("tiling") is not None and model_cfg.tiling.enabled:
        raise NotExportable(
            "model.tiling.enabled=true: the model was trained on each image as a grid of "
            "tiles plus a thumbnail (vlmtrain.data.tiling), which Llava's processor (one "
            "image, one tower input) does not reproduce; evaluate it with `vlmtrain eval`"
        )
    if projector.type == "pixel_shuffle_mlp":
        raise NotExportable(
            "model.projector.type=pixel_shuffle_mlp: its token and channel order match "
            "transformers' InternVLForConditionalGeneration (tested), but InternVL's processor "
            "wraps every image in <img> ... </img> tokens that this model never saw in "
            "training, so no standard class reproduces its inputs; it is not exported"
        )
    if projector.type not in EXPORTABLE_PROJECTORS:
        raise NotExportable(
            f"model.projector.type={projector.type!r}: export supports {EXPORTABLE_PROJECTORS}"
        )


def processor_chat_template(tokenizer_template: str, image_token: str) -> str:
    """The tokenizer's template behind a prologue that turns transformers' content lists
    (``[{"type": "image"}, {"type": "text", "text": ...}]``) into the strings vlmtrain
    trained on: each image as ``<image>\\n`` where it stands, then the text."""
    prologue = (
        "{%- macro vlm_content(content) -%}"
        "{%- if content is string -%}{{ content }}"
        "{%- else -%}{%- for item in content -%}"
        f"{{%- if item['type'] == 'image' -%}}{{{{ {image_token!r} + '\\n' }}}}"
        "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
        "{%- set vlm_ns = namespace(messages=[]) -%}"
        "{%- for m in messages -%}"
        "{%- set vlm_ns.messages = vlm_ns.messages + "
        "[{'role': m['role'], 'content': vlm_content(m['content']) | string}] -%}"
        "{%- endfor -%}"
        "{%- set messages = vlm_ns.messages -%}"
    )
    return prologue + tokenizer_template


def build_llava(model, tokenizer, model_cfg):
    """LlavaForConditionalGeneration holding exactly ``model``'s weights (fp32)."""
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration

    from vlmtrain.model.vision import CUT_ATTR

    spec = model.vision_spec
    vision_config = model.vision_tower.config.to_dict()
    vision_config.pop(CUT_ATTR, None)
    text_config = model.language_model.config.to_dict()
    # Generation must stop at the tokenizer's end of turn, not at the LM config's defaults.
    text_config.update(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    linear = model_cfg.projector.type == "linear"
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=model.image_token_id,
        image_seq_length=model.tokens_per_image,
        # The cut tower's last layer is vlmtrain's feature layer.
        vision_feature_layer=-1,
        vision_feature_select_strategy="default" if spec.has_class_token else "full",
        projector_hidden_act="linear" if linear else "gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(text_config.get("tie_word_embeddings", False)),
    )
    config.dtype = torch.float32
    llava = LlavaForConditionalGeneration(config).float().eval()
    _copy_weights(model, llava, linear)
    llava.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    return llava


@torch.no_grad()
def _copy_weights(model, llava, linear: bool) -> None:
    """Strict, name-for-name loads: a tensor missing on either side fails here."""
    tower = llava.model.vision_tower
    state = dict(model.vision_tower.model.state_dict())
    # vlmtrain drops the final norm and any pooler (never on the feature path); Llava keeps
    # unused ones: an identity norm, a zero pooler.
    # So is a FocalNet stem's final norm (it feeds FocalNet's own pooled output).
    unused = ("post_layernorm.", "layernorm.", "pooler.", "embeddings.backbone.focalnet.layernorm.")
    for name, value in tower.state_dict().items():
        top = name.removeprefix("vision_model.")
        if name not in state and top.startswith(unused):
            norm_scale = "norm" in top and top.endswith(".weight")
            state[name] = torch.ones_like(value) if norm_scale else torch.zeros_like(value)
    tower.load_state_dict(state, strict=True)

    projector = dict(model.multi_modal_projector.state_dict())
    if linear:
        out = llava.model.multi_modal_projector.linear_2
        projector["linear_2.weight"] = torch.eye(out.in_features, dtype=out.weight.dtype)
        projector["linear_2.bias"] = torch.zeros_like(out.bias)
    llava.model.multi_modal_projector.load_state_dict(projector, strict=True)

    lm = model.language_model
    llava.model.language_model.load_state_dict(lm.get_decoder().state_dict(), strict=True)
    llava.lm_head.load_state_dict(lm.get_output_embeddings().state_dict(), strict=True)


def build_processor(model, tokenizer, model_cfg, artifact_dir: Path):
    from transformers import LlavaProcessor

    from vlmtrain.artifacts import load_image_processor

    spec = model.vision_spec
    # The normalization the model was trained with, as its artifact stored it.
    image_processor = load_image_processor(artifact_dir, model_cfg, spec)
    tokenizer.image_token = model_cfg.image_token  # saved in tokenizer_config.json
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        # Pixel shuffle merges r x r patches per token (vlmtrain's own model in `chat`).
        patch_size=spec.patch_size * model.token_downsample,
        vision_feature_select_strategy="default" if spec.has_class_token else "full",
        num_additional_image_tokens=1 if spec.has_class_token else 0,
        image_token=model_cfg.image_token,
        chat_template=processor_chat_template(tokenizer.chat_template, model_cfg.image_token),
    )


def check_complete(out_dir: Path, module: nn.Module) -> int:
    """Reload ``out_dir`` as transformers will and compare it with ``module``: no tensor
    missing, unexpected or of another shape, every value identical. transformers may
    rename tensors on save (its checkpoint conversions), so the check goes through its
    own loader rather than the file's names. Returns the number of tensors checked."""
    cls = type(module)
    reloaded, info = cls.from_pretrained(out_dir, output_loading_info=True, dtype=torch.float32)
    problems = [f"{k}: not written" for k in info.get("missing_keys", [])]
    problems += [f"{k}: written but not in the model" for k in info.get("unexpected_keys", [])]
    problems += [f"{k}: wrong shape" for k, *_ in info.get("mismatched_keys", [])]
    want, got = module.state_dict(), reloaded.state_dict()
    for key, tensor in want.items():
        if key not in got:
            problems.append(f"{key}: absent after reload")
        elif got[key].shape != tensor.shape:
            problems.append(f"{key}: reloaded {tuple(got[key].shape)}, model {tuple(tensor.shape)}")
        elif not torch.equal(got[key], tensor.to(got[key].dtype)):
            problems.append(f"{key}: reloaded values differ")
    if problems:
        raise RuntimeError(
            f"export to {out_dir} is incomplete; not published:\n  " + "\n  ".join(problems)
        )
    return len(want)


def save_weights(llava, out_dir: Path) -> None:
    llava.save_pretrained(out_dir)


def export_artifact(artifact_dir: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
    from vlmtrain.artifacts import load_model, read_manifest
    from vlmtrain.model_card import write_model_card

    artifact_dir, out_dir = Path(artifact_dir), Path(out_dir)
    manifest = read_manifest(artifact_dir)  # fails clearly when it is not an artifact
    from omegaconf import OmegaConf

    from vlmtrain.config import ModelConfig

    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), manifest["config"]["model"])
    check_exportable(model_cfg)  # before loading any weight
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists; pass --force to replace it")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars for a handful of tiny files
    model, tokenizer, model_cfg = load_model(artifact_dir)
    llava = build_llava(model, tokenizer, model_cfg)
    processor = build_processor(model, tokenizer, model_cfg, artifact_dir)

    tmp = out_dir.with_name(f".{out_dir.name}.export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_weights(llava, tmp)
        processor.save_pretrained(tmp)
        check_complete(tmp, llava)
        write_model_card(tmp, artifact_dir, llava)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="vlmtrain export",
        description="Export a stage artifact to transformers (LlavaForConditionalGeneration "
        "+ LlavaProcessor), loadable offline with AutoModelForImageTextToText / AutoProcessor.",
    )
    p.add_argument("artifact_dir", type=Path, help="a stage's artifact/ directory")
    p.add_argument("out_dir", type=Path, help="the directory to write (Hugging Face layout)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    args = p.parse_args(argv)
    try:
        out = export_artifact(args.artifact_dir, args.out_dir, force=args.force)
    except (NotExportable, FileExistsError, FileNotFoundError) as e:
        print(f"vlmtrain export: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"exported {args.artifact_dir} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
