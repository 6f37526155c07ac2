"""Named chat templates with ``{% generation %}`` blocks for the common LM families.

Released checkpoints ship chat templates without generation blocks, so transformers
cannot derive assistant-only loss masks from them. ``data.chat_template`` takes one of
the names below (or a Jinja string of one's own); when it is unset and the tokenizer's
own template has no generation block, the family is detected from the special tokens
the template uses, where those are unambiguous.

Each block covers what the model must learn to produce: the assistant's text and the
token that ends its turn, which is also where generation stops (``stop_token``).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class NamedTemplate:
    jinja: str
    # Tokens the template writes literally: each must be one token of the vocabulary.
    special_tokens: tuple[str, ...]
    # The end of an assistant turn: generation stops there. None: the tokenizer's eos.
    stop_token: str | None
    # A template marker that identifies the family in a tokenizer's own template.
    marker: str | None


def _system_first_user(render_user: str) -> str:
    """Families without a system role (Mistral, Gemma) fold it into the first user turn."""
    return (
        "{%- set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' -%}"
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{%- set content = (system + '\\n\\n' + message['content']) "
        "if (loop.first and system) else message['content'] -%}" + render_user
    )


CHATML = (  # Qwen 1.5-3, Yi, InternLM2 and the tiny recipe's tokenizer
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- generation -%}{{ message['content'] + '<|im_end|>' }}{%- endgeneration -%}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

LLAMA3 = (
    "{{- bos_token or '' -}}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{ message['content'] | trim + '<|eot_id|>' }}{%- endgeneration -%}"
    "{%- else -%}{{ message['content'] | trim + '<|eot_id|>' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif -%}"
)

# LLaVA-1.5's conv_vicuna_v1: "<system> USER: <q> ASSISTANT: <a></s>USER: ...".
VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
VICUNA_V1 = (
    "{{- bos_token or '' -}}"
    "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] }}"
    "{%- else -%}{{ '" + VICUNA_V1_SYSTEM.replace("'", "\\'") + "' }}{%- endif -%}"
    "{{ ' ' }}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' + message['content'] + ' ' }}"
    "{%- else -%}{{ 'ASSISTANT:' }}"
    "{%- generation -%}{{ ' ' + message['content'] + eos_token }}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

MISTRAL = (  # Mistral / Mixtral instruct, v0.1-v0.3 layout
    "{{- bos_token or '' -}}"
    + _system_first_user(
        "{%- if message['role'] == 'user' -%}{{ '[INST] ' + content + ' [/INST]' }}"
        "{%- else -%}"
        "{%- generation -%}{{ ' ' + content + eos_token }}{%- endgeneration -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )
)

GEMMA = (  # Gemma 1-3: the assistant's role is "model"
    "{{- bos_token or '' -}}"
    + _system_first_user(
        "{%- if message['role'] == 'user' -%}"
        "{{ '<start_of_turn>user\\n' + content + '<end_of_turn>\\n' }}"
        "{%- else -%}{{ '<start_of_turn>model\\n' }}"
        "{%- generation -%}{{ content + '<end_of_turn>' }}{%- endgeneration -%}{{ '\\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )
    + "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

TEMPLATES: dict[str, NamedTemplate] = {
    "chatml": NamedTemplate(CHATML, ("<|im_start|>", "<|im_end|>"), "<|im_end|>", "<|im_start|>"),
    "llama3": NamedTemplate(
        LLAMA3,
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|eot_id|>",
        "<|start_header_id|>",
    ),
    "vicuna_v1": NamedTemplate(VICUNA_V1, (), None, None),  # no template of its own to detect
    "mistral": NamedTemplate(MISTRAL, (), None, "[INST]"),
    "gemma": NamedTemplate(
        GEMMA, ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>", "<start_of_turn>"
    ),
}


def detect_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The family of the tokenizer's own chat template, by the markers it writes."""
    own = tokenizer.chat_template
    if not isinstance(own, str):
        return None
    found = [name for name, t in TEMPLATES.items() if t.marker and t.marker in own]
    return found[0] if len(found) == 1 else None


def apply_template(tokenizer: PreTrainedTokenizerBase, spec: str) -> str:
    """Install a named template (checking its special tokens and setting the turn-end
    token as eos, where generation stops) or a Jinja string; returns what was applied."""
    if spec not in TEMPLATES:
        if "{%" not in spec and "{{" not in spec:
            raise ValueError(
                f"data.chat_template={spec!r} is neither a template name "
                f"({', '.join(TEMPLATES)}) nor a Jinja string"
            )
        tokenizer.chat_template = spec
        return "custom"
    template = TEMPLATES[spec]
    vocab = tokenizer.get_vocab()
    missing = [t for t in template.special_tokens if t not in vocab]
    if missing:
        raise ValueError(
            f"data.chat_template={spec}: the tokenizer has no token {', '.join(missing)}, so "
            f"it is not a {spec} tokenizer; choose the template of its family"
        )
    tokenizer.chat_template = template.jinja
    if template.stop_token:
        tokenizer.eos_token = template.stop_token
    return spec
