"""Chat templating with assistant-only loss masks, straight from the tokenizer's template.

The mask comes from the template's ``{% generation %}`` blocks
(``return_assistant_tokens_mask``), never from re-tokenizing string pieces,
so what is supervised is exactly what the model sees.
"""

from __future__ import annotations

import re

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
_GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")


def has_generation_block(tokenizer: PreTrainedTokenizerBase) -> bool:
    template = tokenizer.chat_template
    return isinstance(template, str) and bool(_GENERATION_BLOCK.search(template))


def check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    from vlmtrain.data.templates import TEMPLATES

    names = ", ".join(TEMPLATES)
    if not tokenizer.chat_template:
        raise ValueError(
            f"the tokenizer has no chat template; set data.chat_template to one of {names} "
            "or a Jinja string with {% generation %} blocks"
        )
    if not has_generation_block(tokenizer):
        raise ValueError(
            "the tokenizer's chat template has no {% generation %} block around assistant "
            "messages, so assistant-only loss masks cannot be derived from it; set "
            f"data.chat_template to one of {names} or a Jinja string that marks them"
        )


def render_messages(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[list[int], list[int]]:
    """Token ids and the assistant mask (1 = supervised) of a conversation."""
    enc = tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    return list(enc["input_ids"]), list(enc["assistant_masks"])


def render_text(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[int]]:
    """Plain text for LM pretraining: every token and the closing eos are supervised."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids, [1] * len(ids)


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Ids of a conversation up to the assistant's turn (for generation)."""
    enc = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=True
    )
    return list(enc["input_ids"])


def labels_from_mask(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
