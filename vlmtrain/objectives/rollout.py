"""Sampling inside training: N completions per prompt from the current policy, and the
training forward that scores them again.

``sample_completions`` encodes each prompt's images once, runs the prompt batch once,
then decodes N completions per prompt with the KV cache (the prompt's cache rows are
repeated, not recomputed). Each sampled token's log-prob is recorded under the
temperature-scaled distribution, the one the objective's ratio is defined on; top-p only
narrows what can be drawn. Sampling draws from a ``torch.Generator`` the caller seeds
(GRPO: from the seed, the generation batch's index and the rank), so a resumed run draws
exactly what the uninterrupted one did, with no sampler state in the checkpoint.

``completion_token_logps`` recomputes the same log-probs with the training forward over
the same tokens, left padding, positions and image features (test_grpo checks they
match what sampling recorded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from vlmtrain.model.vlm import VisionLanguageModel


@dataclass
class Rollout:
    """N completions of each of B prompts, rows ordered prompt-major (prompt i's samples
    are rows i*N .. i*N+N-1). Sequences are the left-padded prompt then the completion,
    padded after its end-of-turn token."""

    sequences: torch.Tensor  # (B*N, P+T) token ids
    attention_mask: torch.Tensor  # (B*N, P+T) 1 on prompt and completion tokens
    completion_mask: torch.Tensor  # (B*N, T) 1 on sampled tokens up to and with the eos
    logps: torch.Tensor  # (B*N, T) sampled tokens' log-probs at sampling time (0 past the end)
    prompt_length: int  # P
    n: int  # N

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(1)


def kv_cache_bytes(lm_cfg, length: int, sequences: int, bytes_per_value: int) -> float:
    """The KV cache of ``sequences`` generated to ``length`` tokens (keys and values of every
    layer), from the LM's config dimensions; for the plan's memory estimate."""
    heads = lm_cfg.num_key_value_heads or lm_cfg.num_attention_heads
    head_dim = lm_cfg.hidden_size // lm_cfg.num_attention_heads
    return 2.0 * lm_cfg.num_hidden_layers * heads * head_dim * length * sequences * bytes_per_value


def left_pad(prompts: list[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of any lengths -> (B, P) ids and attention mask, padded on the left."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = p
        mask[i, length - len(p) :] = 1
    return ids, mask


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def repeat_features(
    features: torch.Tensor | None, image_counts: torch.Tensor, n: int
) -> torch.Tensor | None:
    """(images, T, d) in prompt order -> each prompt's block of images repeated n times in a
    row, the order of the rollout's rows."""
    if features is None:
        return None
    starts = torch.cumsum(torch.cat([image_counts.new_zeros(1), image_counts]), 0).tolist()
    rows = [
        idx
        for i in range(len(image_counts))
        for _ in range(n)
        for idx in range(starts[i], starts[i + 1])
    ]
    return features[torch.tensor(rows, dtype=torch.long, device=features.device)]


def scaled_logps(logits: torch.Tensor, temperature: float, image_token_id: int) -> torch.Tensor:
    """Log-probs of the sampling distribution: logits over the temperature (1 when greedy),
    the image placeholder excluded (a completion holding one would have no image for it).
    Sampling and the training forward both use this one function."""
    logits = logits.float() / (temperature if temperature > 0 else 1.0)
    logits[..., image_token_id] = float("-inf")
    return torch.log_softmax(logits, -1)


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p`` (at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


@torch.no_grad()
def sample_completions(
    model: VisionLanguageModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None,
    image_counts: torch.Tensor,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
) -> Rollout:
    """``n`` completions of each left-padded prompt (temperature 0: greedy, log-probs at
    temperature 1). Images are encoded once per prompt; the prompt runs once and its KV
    cache is repeated for the n samples."""
    lm = model.language_model
    features = model.image_features(pixel_values) if pixel_values is not None else None
    embeds = model.embed(input_ids, None, features)
    cache = DynamicCache()
    out = lm(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=positions(attention_mask),
        past_key_values=cache,
        use_cache=True,
    )
    cache.batch_repeat_interleave(n)
    logits = out.logits[:, -1].float().repeat_interleave(n, 0)
    mask = attention_mask.repeat_interleave(n, 0)
    rows = mask.shape[0]
    alive = torch.ones(rows, dtype=torch.bool, device=mask.device)
    tokens, logps, kept = [], [], []
    for t in range(max_new_tokens):
        scaled = scaled_logps(logits, temperature, model.image_token_id)
        if temperature > 0:
            probs = _top_p_filter(scaled, top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            token = scaled.argmax(-1)
        token = torch.where(alive, token, torch.full_like(token, pad_token_id))
        tokens.append(token)
        logps.append(torch.where(alive, scaled.gather(1, token[:, None])[:, 0], 0.0))
        kept.append(alive.long())
        mask = torch.cat([mask, alive.long()[:, None]], 1)
        alive = alive & (token != eos_token_id)
        if not alive.any() or t == max_new_tokens - 1:
            break
        step = lm(
            inputs_embeds=lm.get_input_embeddings()(token[:, None]),
            attention_mask=mask,
            position_ids=positions(mask)[:, -1:],
            past_key_values=cache,
            use_cache=True,
        )
        logits = step.logits[:, -1].float()
    completion = torch.stack(tokens, 1)
    return Rollout(
        sequences=torch.cat([input_ids.repeat_interleave(n, 0), completion], 1),
        attention_mask=mask,
        completion_mask=torch.stack(kept, 1),
        logps=torch.stack(logps, 1),
        prompt_length=input_ids.shape[1],
        n=n,
    )


def completion_token_logps(
    model: VisionLanguageModel,
    rollout: Rollout,
    features: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """(B*N, T) log-probs of the rollout's completion tokens under ``model`` now (0 past
    each completion's end), by the training forward. ``features`` are the rows' image
    features (``repeat_features`` of the prompts'), so images are encoded once per prompt
    here too."""
    p, t = rollout.prompt_length, rollout.completion_mask.shape[1]
    predicts = torch.zeros_like(rollout.attention_mask, dtype=torch.bool)
    predicts[:, p - 1 : p + t - 1] = rollout.completion_mask.bool()  # position k predicts k+1
    logits = model(
        rollout.sequences,
        rollout.attention_mask,
        position_ids=positions(rollout.attention_mask),
        logits_at=predicts,
        image_features=features,
    )
    targets = rollout.completion_ids[rollout.completion_mask.bool()]
    token_logps = scaled_logps(logits, temperature, model.image_token_id)
    token_logps = token_logps.gather(1, targets[:, None])[:, 0]
    out = torch.zeros(rollout.completion_mask.shape, dtype=token_logps.dtype, device=logits.device)
    return out.masked_scatter(rollout.completion_mask.bool(), token_logps)
