"""Turn one normalized sample into model inputs, checking everything that can be checked.

Every check names the sample and its file: placeholder count against image
count, image tokens cut by the maximum length, no supervised token left.
Nothing is dropped or zero-filled.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from vlmtrain.data.chat import labels_from_mask, render_messages, render_text
from vlmtrain.data.images import ImageProcessor
from vlmtrain.data.samples import DataError


@dataclass
class SampleEncoder:
    tokenizer: PreTrainedTokenizerBase
    images: ImageProcessor
    image_token: str
    max_length: int

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        sid, source = sample["id"], sample["source"]
        if sample.get("text") is not None:
            ids, mask = render_text(self.tokenizer, sample["text"])
        else:
            ids, mask = render_messages(self.tokenizer, sample["messages"])
        n_placeholders = ids.count(self.image_token_id)
        n_images = len(sample["images"])
        if n_placeholders != n_images:
            raise DataError(
                sid,
                source,
                f"{n_placeholders} {self.image_token} placeholders but {n_images} images",
            )
        if any(m and t == self.image_token_id for t, m in zip(ids, mask, strict=True)):
            raise DataError(sid, source, f"{self.image_token} inside an assistant turn")

        pixel_values = None
        if n_images:
            loaded = [self.images.load(p, sid, source) for p in sample["images"]]
            pixel_values, per_image = self.images.encode(loaded)
            ids, mask = _expand(ids, mask, self.image_token_id, per_image)

        truncated = len(ids) > self.max_length
        if truncated:
            last_image = max((i for i, t in enumerate(ids) if t == self.image_token_id), default=-1)
            if last_image >= self.max_length:
                raise DataError(
                    sid,
                    source,
                    f"image tokens reach position {last_image + 1} but max_length is "
                    f"{self.max_length}; raise stage.max_length or shorten the sample",
                )
            ids, mask = ids[: self.max_length], mask[: self.max_length]
        if not any(mask):
            raise DataError(
                sid,
                source,
                "no supervised (assistant) token"
                + (" after truncation" if len(ids) == self.max_length else ""),
            )
        input_ids = torch.tensor(ids, dtype=torch.long)
        return {
            "id": sid,
            "input_ids": input_ids,
            "labels": labels_from_mask(input_ids, torch.tensor(mask)),
            "pixel_values": pixel_values,
            "truncated": truncated,  # counted per dataset and reported (data.quality)
        }

    def length_hints(self, samples: Iterable[dict[str, Any]]) -> list[int]:
        """Approximate encoded lengths, for grouping batches by length: the text's tokens
        (without the chat template) plus the images' nominal tokens, capped at max_length.
        One batched tokenizer call, no image decoded."""
        samples = list(samples)
        texts = [
            s["text"]
            if s.get("text") is not None
            else " ".join(m["content"] for m in s["messages"])
            for s in samples
        ]
        counts = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [
            min(
                self.max_length,
                len(ids)
                + self.images.tokens_hint(s["images"], s.get("id", "?"), s.get("source", "?")),
            )
            for ids, s in zip(counts, samples, strict=True)
        ]


def _expand(
    ids: list[int], mask: list[int], token: int, n: int | list[int]
) -> tuple[list[int], list[int]]:
    """Repeat each placeholder ``n`` times (or the i-th one ``n[i]`` times: tiled images
    differ); image positions are never supervised."""
    counts = iter(n) if isinstance(n, list) else None
    out_ids, out_mask = [], []
    for t, m in zip(ids, mask, strict=True):
        if t == token:
            k = next(counts) if counts is not None else n
            out_ids.extend([token] * k)
            out_mask.extend([0] * k)
        else:
            out_ids.append(t)
            out_mask.append(m)
    return out_ids, out_mask


def collate(batch: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad a list of encoded samples; images of all samples are concatenated in order."""
    length = max(len(b["input_ids"]) for b in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        input_ids[i, :n] = b["input_ids"]
        labels[i, :n] = b["labels"]
        attention_mask[i, :n] = 1
    return {
        **batch_fields(batch),
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
    }


def batch_fields(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """What every objective's batch carries besides its token tensors: ids, the mixture
    dataset of each sample, data-quality flags, and the images of all samples in order."""
    pixels = [b["pixel_values"] for b in batch if b["pixel_values"] is not None]
    return {
        "ids": [b["id"] for b in batch],
        # The mixture dataset each sample came from (None outside a mixture).
        "datasets": [b.get("dataset") for b in batch],
        # Samples cut at max_length, and bad samples skipped to fill this batch (data.quality).
        "truncated": [bool(b.get("truncated")) for b in batch],
        "skipped": [s for b in batch for s in b.get("skipped", ())],
        "pixel_values": torch.cat(pixels) if pixels else None,
        "image_counts": torch.tensor(
            [0 if b["pixel_values"] is None else b["pixel_values"].shape[0] for b in batch]
        ),
    }
