"""Reading samples in the LLaVA conversation format (JSON list or JSONL).

A sample is ``{"id", "image": str | [str, ...] (optional), "conversations":
[{"from": "human"|"gpt"|"system", "value": ...}]}`` or, for plain text,
``{"id", "text"}``. Records are normalized and held in an Arrow-backed
``datasets.Dataset``: a million Python dicts shared with dataloader workers
would be copied page by page as reference counts change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class DataError(ValueError):
    """Bad input, always naming the sample (and file) it came from."""

    def __init__(self, sample_id: str, source: str, message: str):
        super().__init__(f"sample {sample_id!r} ({source}): {message}")
        self.sample_id = sample_id
        self.source = source


class DataFileError(ValueError):
    """A data file that cannot be read as samples, naming the file (and line, for JSONL)."""


def read_records(path: Path) -> list[dict[str, Any]]:
    """The raw records of a JSON-list or JSONL file, extra fields kept. Every way the file
    can be unreadable (empty, not UTF-8, not JSON, a record that is not an object) is a
    DataFileError naming the file, and the line for JSONL."""
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataFileError(f"data file {path} is empty")
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 byte-order mark is tolerated
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataFileError(
            f"data file {path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
            f"{e.start}); re-encode the file as UTF-8"
        ) from None
    if path.suffix == ".jsonl":
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(f"data file {path}:{line_no}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise DataFileError(
                    f"data file {path}:{line_no}: a record must be a JSON object, "
                    f"not {type(record).__name__}"
                )
            records.append(record)
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = (
            " (one object per line is JSONL: name the file *.jsonl)"
            if "Extra data" in str(e)
            else ""
        )
        raise DataFileError(f"data file {path}: not valid JSON ({e}){hint}") from None
    if not isinstance(data, list):
        raise DataFileError(
            f"data file {path}: expected a JSON list of samples, got {type(data).__name__}"
        )
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataFileError(
                f"data file {path}: record #{i} must be a JSON object, not {type(record).__name__}"
            )
    return data


def image_names(record: dict[str, Any]) -> list[str]:
    """The image paths a raw record names (``image`` or ``images``, one or a list)."""
    images = record.get("image", record.get("images")) or []
    return list(images) if isinstance(images, list) else [images]


def normalize(record: dict[str, Any], index: int, source: str) -> dict[str, Any]:
    """One record -> {id, source, images, messages, text}; structural errors name the sample."""
    sample_id = str(record.get("id", f"#{index}"))
    images = image_names(record)
    if not all(isinstance(im, str) and im for im in images):
        raise DataError(sample_id, source, f"image paths must be non-empty strings, got {images!r}")
    if "text" in record and "conversations" not in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise DataError(sample_id, source, "'text' must be a non-empty string")
        if images:
            raise DataError(sample_id, source, "a plain-text sample cannot have images")
        return dict(id=sample_id, source=source, images=[], messages=[], text=record["text"])
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(sample_id, source, "needs a non-empty 'conversations' list or a 'text'")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise DataError(sample_id, source, f"malformed turn {turn!r} (not an object)")
        role = ROLES.get(turn.get("from", turn.get("role")))
        content = turn.get("value", turn.get("content"))
        if role is None or not isinstance(content, str):
            raise DataError(sample_id, source, f"malformed turn {turn!r}")
        messages.append({"role": role, "content": content})
    return dict(id=sample_id, source=source, images=list(images), messages=messages, text=None)


def load_samples(path: str | Path) -> datasets.Dataset:
    path = Path(path)
    rows = [normalize(r, i, str(path)) for i, r in enumerate(read_records(path))]
    if not rows:
        raise ValueError(f"data file {str(path)!r} holds no samples")
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "source": datasets.Value("string"),
            "images": datasets.List(datasets.Value("string")),
            "messages": datasets.List(
                {"role": datasets.Value("string"), "content": datasets.Value("string")}
            ),
            "text": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_list(rows, features=features)
