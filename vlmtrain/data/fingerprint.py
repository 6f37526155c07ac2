"""Content fingerprints of a stage's data files, part of the stage's identity.

A finished stage is reused only when its data is the data it was trained on:
each data file's size and SHA-256, and, unless ``data.fingerprint_images`` is
off, the size and modification time of every image the file names (a stat per
image, no read). Editing a record, replacing an image or regenerating the data
therefore makes the stage "not finished" instead of silently reused.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from vlmtrain.config import dataset_config

# (path, size, mtime_ns, root, with images) -> fingerprint; a recipe's stages share files.
_CACHE: dict[tuple, dict[str, Any]] = {}


def stage_data_files(data, stage) -> dict[str, str]:
    """``<dataset>.<split>`` -> file, for every file the stage reads."""
    out = {}
    for name, weight in stage.mixture.items():
        if weight <= 0 or name not in data.datasets:
            continue  # an unknown name fails later with the list of known ones
        entry = dataset_config(data, name)
        out[f"{name}.train"] = entry.train
        if stage.val_every and entry.val:
            out[f"{name}.val"] = entry.val
    return out


def data_fingerprints(data, stage) -> dict[str, dict[str, Any]]:
    """``<dataset>.<split>`` -> {path, size, sha256, images}."""
    return {
        key: file_fingerprint(Path(path), Path(data.root), bool(data.fingerprint_images), key)
        for key, path in sorted(stage_data_files(data, stage).items())
    }


def file_fingerprint(path: Path, root: Path, with_images: bool, key: str = "") -> dict[str, Any]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"data file {str(path)!r} ({'data.datasets.' + key if key else 'data'}) does not exist"
        ) from None
    cache_key = (str(path), st.st_size, st.st_mtime_ns, str(root), with_images)
    if cache_key not in _CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out: dict[str, Any] = {"path": str(path), "size": st.st_size, "sha256": digest.hexdigest()}
        out["images"] = image_fingerprint(path, root) if with_images else "not fingerprinted"
        _CACHE[cache_key] = out
    return _CACHE[cache_key]


def image_fingerprint(path: Path, root: Path) -> dict[str, Any]:
    """The count and one digest of (name, size, mtime) of the images a data file names."""
    from vlmtrain.data.samples import image_names, read_records

    names = sorted(
        {n for record in read_records(path) for n in image_names(record) if isinstance(n, str)}
    )
    digest = hashlib.sha256()
    for name in names:
        try:
            st = os.stat(root / name)
            digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{name}\0missing\n".encode())
    return {"count": len(names), "digest": digest.hexdigest()[:16]}


def describe_changes(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[str]:
    """One line per data file whose fingerprint differs, naming the file."""
    old, new = old or {}, new or {}
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if a is None or b is None:
            lines.append(f"data {key}: {'added' if a is None else 'no longer read'}")
            continue
        if a["path"] != b["path"]:
            continue  # the config diff names the path change
        if (a["size"], a["sha256"]) != (b["size"], b["sha256"]):
            lines.append(
                f"data file {b['path']} ({key}) changed since the stage ran "
                f"(size {a['size']} -> {b['size']} bytes, content hash differs)"
            )
        if a["images"] != b["images"]:
            count = (
                f"{a['images']['count']} -> {b['images']['count']} images"
                if isinstance(a["images"], dict) and isinstance(b["images"], dict)
                else f"{a['images']} -> {b['images']}"
            )
            lines.append(
                f"images named by {b['path']} ({key}) changed since the stage ran "
                f"({count}; sizes or modification times differ)"
            )
    return lines
