"""The reference model of a preference stage, three ways, and the pair forward they share.

- ``copy``: a frozen copy of the starting weights (two models in memory).
- ``disabled_adapter``: the LoRA policy itself with its adapters disabled (one model).
- ``precomputed``: log-probs of every training pair computed once, before training,
  with the starting weights, and cached next to the stage; keyed by the reference
  weights' digest, the data files' digest and the encoding settings, so a stale
  cache is recomputed (and says why), never used. Training holds one model.

Each gives, for a micro-batch of b pairs, the (2b,) summed completion log-probs and
token counts (chosen rows first), from exactly the inputs the policy sees.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from vlmtrain.data.preference import as_sequences
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.objectives.common import completion_logps
from vlmtrain.objectives.next_token import supervised_positions

console = Console(soft_wrap=True)  # paths stay greppable


def pair_logps(
    model: VisionLanguageModel, mb: dict, features: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the chosen and rejected sequences of a micro-batch together, each
    pair's image features (computed once, by the caller) placed in both of its sequences."""
    labels = as_sequences(mb["labels"])
    both = torch.cat([features, features]) if features is not None else None
    logits = model(
        as_sequences(mb["input_ids"]),
        as_sequences(mb["attention_mask"]),
        logits_at=supervised_positions(labels),
        image_features=both,
    )
    return completion_logps(logits, labels)


def image_path_frozen(model: VisionLanguageModel) -> bool:
    parts = (model.vision_tower, model.multi_modal_projector)
    return not any(p.requires_grad for m in parts for p in m.parameters())


class CopyReference:
    def __init__(self, model: VisionLanguageModel):
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        # A frozen image path computes the same features in both: the policy's are reused.
        self.share_features = image_path_frozen(model)

    def to(self, device) -> None:
        self.model.to(device)

    @torch.no_grad()
    def logps(self, mb: dict, policy_features: torch.Tensor | None):
        features = policy_features
        if mb["pixel_values"] is not None and not self.share_features:
            features = self.model.image_features(mb["pixel_values"])
        return pair_logps(self.model, mb, None if features is None else features.detach())


class DisabledAdapterReference:
    """The policy with its LoRA adapters off. check_terms has made sure only the adapters
    train, so the policy's image features are the reference's too."""

    def __init__(self, model: VisionLanguageModel):
        self.policy = model

    def to(self, device) -> None:
        pass

    @torch.no_grad()
    def logps(self, mb: dict, policy_features: torch.Tensor | None):
        features = None if policy_features is None else policy_features.detach()
        with self.policy.language_model.disable_adapter():
            return pair_logps(self.policy, mb, features)


class PrecomputedReference:
    """Looks each pair up by (dataset, id) in the table computed before training."""

    def __init__(self, table: dict[str, torch.Tensor]):
        self.table = table

    def to(self, device) -> None:
        pass

    def logps(self, mb: dict, policy_features: torch.Tensor | None):
        keys = [f"{d}/{i}" for d, i in zip(mb["datasets"], mb["ids"], strict=True)]
        missing = [k for k in keys if k not in self.table]
        if missing:
            raise KeyError(f"pairs {missing[:5]} have no precomputed reference log-probs")
        rows = torch.stack([self.table[k] for k in keys]).to(mb["labels"].device)  # (b, 4)
        sums = torch.cat([rows[:, 0], rows[:, 2]])
        counts = torch.cat([rows[:, 1], rows[:, 3]]).long()
        return sums, counts


