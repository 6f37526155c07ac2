"""Preference pairs: records, their encoding as two sequences sharing one image, batches.

Two record layouts are read (JSON list, JSONL, or parquet through ``datasets``):

- LLaVA style: ``{"id", "image": str | [str], "conversations": [prompt turns, the
  last from the human], "chosen": str, "rejected": str}``;
- Hugging Face preference style (TRL, RLAIF-V): ``{"prompt" (or "question"): str |
  [messages], "chosen"/"rejected": str | [assistant messages], "image"/"images":
  path(s) or {"bytes", "path"}}``. A string prompt without ``<image>`` gets one
  placeholder per image in front, as these data sets carry none.

A pair encodes to chosen and rejected token ids with the same prompt, and the
pair's pixels once: the objective computes the image features once for both.
"""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image

from vlmtrain.data.chat import labels_from_mask, render_messages, render_prompt
from vlmtrain.data.encode import SampleEncoder, _expand, batch_fields
from vlmtrain.data.module import StageDataModule
from vlmtrain.data.samples import ROLES, DataError, read_records

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "source": datasets.Value("string"),
        "images": datasets.List(datasets.Value("string")),  # paths under data.root
        "image_bytes": datasets.List(datasets.Value("binary")),  # images embedded in parquet
        "prompt": datasets.List(
            {"role": datasets.Value("string"), "content": datasets.Value("string")}
        ),
        "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"),
    }
)


def _text_of(content: Any) -> str:
    """Message content as text: a list of typed parts gets ``<image>`` for image parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            "<image>" if p.get("type") == "image" else str(p.get("text", "")) for p in content
        )
    raise TypeError(f"message content {content!r}")


def _answer(value: Any) -> str:
    """A chosen/rejected answer: a string, a turn, or a list of (assistant) messages."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return _text_of(value.get("value", value.get("content")))
    if isinstance(value, list):
        return "".join(_text_of(m.get("content", m.get("value"))) for m in value)
    raise TypeError(f"answer {value!r}")


def normalize_pair(record: dict[str, Any], index: int, source: str) -> dict[str, Any]:
    """One record (either layout) -> the FEATURES schema; structural errors name the sample."""
    sid = str(record.get("id", f"#{index}"))
    raw = record.get("images", record.get("image")) or []
    raw = raw if isinstance(raw, list) else [raw]
    paths, blobs = [], []
    for im in raw:
        if isinstance(im, str):
            paths.append(im)
        elif isinstance(im, dict) and im.get("bytes"):
            blobs.append(im["bytes"])
        elif isinstance(im, dict) and im.get("path"):
            paths.append(im["path"])
        else:
            raise DataError(sid, source, f"cannot read image entry {str(im)[:80]!r}")
    if paths and blobs:
        raise DataError(sid, source, "mixes image paths and embedded image bytes")
    try:
        chosen, rejected = _answer(record["chosen"]), _answer(record["rejected"])
        if "conversations" in record:
            prompt = [
                {
                    "role": ROLES[t.get("from", t.get("role"))],
                    "content": _text_of(t.get("value", t.get("content"))),
                }
                for t in record["conversations"]
            ]
        else:
            p = record.get("prompt", record.get("question"))
            if isinstance(p, str):
                if "<image>" not in p:
                    p = "<image>\n" * len(raw) + p
                prompt = [{"role": "user", "content": p}]
            else:
                prompt = [{"role": ROLES[m["role"]], "content": _text_of(m["content"])} for m in p]
    except (KeyError, TypeError) as e:
        raise DataError(
            sid,
            source,
            f"not a preference record ({e}): needs conversations or prompt, chosen and rejected",
        ) from None
    if not prompt or prompt[-1]["role"] != "user":
        raise DataError(sid, source, "the prompt must end with a user (human) turn")
    return dict(
        id=sid,
        source=source,
        images=paths,
        image_bytes=blobs,
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
    )


def load_pairs(path: str | Path) -> datasets.Dataset:
    path = Path(path)
    if path.suffix == ".parquet":
        if not path.is_file():
            raise FileNotFoundError(f"data file {str(path)!r} does not exist")
        table = datasets.Dataset.from_parquet(str(path))
        for col, feature in table.features.items():  # keep images as bytes, decode on use
            if isinstance(feature, datasets.Image):
                table = table.cast_column(col, datasets.Image(decode=False))
            elif isinstance(getattr(feature, "feature", None), datasets.Image):
                table = table.cast_column(col, datasets.List(datasets.Image(decode=False)))
        records = list(table)
    else:
        records = read_records(path)
    rows = [normalize_pair(r, i, str(path)) for i, r in enumerate(records)]
    if not rows:
        raise ValueError(f"data file {str(path)!r} holds no preference pairs")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):  # the reference log-prob cache is keyed by id
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(dup, str(path), "the id occurs more than once in the file")
    return datasets.Dataset.from_list(rows, features=FEATURES)


