"""Language model and tokenizer: any transformers causal LM, from a config or a local directory."""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from vlmtrain.config import LMConfig, ModelConfig


def load_tokenizer(cfg: ModelConfig, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer from a local directory and add the image placeholder token."""
    tok = AutoTokenizer.from_pretrained(cfg.tokenizer, local_files_only=True)
    if chat_template:
        tok.chat_template = chat_template
    if cfg.image_token not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [cfg.image_token]})
    if tok.pad_token_id is None:
        raise ValueError(
            f"tokenizer at {cfg.tokenizer!r} has no pad token; set one in its tokenizer_config.json"
        )
    if tok.eos_token_id is None:
        raise ValueError(
            f"tokenizer at {cfg.tokenizer!r} has no eos (end-of-turn) token; generation could not stop"
        )
    return tok


def lm_config_from_dims(cfg: LMConfig, vocab_size: int):
    return AutoConfig.for_model(
        cfg.type,
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        **dict(cfg.extra),
    )


def build_lm(
    cfg: LMConfig,
    vocab_size: int,
    *,
    device: str | torch.device | None = None,
    config: PretrainedConfig | None = None,
) -> PreTrainedModel:
    """Build (random init) or load the LM, then grow its embeddings to ``vocab_size``.

    On the meta device (planning), a pretrained path contributes only its config; with
    ``config`` (an LM an artifact stored), that architecture is built."""
    if config is not None:
        with torch.device(device or "cpu"):
            lm = AutoModelForCausalLM.from_config(config)
    elif cfg.path and str(device) != "meta":
        lm = AutoModelForCausalLM.from_pretrained(cfg.path, local_files_only=True)
    else:
        config = (
            AutoConfig.from_pretrained(cfg.path, local_files_only=True)
            if cfg.path
            else lm_config_from_dims(cfg, vocab_size)
        )
        with torch.device(device or "cpu"):
            lm = AutoModelForCausalLM.from_config(config)
    if lm.get_input_embeddings().num_embeddings < vocab_size:
        # New rows start at the mean of the old ones (transformers' default), not at noise.
        lm.resize_token_embeddings(vocab_size)
    return lm
