"""The encoded store: each data file encoded once, memory-mapped by every reader.

``data.encoded_store=<dir>`` encodes every sample of a stage's data files (token
ids, labels, pixels, or the error that makes it a bad sample) before training,
into an Arrow table (``datasets``) under ``<dir>/<key>``. ``<key>`` digests the
file's content fingerprint (vlmtrain.data.fingerprint: size and SHA-256, images'
sizes and times) and the encoder's settings (tokenizer vocabulary and chat
template, image processor, image token count, max_length), so any change of data
or encoding makes a new table and a table is never read for other settings.

Arrow files are memory-mapped: loader workers share the operating system's page
cache instead of each encoding (``data.cache_encoded`` keeps one copy per worker,
filled one epoch at a time), and later epochs, stages with the same data and
encoder, and later runs read instead of re-encoding. Samples are the very ones the
encoder gives (tested), so exact resume is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmtrain.data.encode import SampleEncoder
from vlmtrain.data.samples import DataError

VERSION = 1  # bump when the table's layout changes


def encoder_fingerprint(encoder: SampleEncoder) -> str:
    tok = encoder.tokenizer
    vocab = sorted(tok.get_vocab().items())
    images = encoder.images
    settings = {
        "version": VERSION,
        "vocab": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(),
        "tokenizer": type(tok).__name__,
        "chat_template": tok.chat_template,
        "special": tok.special_tokens_map,
        "image_token": encoder.image_token,
        "max_length": encoder.max_length,
        "processor": images.processor.to_dict(),
        "patch_size": images.patch_size,
        "downsample": images.downsample,
        "limits": vars(images.limits),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _rows(samples: Sequence[dict[str, Any]], encoder: SampleEncoder):
    for raw in samples:
        try:
            s = encoder(raw)
        except DataError as e:
            yield {"id": str(raw["id"]), "error": str(e), "input_ids": [], "labels": [],
                   "pixels": [], "pixel_shape": [], "truncated": False}  # fmt: skip
            continue
        pixels = s["pixel_values"]
        yield {
            "id": str(s["id"]),
            "error": None,
            "input_ids": s["input_ids"].tolist(),
            "labels": s["labels"].tolist(),
            "pixels": [] if pixels is None else pixels.numpy().ravel(),
            "pixel_shape": [] if pixels is None else list(pixels.shape),
            "truncated": bool(s["truncated"]),
        }


def open_store(root: str | Path, file_key: str, samples, encoder: SampleEncoder):
    """The stored encoding of one data file (``samples`` read from it), built if missing."""
    import datasets

    key = hashlib.sha256(f"{file_key}\0{encoder_fingerprint(encoder)}".encode()).hexdigest()[:24]
    path = Path(root) / key
    if not (path / "dataset_info.json").is_file():
        features = datasets.Features(
            {
                "id": datasets.Value("string"),
                "error": datasets.Value("string"),
                "input_ids": datasets.List(datasets.Value("int64")),
                "labels": datasets.List(datasets.Value("int64")),
                "pixels": datasets.List(datasets.Value("float32")),
                "pixel_shape": datasets.List(datasets.Value("int64")),
                "truncated": datasets.Value("bool"),
            }
        )
        table = datasets.Dataset.from_list(list(_rows(samples, encoder)), features=features)
        tmp = path.with_name(f"{key}.tmp-{os.getpid()}")
        table.save_to_disk(str(tmp))
        try:
            tmp.rename(path)  # atomic; another process may have built it meanwhile
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    table = datasets.load_from_disk(str(path)).with_format("numpy")
    if len(table) != len(samples):
        raise ValueError(f"encoded store {path} has {len(table)} rows for {len(samples)} samples")
    return table


class StoredSource(Sequence):
    """A data file's samples, each carrying its stored encoding (``StoredEncoder`` reads it)."""

    def __init__(self, samples: Sequence[dict[str, Any]], table):
        self.samples, self.table = samples, table

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, j: int) -> dict[str, Any]:
        return {**self.samples[j], "stored": j}


class StoredEncoder:
    """Reads samples from their stores instead of encoding them; the same results."""

    def __init__(self, encoder: SampleEncoder, tables: dict[str, Any]):
        self.encoder, self.tables = encoder, tables

    def __getattr__(self, name: str):  # tokenizer, images, length_hints of the real encoder
        if name in ("encoder", "tables") or name.startswith("__"):
            raise AttributeError(name)  # unpickling (loader workers) reads before __init__
        return getattr(self.encoder, name)

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        row = self.tables[raw["source"]][raw["stored"]]
        if row["error"] is not None:
            err = DataError(str(raw["id"]), raw["source"], "")
            err.args = (str(row["error"]),)
            raise err
        shape = [int(x) for x in row["pixel_shape"]]
        pixels = torch.from_numpy(np.array(row["pixels"]).reshape(shape)) if shape else None
        return {
            "id": raw["id"],
            "input_ids": torch.from_numpy(np.asarray(row["input_ids"], dtype=np.int64)),
            "labels": torch.from_numpy(np.asarray(row["labels"], dtype=np.int64)),
            "pixel_values": pixels,
            "truncated": bool(row["truncated"]),
        }
