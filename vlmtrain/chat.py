"""``vlmtrain chat MODEL --image PATH [--prompt TEXT]``: ask a trained model about an image.

MODEL is an export (``vlmtrain export``, loaded with plain transformers) or a stage
artifact. An exportable artifact is converted in memory to the very Llava model and
processor ``vlmtrain export`` writes; one that is not (a convolutional stem, pixel
shuffle) runs on vlmtrain's own model, with the same processor for its inputs.
With ``--prompt`` it answers once; without, it reads one prompt per line from
stdin and keeps the conversation (the image stays in the first turn). Tokens
stream to the terminal as they are generated (transformers' ``TextStreamer``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch


def load_chat_model(path: Path) -> tuple[Any, Any, str]:
    """(model with a transformers-style ``generate``, processor, what was loaded)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if (path / "manifest.json").is_file():
        return _from_artifact(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is neither a vlmtrain artifact (manifest.json) nor an export "
            "(config.json)"
        )
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model.eval(), processor, f"{type(model).__name__} from {path}"


def _from_artifact(path: Path) -> tuple[Any, Any, str]:
    from vlmtrain.artifacts import load_model
    from vlmtrain.export import NotExportable, build_llava, build_processor, check_exportable

    model, tokenizer, model_cfg = load_model(path)
    processor = build_processor(model, tokenizer, model_cfg, path)
    try:
        check_exportable(model_cfg)
    except NotExportable as e:
        why = str(e).split(":")[0]
        if model_cfg.tiling.enabled:
            processor = _TiledProcessor(processor, model, model_cfg)
        return _VlmtrainGenerator(model), processor, f"vlmtrain's model ({why}; not exportable)"
    return build_llava(model, tokenizer, model_cfg), processor, f"{path} as Llava"


class _TiledProcessor:
    """The Llava processor's chat template and tokenizer with the image inputs a tiled
    model trained on (model.tiling): the image cut as in training, its placeholder repeated
    tiles x tokens per tile (vlmtrain.data.images.ImageProcessor.encode)."""

    def __init__(self, processor, model, model_cfg):
        from vlmtrain.data.images import ImageProcessor

        self.processor, self.tokenizer = processor, processor.tokenizer
        self.image_token = model_cfg.image_token
        self.images = ImageProcessor.for_model(processor.image_processor, model, model_cfg, ".")

    def apply_chat_template(self, *args, **kwargs):
        return self.processor.apply_chat_template(*args, **kwargs)

    def __call__(self, images, text, return_tensors="pt"):
        pixels, counts = self.images.encode(images)
        expanded = text.replace(self.image_token, self.image_token * counts[0], 1)
        # The tokenizer call the Llava processor makes after its own expansion.
        inputs = dict(self.tokenizer(expanded, return_tensors=return_tensors))
        return {**inputs, "pixel_values": pixels}


class _VlmtrainGenerator:
    """vlmtrain's model behind the ``generate(**processor_outputs)`` call of transformers."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, **kwargs):
        embeds = self.model.embed(input_ids, pixel_values)
        new = self.model.language_model.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, **kwargs
        )
        return torch.cat([input_ids, new], dim=1)  # as transformers returns it: prompt + new


def generation_kwargs(args: argparse.Namespace, tokenizer) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        max_new_tokens=args.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if args.temperature > 0:
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    else:
        kwargs.update(do_sample=False)
    return kwargs


def answer(model, processor, messages, image, gen: dict[str, Any], stream: bool = True) -> str:
    """Generate the assistant's next turn, streaming it; returns its text."""
    from transformers import TextStreamer

    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    streamer = (
        TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        if stream
        else None
    )
    with torch.no_grad():
        out = model.generate(**inputs, streamer=streamer, **gen)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = processor.tokenizer.eos_token_id
    if eos in new:
        new = new[: new.index(eos)]
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def _read_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise SystemExit(f"vlmtrain chat: --image {str(path)!r} not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise SystemExit(f"vlmtrain chat: --image {str(path)!r} cannot be decoded ({e})") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="vlmtrain chat",
        description="Ask a trained model about an image (one prompt, or one per stdin line).",
    )
    p.add_argument("model", type=Path, help="an export directory or a stage's artifact/")
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--prompt", default=None, help="one-shot; without it, prompts come from stdin")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with temperature)")
    p.add_argument("--seed", type=int, default=0, help="for sampling")
    p.add_argument("--system", default=None, help="a system message, if the model was given one")
    args = p.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error("--temperature must be >= 0 and --top-p in (0, 1]")

    image = _read_image(args.image)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the answer is the only thing on stdout
    try:
        model, processor, what = load_chat_model(args.model)
    except (FileNotFoundError, ValueError) as e:
        print(f"vlmtrain chat: {e}", file=sys.stderr)
        return 2
    print(f"[{what}]", file=sys.stderr)
    gen = generation_kwargs(args, processor.tokenizer)
    torch.manual_seed(args.seed)
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})

    prompts = [args.prompt] if args.prompt is not None else _stdin_prompts()
    for text in prompts:
        # The image goes with the first user turn, as in the training conversations.
        first = not any(m["role"] == "user" for m in messages)
        content = ([{"type": "image"}] if first else []) + [{"type": "text", "text": text}]
        messages.append({"role": "user", "content": content})
        reply = answer(model, processor, messages, image, gen)
        messages.append({"role": "assistant", "content": reply})
    return 0


def _stdin_prompts():
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()


if __name__ == "__main__":
    raise SystemExit(main())