# ------------------------------------------------------------------ the on-disk cache
def weights_digest(model: torch.nn.Module) -> str:
    """Digest of every weight but LoRA adapters (zero-effect at the start, seed-dependent)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if "lora_" in name:
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def cache_key(model, encoder, files: dict[str, str]) -> dict[str, Any]:
    """What the cached log-probs depend on: reference weights, data, encoding."""
    base = encoder.base
    tok = base.tokenizer
    vocab = (
        tok.backend_tokenizer.to_str()
        if hasattr(tok, "backend_tokenizer")
        else json.dumps(tok.get_vocab(), sort_keys=True)
    )
    return {
        "reference_weights": weights_digest(model),
        "data": {name: file_digest(path) for name, path in sorted(files.items())},
        "encoding": {
            "max_length": base.max_length,
            "image_token": base.image_token,
            "chat_template": hashlib.sha256(str(tok.chat_template).encode()).hexdigest()[:16],
            "tokenizer": hashlib.sha256(vocab.encode()).hexdigest()[:16],
            "image_processor": json.dumps(
                base.images.processor.to_dict(), sort_keys=True, default=str
            ),
            "patch_size": base.images.patch_size,
            "downsample": base.images.downsample,
        },
    }


def stale_parts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for part in new:
        if isinstance(new[part], dict):
            out += [f"{part}.{k}" for k in new[part] if old.get(part, {}).get(k) != new[part][k]]
        elif old.get(part) != new[part]:
            out.append(part)
    return out


@torch.no_grad()
def compute_table(model, mixtures, collate, batch_size: int, device) -> dict[str, torch.Tensor]:
    """Reference log-probs of every distinct pair of the mixtures (train, and val when the
    stage validates), with ``model`` as it is."""
    was_training = model.training
    model.eval()
    keys = sorted({(m, key) for m, mixture in enumerate(mixtures) for key in mixture.index})
    table: dict[str, torch.Tensor] = {}
    for lo in range(0, len(keys), batch_size):
        chunk = keys[lo : lo + batch_size]
        batch = collate(
            [{**mixtures[m].encode(mixtures[m].sources[n][j]), "dataset": n} for m, (n, j) in chunk]
        )
        mb = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        pixels = mb["pixel_values"]
        features = model.image_features(pixels) if pixels is not None else None
        sums, counts = pair_logps(model, mb, features)
        b = len(chunk)
        n_c, n_r = counts[:b].to(sums.dtype), counts[b:].to(sums.dtype)
        rows = torch.stack([sums[:b], n_c, sums[b:], n_r], 1).cpu()
        for d, i, row in zip(batch["datasets"], batch["ids"], rows, strict=True):
            key = f"{d}/{i}"
            if key in table and not torch.equal(table[key], row):
                raise ValueError(
                    f"pair id {i!r} of dataset {d!r} names two different pairs (train and val "
                    "files?); reference=precomputed needs ids unique across them"
                )
            table[key] = row
    model.train(was_training)
    return table


def load_or_compute(cache_dir: Path, key: dict[str, Any], compute) -> dict[str, torch.Tensor]:
    """The cached table when its key matches ``key``; else ``compute()``, saved atomically."""
    meta_path, table_path = cache_dir / "reference_logps.json", cache_dir / "reference_logps.pt"
    if meta_path.is_file() and table_path.is_file():
        old = json.loads(meta_path.read_text())
        stale = stale_parts(old, key)
        if not stale:
            saved = torch.load(table_path, weights_only=True)
            console.print(f"reference log-probs: {len(saved['keys'])} pairs from {table_path}")
            return dict(zip(saved["keys"], saved["values"], strict=True))
        console.print(
            f"reference log-probs in {table_path} are stale ({', '.join(stale)} changed): recomputing"
        )
    table = compute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # a table without its key is never read
    keys = sorted(table)
    tmp = table_path.with_name(table_path.name + f".tmp-{os.getpid()}")
    torch.save({"keys": keys, "values": torch.stack([table[k] for k in keys])}, tmp)
    os.replace(tmp, table_path)
    tmp = meta_path.with_name(meta_path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(key, indent=1))
    os.replace(tmp, meta_path)  # last: the key marks the table complete
    console.print(f"reference log-probs: {len(table)} pairs computed, cached in {table_path}")
    return table
