"""Verifiable rewards for GRPO, by name: built-in rules or a user's callable.

A reward function takes the completions' texts and the references (the data's answer
turns) and returns one float per completion. ``stage.grpo.rewards`` maps names to
weights; a name is a built-in (``exact_match``, ``format``) or a dotted path to a
callable (``my_pkg.rewards:length_penalty`` or ``my_pkg.rewards.length_penalty``)
called as ``fn(completions, references, types)``.

The final answer of a text is what follows its last answer marker ("answer:"), or the
whole text when it has none, so the same rule reads a bare answer ("left") and a
reasoning-then-answer layout ("red circle at 10,20; ... answer: left").
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

RewardFn = Callable[..., Sequence[float]]


def final_answer(text: str, marker: str = "answer:") -> str:
    """The text after the last ``marker`` (case-insensitive), normalized for comparison:
    lower case, single spaces, no trailing full stop."""
    low = text.lower()
    at = low.rfind(marker.lower()) if marker else -1
    answer = low[at + len(marker) :] if at >= 0 else low
    return " ".join(answer.split()).rstrip(".").strip()


def exact_match(
    completions: Sequence[str], references: Sequence[str], *, marker: str = "answer:", **_: Any
) -> list[float]:
    """1 when the completion's final answer equals the reference's, else 0."""
    return [
        float(final_answer(c, marker) == final_answer(r, marker))
        for c, r in zip(completions, references, strict=True)
    ]


def format_reward(
    completions: Sequence[str], references: Sequence[str], *, pattern: str, **_: Any
) -> list[float]:
    """1 when the whole completion matches ``pattern`` (a reasoning-then-answer layout)."""
    rule = re.compile(pattern, re.DOTALL | re.IGNORECASE)
    return [float(rule.fullmatch(c.strip()) is not None) for c in completions]


BUILTIN = {"exact_match": exact_match, "format": format_reward}


def _import(path: str, key: str) -> RewardFn:
    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    if not module or not name:
        raise ValueError(
            f"{key}: {path!r} is neither a built-in reward {sorted(BUILTIN)} nor a dotted "
            "path to a callable (package.module:function)"
        )
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{key}: cannot import reward {path!r} ({e})") from None
    if not callable(fn):
        raise ValueError(f"{key}: {path!r} is not callable")
    return fn


def resolve_rewards(
    grpo: Any, key: str = "stage.grpo.rewards"
) -> dict[str, tuple[RewardFn, float]]:
    """name -> (function, weight), checked before any model work."""
    weights = {str(k): float(v) for k, v in dict(grpo.rewards).items()}
    if not any(w != 0 for w in weights.values()):
        raise ValueError(f"{key} has no reward with a non-zero weight")
    out = {}
    for name, weight in weights.items():
        if name == "exact_match":
            fn = partial(exact_match, marker=grpo.answer_marker)
        elif name == "format":
            try:
                re.compile(grpo.format_pattern)
            except re.error as e:
                raise ValueError(f"stage.grpo.format_pattern is not a regex ({e})") from None
            fn = partial(format_reward, pattern=grpo.format_pattern)
        else:
            fn = _import(name, f"{key}.{name}")
        out[name] = (fn, weight)
    return out


def score(
    rewards: dict[str, tuple[RewardFn, float]],
    completions: Sequence[str],
    references: Sequence[str],
    types: Sequence[str | None],
) -> dict[str, list[float]]:
    """Each reward function's values for every completion; bad values name the function."""
    out = {}
    for name, (fn, _) in rewards.items():
        values = [float(v) for v in fn(completions, references, types=types)]
        if len(values) != len(completions):
            raise ValueError(
                f"reward {name!r} returned {len(values)} values for {len(completions)} completions"
            )
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"reward {name!r} returned a non-finite value")
        out[name] = values
    return out
