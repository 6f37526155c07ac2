"""Consistency (minimum Bayes risk) scores of sampled answers, and the data sets made of them.

Each of a prompt's N samples is scored by its mean similarity to the other N-1: the
answer most samples agree with scores highest. Similarity is exact match of the final
answers for short answers, word-overlap F1 for long ones, or a user's callable.

A scored prompt becomes an SFT record (the prompt and its best sample) and, when the
best and worst samples differ in score, a preference pair (best chosen, worst
rejected), both in the layouts the existing loaders read.
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from vlmtrain.objectives.rewards import final_answer

Similarity = Callable[[str, str], float]


def exact_similarity(a: str, b: str, marker: str = "answer:") -> float:
    return float(final_answer(a, marker) == final_answer(b, marker))


def token_f1(a: str, b: str) -> float:
    """F1 of the two texts' words (as a bag): 1 for the same words, 0 for none shared."""
    wa, wb = Counter(a.lower().split()), Counter(b.lower().split())
    common = sum((wa & wb).values())
    if not common:
        return float(not wa and not wb)
    p, r = common / sum(wa.values()), common / sum(wb.values())
    return 2 * p * r / (p + r)


def similarity_for(name: str, marker: str, key: str = "stage.generate.similarity") -> Similarity:
    if name == "exact":
        return partial(exact_similarity, marker=marker)
    if name == "token_f1":
        return token_f1
    module, sep, attr = name.partition(":")
    if not sep:
        module, _, attr = name.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(
            f"{key}={name!r}: neither exact, token_f1 nor an importable callable ({e})"
        ) from None
    return fn


def mbr_scores(samples: Sequence[str], similarity: Similarity) -> list[float]:
    """Each sample's mean similarity to the others."""
    n = len(samples)
    if n < 2:
        raise ValueError("consistency needs at least 2 samples per prompt")
    sim = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            sim[i][j] = sim[j][i] = float(similarity(samples[i], samples[j]))
    return [sum(row) / (n - 1) for row in sim]


def scored_record(prompt: dict[str, Any], samples: list[str], scores: list[float]) -> dict:
    """One line of samples.jsonl: the prompt, every sample with its score, best and worst
    (the first of equals, so the choice is deterministic)."""
    best = max(range(len(samples)), key=lambda i: (scores[i], -i))
    worst = min(range(len(samples)), key=lambda i: (scores[i], i))
    return {
        **prompt,
        "samples": [{"text": t, "score": s} for t, s in zip(samples, scores, strict=True)],
        "best": samples[best],
        "best_score": scores[best],
        "worst": samples[worst],
        "worst_score": scores[worst],
    }


def sft_record(row: dict[str, Any]) -> dict[str, Any]:
    turns = [*row["conversations"], {"from": "gpt", "value": row["best"]}]
    return {"id": row["id"], "image": row["images"], "conversations": turns, "type": row["type"]}


def pair_record(row: dict[str, Any]) -> dict[str, Any] | None:
    """Best vs worst, when they differ: a prompt whose samples all agree gives no pair."""
    if row["best_score"] <= row["worst_score"] or row["best"].strip() == row["worst"].strip():
        return None
    return {
        "id": row["id"],
        "image": row["images"],
        "conversations": row["conversations"],
        "chosen": row["best"],
        "rejected": row["worst"],
        "type": row["type"],
    }