class PairEncoder:
    """A preference pair -> chosen and rejected ids/labels (same prompt) and its pixels once.

    Uses the stage's ``SampleEncoder`` settings: tokenizer, image processor, max length."""

    def __init__(self, base: SampleEncoder):
        self.base = base
        self.tokenizer = base.tokenizer

    def _images(self, sample: dict[str, Any]) -> list[Image.Image]:
        sid, source = sample["id"], sample["source"]
        images = self.base.images
        out = [images.load(p, sid, source) for p in sample["images"]]
        for k, blob in enumerate(sample["image_bytes"]):
            try:
                with Image.open(io.BytesIO(blob)) as im:
                    out.append(im.convert("RGB"))
            except OSError as e:
                raise DataError(
                    sid, source, f"embedded image {k} cannot be decoded ({e})"
                ) from None
        return out

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        sid, source = sample["id"], sample["source"]
        token, token_id, max_length = (
            self.base.image_token,
            self.base.image_token_id,
            self.base.max_length,
        )
        chosen, rejected = sample["chosen"], sample["rejected"]
        if chosen.strip() == rejected.strip():
            raise DataError(sid, source, "chosen and rejected are identical")
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            if token in answer:
                raise DataError(sid, source, f"{token} placeholder inside the {name} answer")
            if not answer.strip():
                raise DataError(sid, source, f"the {name} answer is empty")
        prompt = list(sample["prompt"])
        prompt_ids = render_prompt(self.tokenizer, prompt)
        n_images = len(sample["images"]) + len(sample["image_bytes"])
        if prompt_ids.count(token_id) != n_images:
            raise DataError(
                sid,
                source,
                f"{prompt_ids.count(token_id)} {token} placeholders but {n_images} images",
            )
        pixel_values, per_image = None, 0
        if n_images:
            pixel_values, per_image = self.base.images.encode(self._images(sample))
        out: dict[str, Any] = {"id": sid, "pixel_values": pixel_values, "truncated": False}
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            ids, mask = render_messages(
                self.tokenizer, [*prompt, {"role": "assistant", "content": answer}]
            )
            if ids[: len(prompt_ids)] != prompt_ids:
                raise DataError(
                    sid, source, "the chat template renders the prompt differently before an answer"
                )
            # Only this answer is supervised, not earlier assistant turns of the prompt.
            mask = [0] * len(prompt_ids) + mask[len(prompt_ids) :]
            if n_images:
                ids, mask = _expand(ids, mask, token_id, per_image)
            if len(ids) > max_length:
                last_image = max((i for i, t in enumerate(ids) if t == token_id), default=-1)
                if last_image >= max_length:
                    raise DataError(
                        sid,
                        source,
                        f"prompt image tokens reach position {last_image + 1} but max_length is "
                        f"{max_length}; raise stage.max_length or shorten the prompt",
                    )
                ids, mask = ids[:max_length], mask[:max_length]
                out["truncated"] = True  # a pair is cut when either answer is (data.quality)
                if not any(mask):
                    raise DataError(
                        sid,
                        source,
                        f"the {name} completion is empty after truncation to max_length "
                        f"{max_length}; raise stage.max_length or shorten the prompt",
                    )
            input_ids = torch.tensor(ids, dtype=torch.long)
            out[f"{name}_input_ids"] = input_ids
            out[f"{name}_labels"] = labels_from_mask(input_ids, torch.tensor(mask))
        return out

    def length_hints(self, samples) -> list[int]:
        texts = [
            " ".join(m["content"] for m in s["prompt"])
            + " "
            + max(s["chosen"], s["rejected"], key=len)
            for s in samples
        ]
        counts = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        per_image = self.base.images.nominal_tokens
        return [
            min(
                self.base.max_length,
                len(c) + per_image * (len(s["images"]) + len(s["image_bytes"])),
            )
            for c, s in zip(counts, samples, strict=True)
        ]


def collate_pairs(batch: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Pairs -> (B, 2, L) ids / labels / attention mask (index 0 chosen, 1 rejected, one
    padded length for both), the pairs' images once each, in order."""
    length = max(len(b[f"{k}_input_ids"]) for b in batch for k in ("chosen", "rejected"))
    input_ids = torch.full((len(batch), 2, length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), 2, length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), 2, length), dtype=torch.long)
    for i, b in enumerate(batch):
        for j, k in enumerate(("chosen", "rejected")):
            n = len(b[f"{k}_input_ids"])
            input_ids[i, j, :n] = b[f"{k}_input_ids"]
            labels[i, j, :n] = b[f"{k}_labels"]
            attention_mask[i, j, :n] = 1
    return {
        **batch_fields(batch),
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
    }


def as_sequences(t: torch.Tensor) -> torch.Tensor:
    """(B, 2, L) -> (2B, L): all chosen rows, then all rejected rows."""
    return t.transpose(0, 1).reshape(-1, t.shape[-1])


class PreferenceDataModule(StageDataModule):
    """The stage's mixture of preference files, batched as pairs."""

    read = staticmethod(load_pairs)

    def __init__(self, data, stage, encoder: SampleEncoder, seed: int):
        super().__init__(data, stage, PairEncoder(encoder), seed)
        self.collate = partial(collate_pairs, pad_token_id=encoder.tokenizer.pad_token_id)
