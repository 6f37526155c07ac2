"""Small byte-level BPE tokenizer for the generated datasets.

A tokenizer trained on the generated world keeps the vocabulary tiny (fast
embedding/softmax for tiny models) while still being a regular
`transformers.PreTrainedTokenizerFast` that `AutoTokenizer` can reload offline.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from vlmtrain.data.templates import CHATML

SPECIAL_TOKENS: list[str] = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML (vlmtrain.data.templates): its {% generation %} block marks exactly the tokens
# the model must learn to produce (assistant content + its end-of-turn).
CHAT_TEMPLATE: str = CHATML

MODEL_MAX_LENGTH = 4096


def train_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1000
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`, save it to `out_dir` and return it."""
    # Add the chat-template role lines so "assistant\n" etc. get merges of their own.
    corpus = list(texts)
    corpus.extend(["system\n", "user\n", "assistant\n"])

    tok = Tokenizer(models.BPE())
    # No prefix space: prompts start mid-template, right after "<|im_start|>user\n".
    # One token per digit (with its leading space, as GPT-2's " 3"), as Qwen2's and LLaMA's
    # tokenizers split numbers: a box corner "(320,140)" reads 3-2-0, so nearby coordinates
    # share their leading digits instead of being unrelated whole-number tokens that each
    # need examples of their own. Text without multi-digit numbers tokenizes as before.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" ?\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps char offsets exact, which the assistant mask relies on.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # Full byte alphabet so any unseen character still encodes (no unk token).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token=None,
        unk_token=None,
        model_max_length=MODEL_MAX_LENGTH,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return hf
