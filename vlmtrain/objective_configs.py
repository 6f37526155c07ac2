"""Settings of the objectives that need their own section of a stage (``stage.preference``,
``stage.aim``, ``stage.grpo``, ``stage.generate``); part of the schema in vlmtrain.config."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PreferenceConfig:
    """objective=preference: weighted loss terms against a reference model
    (vlmtrain.objectives.preference). MPO: terms {sigmoid: 0.8, bco_pair: 0.2, sft: 1.0}."""

    terms: dict[str, float] = field(default_factory=lambda: {"sigmoid": 1.0})
    beta: float = 0.1
    label_smoothing: float = 0.0  # e of conservative (and optionally sigmoid) / robust DPO
    # Log-probs of a completion: summed over its tokens ("auto": per-token mean for ipo only).
    logps: str = "auto"
    # copy (frozen copy of the starting weights) | disabled_adapter (LoRA policy with its
    # adapters off) | precomputed (cached on disk before training) | none (sft term only)
    reference: str = "copy"


@dataclass
class AimConfig:
    """objective=aim (AIMv2, vlmtrain.objectives.aim): the causal multimodal decoder that
    reads the prefix-attention tower, and the loss L_text + alpha * L_image."""

    decoder_hidden_size: int = 64
    decoder_layers: int = 2
    decoder_heads: int = 4
    decoder_intermediate_size: int | None = None  # None: SwiGLU's 8/3 x width, rounded up to 8
    alpha: float = 0.4  # weight of the normalized-pixel regression loss
    caption_max_tokens: int = 77  # captions are cut here (the paper's 77)
    # Random-resized-crop augmentation of training images: the range of the crop's share of
    # the image area, e.g. [0.4, 1.0]; null turns it off (validation never crops). Off for
    # the shapes world, whose captions name positions a crop would falsify.
    crop_scale: list[float] | None = None


@dataclass
class GrpoConfig:
    """objective=grpo (vlmtrain.objectives.grpo): sample a group of completions per prompt
    from the current policy, score them with verifiable rewards, and optimize the clipped
    ratio objective on group-normalized advantages with a KL penalty to a reference."""

    num_generations: int = 8  # G, completions per prompt
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    # Reward name (exact_match, format, or a dotted path to a callable) -> weight.
    rewards: dict[str, float] = field(default_factory=lambda: {"exact_match": 1.0})
    # The final answer follows the last marker (the whole text when there is none).
    answer_marker: str = "answer:"
    # The format reward: the whole completion must match (reasoning, then the answer).
    format_pattern: str = r".+answer:\s*\S.*"
    loss_type: str = "grpo"  # grpo | dr_grpo | dapo (token-level)
    # Divide advantages by the group's std; null: yes, except for dr_grpo.
    scale_rewards: bool | None = None
    beta: float = 0.04  # KL penalty (k3 estimator); 0 in DAPO
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2  # DAPO's clip-higher: 0.28
    iterations: int = 1  # optimizer steps per generation batch (mu)
    # copy | disabled_adapter (LoRA) | none (needs beta=0); as in the preference stage
    reference: str = "copy"


@dataclass
class GenerateConfig:
    """objective=generate (vlmtrain.objectives.generate): sample completions of each prompt,
    score each by its agreement with the others (minimum Bayes risk), and write them as a
    data set later stages read (``from:<stage>/sft.jsonl`` or ``from:<stage>/pref.jsonl``)."""

    num_samples: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    # exact (final answers equal, for short answers) | token_f1 (word-overlap F1, for long
    # ones) | a dotted path to a callable (a, b) -> similarity in [0, 1]
    similarity: str = "exact"
    answer_marker: str = "answer:"
    # sft.jsonl keeps a prompt only when its best sample agrees at least this much with the
    # others (0: every prompt); samples.jsonl keeps every prompt.
    min_consistency: float = 0.5
