"""The GRPO loss: group-normalized advantages and the clipped-ratio objective with a k3 KL
penalty, averaged the three published ways.

- ``grpo``: each completion's tokens averaged, then the completions (DeepSeekMath).
- ``dr_grpo``: summed over tokens and divided by a constant, completions x max new
  tokens (Dr. GRPO: no length bias); its advantages are not divided by the group's std.
- ``dapo``: every token of the batch weighs the same (DAPO's token-level loss).

``normalizer`` is over the whole step (all micro-batches and ranks), so splitting a
generation batch into micro-batches never changes the loss or the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def group_advantages(rewards: torch.Tensor, group: int, scale: bool) -> torch.Tensor:
    """(B*G,) rewards, groups of ``group`` consecutive rows -> (B*G,) advantages
    r - mean(group), divided by the group's (unbiased) std + 1e-4 when ``scale``."""
    r = rewards.view(-1, group)
    centred = r - r.mean(1, keepdim=True)
    if scale:
        centred = centred / (r.std(1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


@dataclass
class Normalizer:
    """The step's totals that the averaging divides by."""

    sequences: float  # completions in the step
    tokens: float  # completion tokens in the step
    max_new_tokens: int

    def divide(self, per_token: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
        """This micro-batch's share of the step's loss."""
        masked = per_token * mask
        if loss_type == "grpo":
            return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / self.sequences
        if loss_type == "dapo":
            return masked.sum() / self.tokens
        if loss_type == "dr_grpo":
            return masked.sum() / (self.sequences * self.max_new_tokens)
        raise ValueError(f"stage.grpo.loss_type={loss_type!r}; expected one of {LOSS_TYPES}")


def grpo_token_terms(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-token loss (minus the clipped surrogate, plus beta x k3 KL), the KL, and where
    the clip was active; all (N, T), to be masked and averaged by ``Normalizer``."""
    ratio = torch.exp(logps - old_logps)
    a = advantages[:, None]
    surrogate = torch.min(ratio * a, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * a)
    per_token = -surrogate
    kl = None
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        if beta:
            per_token = per_token + beta * kl
    clipped = ((ratio < 1 - epsilon_low) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))
    return per_token, kl, clipped
