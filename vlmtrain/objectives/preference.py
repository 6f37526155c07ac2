"""Preference losses (the DPO family) and how a stage combines them into weighted terms.

``preference_loss`` is the one public loss function: per-pair losses and the
rewards TRL logs (beta times the policy-minus-reference log-prob of a
completion, detached). A stage names weighted terms, e.g. MPO is
``{sigmoid: 0.8, bco_pair: 0.2, sft: 1.0}``; ``check_terms`` refuses an
unsupported combination before any model is built, naming the config keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# Losses that compare a chosen and a rejected completion against a reference.
PAIR_LOSSES = ("sigmoid", "conservative", "robust", "ipo", "hinge", "bco_pair")
# The next-token loss on the chosen completion (RPO's alpha term, MPO's generation loss).
SFT = "sft"
REFERENCE_KINDS = ("copy", "disabled_adapter", "precomputed", "none")


def preference_loss(
    kind: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards), each (B,).

    The log-probs are whatever the loss is defined on: sums over the completion's
    tokens, or per-token means for ``ipo``. Options: ``label_smoothing`` (e) for
    ``sigmoid``, ``conservative`` (required, 0 < e < 0.5) and ``robust``
    (0 <= e < 0.5); ``reward_mean`` (d, in reward units) for ``bco_pair``.
    """
    if kind not in PAIR_LOSSES:
        raise ValueError(f"unknown preference loss {kind!r}; expected one of {PAIR_LOSSES}")
    allowed = {
        "sigmoid": {"label_smoothing"},
        "conservative": {"label_smoothing"},
        "robust": {"label_smoothing"},
        "bco_pair": {"reward_mean"},
    }.get(kind, set())
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"preference loss {kind!r} takes no option {unknown}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    e = float(options.get("label_smoothing", 0.0))

    if kind in ("sigmoid", "conservative"):
        if kind == "conservative" and not 0.0 < e < 0.5:
            raise ValueError(f"conservative DPO needs 0 < label_smoothing < 0.5, got {e}")
        if not 0.0 <= e < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {e}")
        losses = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    elif kind == "robust":
        if not 0.0 <= e < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {e}")
        losses = (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif kind == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # bco_pair
        if "reward_mean" not in options:
            raise TypeError("preference loss 'bco_pair' needs reward_mean (the running mean d)")
        d = torch.as_tensor(options["reward_mean"], dtype=h.dtype, device=h.device)
        losses = -F.logsigmoid(beta * chosen_logratios - d) - F.logsigmoid(
            -(beta * rejected_logratios - d)
        )
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


class RunningRewardMean:
    """BCO's d: the mean of every reward (chosen and rejected, all ranks) of the steps
    so far. A step uses the mean of the steps before it, so every micro-batch of the
    step sees the same d (TRL also folds in the current batch, which with
    micro-batches would take a second pass). Saved in the checkpoint."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def update(self, reward_sum: float, count: int) -> None:
        self.total += reward_sum
        self.count += count

    def state_dict(self) -> dict[str, float]:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.total, self.count = float(state["total"]), int(state["count"])


@dataclass(frozen=True)
class Terms:
    """A stage's checked loss terms."""

    weights: dict[str, float]  # term -> weight, in config order
    logps: str  # "sum" or "mean" for the pair losses other than ipo (ipo is always "mean")

    @property
    def pair_terms(self) -> list[str]:
        return [t for t in self.weights if t != SFT]

    def logps_of(self, term: str) -> str:
        return "mean" if term == "ipo" else self.logps


def check_terms(pref: Any, lora_enabled: bool, trainable: Any) -> Terms:
    """Validate ``stage.preference`` against the stage (called before any model work)."""
    key = "stage.preference"
    weights = {str(k): float(v) for k, v in dict(pref.terms).items() if float(v) != 0.0}
    unknown = sorted(set(weights) - {*PAIR_LOSSES, SFT})
    if unknown:
        raise ValueError(f"{key}.terms names {unknown}; terms are {list(PAIR_LOSSES)} and {SFT!r}")
    if not weights:
        raise ValueError(f"{key}.terms has no term with a non-zero weight")
    if any(w < 0 for w in weights.values()):
        raise ValueError(f"{key}.terms: weights must be positive, got {weights}")
    pair_terms = [t for t in weights if t != SFT]
    if pref.reference not in REFERENCE_KINDS:
        raise ValueError(f"{key}.reference={pref.reference!r}; expected one of {REFERENCE_KINDS}")
    if pref.reference == "none" and pair_terms:
        raise ValueError(
            f"{key}.reference=none, but {key}.terms has {pair_terms}, which compare the "
            "policy with a reference model; use reference copy, disabled_adapter or precomputed"
        )
    if not pair_terms:
        raise ValueError(f"{key}.terms has only {SFT!r}: that is a next_token stage")
    if pref.logps not in ("auto", "sum", "mean"):
        raise ValueError(f"{key}.logps={pref.logps!r}; expected auto, sum or mean")
    if "ipo" in pair_terms and pref.logps == "sum":
        raise ValueError(
            f"{key}.logps=sum with ipo in {key}.terms: IPO is defined on per-token mean "
            f"log-probs; set {key}.logps=auto"
        )
    if pref.beta <= 0:
        raise ValueError(f"{key}.beta must be positive, got {pref.beta}")
    e = pref.label_smoothing
    if "conservative" in pair_terms and not 0.0 < e < 0.5:
        raise ValueError(
            f"{key}.terms has conservative, which needs 0 < {key}.label_smoothing < 0.5"
        )
    if not 0.0 <= e < 0.5:
        raise ValueError(f"{key}.label_smoothing must be in [0, 0.5), got {e}")
    if pref.reference == "disabled_adapter":
        if not lora_enabled:
            raise ValueError(
                f"{key}.reference=disabled_adapter needs stage.lora.enabled=true (the reference "
                "is the policy with its LoRA adapters disabled)"
            )
        moving = [c for c in ("vision", "projector") if getattr(trainable, c)]
        if moving:
            raise ValueError(
                f"{key}.reference=disabled_adapter with stage.trainable."
                f"{'/'.join(moving)}=true: disabling the LM's adapters would not undo their "
                "training; freeze them or use reference=copy"
            )
    return Terms(weights, "sum" if pref.logps == "auto" else pref.logps)
