"""Named chat templates: each supervises exactly the assistant's text and its turn end,
and the generation prompt is the training render cut before the answer."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, PreTrainedTokenizerFast

from vlmtrain.config import ModelConfig
from vlmtrain.data.chat import render_messages, render_prompt
from vlmtrain.data.templates import TEMPLATES, detect_template
from vlmtrain.model.lm import load_tokenizer

SPECIALS = [
    "<pad>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<image>",
]
CHAT = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "<image>\nWhat colour is the circle?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "And the square?"},
    {"role": "assistant", "content": "blue"},
]


def _tokenizer(path, own_template: str | None = None) -> str:
    """A small byte-level BPE holding every family's special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = [m["content"] for m in CHAT] + ["USER: ASSISTANT: [INST] [/INST] A chat between"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(words * 2, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        chat_template=own_template,
    )
    hf.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_named_template_supervises_answers_and_turn_ends_only(name, tmp_path):
    tok = load_tokenizer(ModelConfig(tokenizer=_tokenizer(tmp_path / "tok")), name)
    ids, mask = render_messages(tok, CHAT)
    spans, current = [], []
    for token, m in zip(ids, mask, strict=True):
        if m:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    stop = TEMPLATES[name].stop_token or "</s>"
    assert len(spans) == 2
    for span, answer in zip(spans, ("red", "blue"), strict=True):
        text = tok.decode(span, skip_special_tokens=False)
        assert answer in text and text.strip().endswith(stop) and "?" not in text
    assert tok.eos_token == stop  # generation stops where the template ends a turn
    # The generation prompt is the training render cut right before the last answer.
    prompt = render_prompt(tok, CHAT[:-1])
    assert ids[: len(prompt)] == prompt and mask[len(prompt)] == 1


def test_family_detected_from_a_released_template(tmp_path):
    released = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    tok = load_tokenizer(ModelConfig(tokenizer=_tokenizer(tmp_path / "tok", released)))
    assert detect_template(tok) == "chatml" and "generation" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"


def test_template_of_another_family_and_unknown_names_are_refused(tmp_path):
    path = tmp_path / "tok"
    _tokenizer(path)
    hf = PreTrainedTokenizerFast.from_pretrained(path)
    plain = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(
            models.WordLevel({"<pad>": 0, "</s>": 1, "a": 2}, unk_token="a")
        ),
        pad_token="<pad>",
        eos_token="</s>",
    )
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"data.chat_template=llama3.*<\|start_header_id\|>"):
        load_tokenizer(ModelConfig(tokenizer=str(tmp_path / "plain")), "llama3")
    with pytest.raises(ValueError, match="neither a template name"):
        load_tokenizer(ModelConfig(tokenizer=str(path)), "qwen")
    assert hf.chat_template is None


def test_tokenizer_defaults_to_the_lm_directory_and_must_fit_it(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config

    lm = tmp_path / "lm"
    _tokenizer(lm)
    n = len(PreTrainedTokenizerFast.from_pretrained(lm))
    dims = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(LlamaConfig(vocab_size=n + 4, **dims)).save_pretrained(lm)
    cfg = ModelConfig()
    cfg.lm.path = str(lm)
    assert load_tokenizer(cfg, "chatml").name_or_path == str(lm)  # no model.tokenizer needed

    small = tmp_path / "small"
    LlamaForCausalLM(LlamaConfig(vocab_size=n - 3, **dims)).save_pretrained(small)
    cfg.lm.path, cfg.tokenizer = str(small), str(lm)
    with pytest.raises(ValueError, match=r"embedding rows: it is not this LM's tokenizer"):
        load_tokenizer(cfg, "chatml")
    other = tmp_path / "qwen"
    Qwen2Config(vocab_size=n + 4, **dims).save_pretrained(other)
    LlamaForCausalLM(LlamaConfig(vocab_size=n + 4, **dims)).save_pretrained(tmp_path / "llama")
    cfg.lm.path = str(tmp_path / "llama")
    _tokenizer(other)
    cfg.tokenizer = str(other)
    assert AutoConfig.from_pretrained(other).model_type == "qwen2"
    with pytest.raises(ValueError, match=r"belongs to a 'qwen2' model.*'llama'"):
        load_tokenizer(cfg, "chatml")
