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


def read_records(path: Path) -> list[dict[str, Any]]:
    """The raw records of a JSON-list or JSONL file, extra fields kept."""
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".jsonl":
        out = []
        with path.open() as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
        return out
    with path.open() as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    return data


def normalize(record: dict[str, Any], index: int, source: str) -> dict[str, Any]:
    """One record -> {id, source, images, messages, text}; structural errors name the sample."""
    sample_id = str(record.get("id", f"#{index}"))
    images = record.get("image", record.get("images")) or []
    if isinstance(images, str):
        images = [images]
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
