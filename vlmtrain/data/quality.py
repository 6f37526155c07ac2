"""What a stage's data looked like in training: samples cut at ``stage.max_length`` and bad
samples skipped (within ``data.max_skipped``), per dataset.

Counted on the training batches as the main process receives them (a dataloader worker
cannot report back), kept in checkpoints so a resumed stage counts as an uninterrupted
one, summed over processes at the end, printed and stored in the artifact's manifest.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback


class TooManySkipped(ValueError):
    pass


class DataQuality(Callback):
    def __init__(self, datasets: list[str], max_skipped: int, max_length: int):
        self.datasets = list(datasets)
        self.max_skipped = max_skipped
        self.max_length = max_length
        self.seen: Counter[str] = Counter()
        self.truncated: Counter[str] = Counter()
        self.skipped: dict[str, str] = {}  # "<dataset>/<sample id>" -> why

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        for name, cut in zip(batch["datasets"], batch["truncated"], strict=True):
            self.seen[name] += 1
            self.truncated[name] += int(cut)
        for name, sample_id, why in batch.get("skipped", ()):
            self.skipped.setdefault(f"{name}/{sample_id}", why)
        if len(self.skipped) > self.max_skipped:
            raise TooManySkipped(
                f"{len(self.skipped)} bad samples skipped, over data.max_skipped="
                f"{self.max_skipped}:\n  " + "\n  ".join(self.skipped.values())
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "seen": dict(self.seen),
            "truncated": dict(self.truncated),
            "skipped": dict(self.skipped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = Counter(state["seen"])
        self.truncated = Counter(state["truncated"])
        self.skipped = dict(state["skipped"])

    def totals(self, strategy) -> dict[str, dict[str, int]]:
        """dataset -> {seen, truncated, skipped}, summed over all processes."""
        skipped = Counter(key.split("/", 1)[0] for key in self.skipped)
        local = torch.tensor(
            [[self.seen[n], self.truncated[n], skipped[n]] for n in self.datasets],
            dtype=torch.float64,
        )
        summed = strategy.reduce(local, reduce_op="sum") if strategy is not None else local
        return {
            n: dict(zip(("seen", "truncated", "skipped"), map(int, row.tolist()), strict=True))
            for n, row in zip(self.datasets, summed, strict=True)
        }

    def metrics(self, totals: dict[str, dict[str, int]]) -> dict[str, int]:
        return {f"data/{k}/{n}": v for n, row in totals.items() for k, v in row.items()}

    def report(self, totals: dict[str, dict[str, int]]) -> list[str]:
        lines = []
        for name, row in totals.items():
            if row["seen"]:
                share = 100 * row["truncated"] / row["seen"]
                lines.append(
                    f"{name}: {row['truncated']} of {row['seen']} samples seen were cut at "
                    f"stage.max_length={self.max_length} ({share:.1f}%)"
                    + (f"; {row['skipped']} bad samples skipped" if row["skipped"] else "")
                )
        lines += [f"skipped: {why}" for why in self.skipped.values()]
        return lines
