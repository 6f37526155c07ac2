"""The small byte-level BPE tokenizer and its ChatML template with assistant masks."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vlmtrain.data.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, train_tokenizer

CORPUS = [
    "What colour is the circle?",
    "red",
    "a large red square, a small blue circle and a small green triangle.",
    "question: how many shapes are there? answer: 2",
    "Is there an orange square?",
    "Where is the green circle relative to the purple square?",
] * 50
CHAT = [
    {"role": "user", "content": "What colour is the circle?"},
    {"role": "assistant", "content": "red"},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(CORPUS, out, vocab_size=400)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(tok_dir)


def masked_text(tok: PreTrainedTokenizerFast, messages: list[dict[str, str]]) -> str:
    enc = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert len(ids) == len(mask)
    return tok.decode([i for i, m in zip(ids, mask, strict=True) if m])


def test_round_trip(tok: PreTrainedTokenizerFast) -> None:
    for text in [CORPUS[2], "  two  spaces\nnew line", "unseen: Zebra ünïcode ✓ 42"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # Trained merges make in-domain text much shorter than its byte count.
    assert len(tok.encode(CORPUS[2])) < len(CORPUS[2].encode()) // 2


def test_returned_and_reloaded_agree(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    fresh = train_tokenizer(CORPUS, tmp_path, vocab_size=400)
    assert isinstance(fresh, PreTrainedTokenizerFast) and isinstance(tok, PreTrainedTokenizerFast)
    assert fresh.encode(CORPUS[2]) == tok.encode(CORPUS[2])
    assert len(fresh) == len(tok) <= 400
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|im_end|>"
    assert tok.bos_token is None and tok.unk_token is None
    assert tok.model_max_length == 4096
    assert tok.chat_template == CHAT_TEMPLATE


def test_deterministic(tmp_path: Path, tok_dir: Path) -> None:
    train_tokenizer(CORPUS, tmp_path, vocab_size=400)
    assert (tmp_path / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()


def test_special_tokens_are_single_ids(tok: PreTrainedTokenizerFast) -> None:
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == [0, 1, 2, 3]
    for t, i in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tok.encode(t, add_special_tokens=False) == [i]
    assert tok.pad_token_id == 0 and tok.eos_token_id == 3
    # The model assembly adds <image> itself; here it must be ordinary text.
    assert "<image>" not in tok.get_vocab()
    assert len(tok.encode("<image>", add_special_tokens=False)) > 1


def test_chat_template_text(tok: PreTrainedTokenizerFast) -> None:
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == (
        "<|im_start|>user\nWhat colour is the circle?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert (
        prompt == "<|im_start|>user\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\n"
    )
    sys_msg = [{"role": "system", "content": "Be brief."}, *CHAT]
    assert tok.apply_chat_template(sys_msg, tokenize=False).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    )


def test_assistant_mask(tok: PreTrainedTokenizerFast) -> None:
    assert masked_text(tok, CHAT) == "red<|im_end|>"
    multi = [*CHAT, {"role": "user", "content": "How many?"}, {"role": "assistant", "content": "2"}]
    assert masked_text(tok, multi) == "red<|im_end|>2<|im_end|>"
    # Token ids through the template equal tokenizing the rendered text.
    enc = tok.apply_chat_template(multi, tokenize=True, return_dict=True)
    rendered = tok.apply_chat_template(multi, tokenize=False)
    assert list(enc["input_ids"]) == tok.encode(rendered, add_special_tokens=False)


def test_numbers_read_digit_by_digit(tmp_path: Path) -> None:
    """A box's coordinates become one token per digit even when whole numbers are frequent
    in the corpus (each would otherwise be merged into a token of its own), the space
    before a single digit stays part of its token (" 2", as before), and text round-trips."""
    boxes = ["<box>(320,140),(570,390)</box>", "answer: 2", "<box>(320,320),(999,100)</box>"] * 200
    tok = train_tokenizer(CORPUS + boxes, tmp_path, vocab_size=400)
    text = "<box>(320,140),(570,390)</box> answer: 2"
    pieces = [tok.decode([i]) for i in tok(text)["input_ids"]]
    assert pieces[pieces.index(">(") + 1 : pieces.index(">(") + 5] == ["3", "2", "0", ","]
    assert " 2" in pieces and not any(len(p.strip()) > 1 and p.strip().isdigit() for p in pieces)
    assert tok.decode(tok(text)["input_ids"]) == text
