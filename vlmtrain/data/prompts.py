"""Prompts with reference answers, for stages that generate (GRPO).

The records are the ordinary conversation files (LLaVA JSON/JSONL): the last turn is
the assistant's reference answer, everything before it the prompt. A prompt encodes to
its token ids up to the assistant's turn (image placeholders expanded) and its pixels;
batches are padded on the left, as generation needs.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch

from vlmtrain.data.chat import render_prompt
from vlmtrain.data.encode import SampleEncoder, _expand, batch_fields
from vlmtrain.data.module import StageDataModule
from vlmtrain.data.samples import DataError, load_samples, read_records
from vlmtrain.objectives.rollout import left_pad


def load_prompts(path: str | Path) -> datasets.Dataset:
    """Conversation samples plus each record's question ``type`` when it has one (the
    shapes world's), which rewards and reports may use."""
    samples = load_samples(path)
    types = [r.get("type") if isinstance(r, dict) else None for r in read_records(Path(path))]
    return samples.add_column("type", [None if t is None else str(t) for t in types])


class PromptEncoder:
    """A conversation -> prompt ids (up to the assistant's last turn), pixels, reference."""

    def __init__(self, base: SampleEncoder):
        self.base = base
        self.tokenizer = base.tokenizer

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        sid, source = sample["id"], sample["source"]
        messages = list(sample["messages"])
        if sample.get("text") is not None or len(messages) < 2:
            raise DataError(
                sid, source, "a prompt needs a conversation: prompt turns, then the answer"
            )
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise DataError(sid, source, "the last turn must be the assistant's reference answer")
        token_id = self.base.image_token_id
        ids = render_prompt(self.tokenizer, messages[:-1])
        n_images = len(sample["images"])
        if ids.count(token_id) != n_images:
            raise DataError(
                sid,
                source,
                f"{ids.count(token_id)} {self.base.image_token} placeholders but {n_images} images",
            )
        pixel_values = None
        if n_images:
            loaded = [self.base.images.load(p, sid, source) for p in sample["images"]]
            pixel_values = self.base.images(loaded)
            ids, _ = _expand(
                ids, [0] * len(ids), token_id, self.base.images.tokens_per_image(pixel_values)
            )
        if len(ids) > self.base.max_length:
            raise DataError(
                sid,
                source,
                f"the prompt has {len(ids)} tokens, over stage.max_length "
                f"{self.base.max_length}; raise it (the completion needs room too)",
            )
        return {
            "id": sid,
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "pixel_values": pixel_values,
            "reference": messages[-1]["content"],
            "type": sample.get("type"),
            "truncated": False,
        }

    def length_hints(self, samples) -> list[int]:
        return self.base.length_hints(samples)


def collate_prompts(batch: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    input_ids, attention_mask = left_pad([b["input_ids"] for b in batch], pad_token_id)
    return {
        **batch_fields(batch),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "references": [b["reference"] for b in batch],
        "types": [b["type"] for b in batch],
    }


def prompt_micro_batches(batch: dict, size: int):
    """Split a step's prompts into micro-batches of ``size``, images following their prompts."""
    n = batch["input_ids"].shape[0]
    counts = batch["image_counts"]
    start = torch.cumsum(torch.cat([counts.new_zeros(1), counts]), 0).tolist()
    for lo in range(0, n, size):
        hi = min(n, lo + size)
        pixels = batch["pixel_values"]
        if pixels is not None:
            pixels = pixels[start[lo] : start[hi]]
            pixels = pixels if pixels.shape[0] else None
        mask = batch["attention_mask"][lo:hi]
        keep = int(mask.sum(0).nonzero()[0]) if mask.any() else 0  # drop all-pad columns
        yield {
            "ids": batch["ids"][lo:hi],
            "datasets": batch["datasets"][lo:hi],
            "input_ids": batch["input_ids"][lo:hi, keep:],
            "attention_mask": mask[:, keep:],
            "pixel_values": pixels,
            "image_counts": counts[lo:hi],
            "references": batch["references"][lo:hi],
            "types": batch["types"][lo:hi],
        }


class PromptDataModule(StageDataModule):
    """The stage's mixture of conversation files, read as prompts with references."""

    read = staticmethod(load_prompts)

    def __init__(self, data, stage, encoder: SampleEncoder, seed: int):
        super().__init__(data, stage, PromptEncoder(encoder), seed)
        self.collate = partial(collate_prompts, pad_token_id=encoder.tokenizer.pad_token_id)
