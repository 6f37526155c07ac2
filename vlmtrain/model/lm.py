"""Language model and tokenizer: any transformers causal LM, from a config or a local directory."""

from __future__ import annotations

import logging

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
from vlmtrain.data.chat import has_generation_block
from vlmtrain.data.templates import apply_template, detect_template


def load_tokenizer(cfg: ModelConfig, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer (``model.tokenizer``, by default the LM's own directory), install
    the chat template and add the image placeholder token."""
    source = cfg.tokenizer or cfg.lm.path
    if not source:
        raise ValueError(
            "model.tokenizer is not set and model.lm.path names no directory to take it from"
        )
    tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    if cfg.lm.path:
        check_tokenizer_fits(tok, source, cfg.lm.path)
    if chat_template:
        apply_template(tok, chat_template)
    elif not has_generation_block(tok) and (family := detect_template(tok)):
        # A released checkpoint's template marks no assistant spans: use its family's.
        apply_template(tok, family)
        logging.getLogger(__name__).info(
            "tokenizer at %s: its chat template marks no assistant spans; using the named "
            "template %r of its family (data.chat_template chooses another)",
            source,
            family,
        )
    if cfg.image_token not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [cfg.image_token]})
    if tok.pad_token_id is None:
        raise ValueError(
            f"tokenizer at {source!r} has no pad token; set one in its tokenizer_config.json"
        )
    if tok.eos_token_id is None:
        raise ValueError(
            f"tokenizer at {source!r} has no eos (end-of-turn) token; generation could not stop"
        )
    return tok


def check_tokenizer_fits(tok: PreTrainedTokenizerBase, source: str, lm_path: str) -> None:
    """A tokenizer of another model family, or with more tokens than the LM has embedding
    rows for, would train silently wrong; refuse it before any model is built."""
    lm_config = AutoConfig.from_pretrained(lm_path, local_files_only=True)
    if len(tok) > lm_config.vocab_size:
        raise ValueError(
            f"the tokenizer at {source!r} has {len(tok)} tokens but the LM at {lm_path!r} has "
            f"{lm_config.vocab_size} embedding rows: it is not this LM's tokenizer "
            "(model.tokenizer defaults to model.lm.path)"
        )
    try:  # a tokenizer directory that is a model directory names its family
        own_type = AutoConfig.from_pretrained(source, local_files_only=True).model_type
    except (OSError, ValueError):
        return
    if own_type != lm_config.model_type:
        raise ValueError(
            f"the tokenizer at {source!r} belongs to a {own_type!r} model, the LM at "
            f"{lm_path!r} is {lm_config.model_type!r}; set model.tokenizer to the LM's own"
        )


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
