"""Packing: the samples of one optimizer step laid end to end in rows of ``max_length``.

Without packing, a step's samples are right-padded to the longest one; the tiny
SFT mixture (64 image tokens, one-word answers next to 20-token captions and
multi-turn chats) spends a quarter of its token cells on padding. Packing puts
several samples in one row instead and keeps them apart:

- position ids restart at 0 for every sample, and the LM is called without a 2D
  attention mask, so transformers derives a block-diagonal causal mask from the
  restarts (``masking_utils.find_packed_sequence_indices``; sdpa / eager) or, with
  flash attention and one flattened row, the varlen kernel's sequence boundaries
  (``modeling_flash_attention_utils._is_packed_sequence``);
- the first token of each sample is never a target (the last token of the sample
  before it would otherwise be trained to predict it);
- ``sample_index`` names the sample of every position, so per-sample loss weights
  (``stage.loss_reduction``) and per-dataset losses are computed per sample, not per row;
- images follow their samples: pixels are concatenated in the packed order of the
  samples, the order in which their placeholders occur row by row.

Packing rearranges a step; it never changes which samples make it. The sampler and
its checkpointed position are those of an unpacked stage, so resume is exact, and
the loss of a step equals the unpacked loss of the same samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vlmtrain.data.chat import IGNORE_INDEX
from vlmtrain.data.encode import batch_fields


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (rows) of sample indices, each summing to at most ``capacity``: longest
    sample first, each into the first row it fits. Ties keep the given order, so the
    result is a function of the step's samples alone (deterministic, resumable)."""
    too_long = [(i, n) for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"sample {i} has {n} tokens, more than a packed row's {capacity}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def micro_batch_count(num_samples: int, batch_size: int) -> int:
    """Micro-batches of a step: those of the unpacked step (``accumulate``), packed or
    not, so that every DDP rank runs as many backward passes (each one all-reduces)."""
    return -(-num_samples // batch_size)


def split_rows(rows: list[list[int]], count: int) -> list[list[int]]:
    """At least ``count`` rows: the last sample of the fullest row (by samples) moves to
    a row of its own until there are enough; every micro-batch then has a row."""
    rows = [list(r) for r in rows]
    while len(rows) < count:
        fullest = max(range(len(rows)), key=lambda r: len(rows[r]))
        if len(rows[fullest]) < 2:
            raise ValueError(f"{sum(map(len, rows))} samples cannot fill {count} rows")
        rows.append([rows[fullest].pop()])
    return rows


def pack_collate(
    batch: list[dict[str, Any]], pad_token_id: int, max_length: int, batch_size: int | None = None
) -> dict[str, Any]:
    """The step's encoded samples packed into rows of at most ``max_length`` tokens, at
    least one row per micro-batch of ``batch_size`` samples.

    Per-sample fields (ids, datasets, truncation flags, pixels) are in packed order:
    row by row, left to right; ``sample_index`` (-1 on padding) refers to that order.
    ``image_counts`` counts images per row, as micro-batches split rows."""
    rows = first_fit_decreasing([len(b["input_ids"]) for b in batch], max_length)
    if batch_size:
        rows = split_rows(rows, micro_batch_count(len(batch), batch_size))
    order = [i for row in rows for i in row]
    width = max(sum(len(batch[i]["input_ids"]) for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    sample_index = torch.full(shape, -1, dtype=torch.long)
    image_counts = torch.zeros(len(rows), dtype=torch.long)
    k = 0  # the packed index of the next sample
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            b = batch[i]
            n = len(b["input_ids"])
            input_ids[r, at : at + n] = b["input_ids"]
            labels[r, at : at + n] = b["labels"]
            labels[r, at] = IGNORE_INDEX  # predicted by nothing of its own sample
            position_ids[r, at : at + n] = torch.arange(n)
            sample_index[r, at : at + n] = k
            if b["pixel_values"] is not None:
                image_counts[r] += b["pixel_values"].shape[0]
            at += n
            k += 1
        # Padding gets positions of its own (a block of its own in the derived mask).
        position_ids[r, at:] = torch.arange(width - at)
    return {
        **batch_fields([batch[i] for i in order]),
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": (sample_index >= 0).long(),  # real tokens; not given to the LM
        "position_ids": position_ids,
        "sample_index": sample_index,
        "image_counts": image_counts,
    }


def flatten_rows(mb: dict[str, Any]) -> dict[str, Any]:
    """A packed micro-batch as one row without padding: the layout flash attention's
    varlen path needs (it reads sequence boundaries from position ids of a batch of one)."""
    real = mb["sample_index"] >= 0
    return {
        **mb,
        **{
            k: mb[k][real][None]
            for k in ("input_ids", "labels", "attention_mask", "position_ids", "sample_index")
        },
    }


def padding_fraction(cells: int, tokens: int) -> float:
    """The share of the token cells the model ran on that held no token."""
    return 1.0 - tokens / cells if cells else 0.0
