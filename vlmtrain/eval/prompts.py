"""Eval samples and their prompts, built exactly as training builds its inputs.

The tokenizer's chat template renders the conversation up to the scored
answer, and each ``<image>`` placeholder is expanded to one token per image
patch by the training code's own ``_expand``, so an evaluation number measures
the model, not a mismatch between how it was trained and how it is asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from vlmtrain.data.chat import render_prompt
from vlmtrain.data.encode import _expand
from vlmtrain.data.samples import DataError, normalize, read_records


@dataclass
class EvalSample:
    id: str
    type: str
    question: str
    answer: str
    images: list[str]
    messages: list[dict[str, str]]  # the conversation up to (not including) the scored answer


def read_eval_samples(path: str | Path, limit: int | None = None) -> list[EvalSample]:
    """Samples with the reference answer and question type kept.

    ``load_samples`` normalizes records to the training schema and so drops the
    shapes-specific ``type``/``answer`` fields; the same ``normalize`` is used
    here so the conversation is parsed exactly as in training.
    """
    path = Path(path)
    records = read_records(path)
    if limit is not None:
        records = records[:limit]
    default_type = "caption" if path.name.startswith("caption") else "all"
    out = []
    for i, rec in enumerate(records):
        s = normalize(rec, i, str(path))
        msgs = s["messages"]
        last = max((k for k, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
        if last < 0:
            raise DataError(s["id"], str(path), "no assistant turn to score against")
        answer = rec.get("answer", msgs[last]["content"])
        user = [m["content"] for m in msgs[:last] if m["role"] == "user"]
        question = rec.get("question") or (user[-1].replace("<image>", "").strip() if user else "")
        # Multi-turn chat records list one type per turn; the scored turn is the last.
        qtype = rec.get("type") or (rec.get("types") or [default_type])[-1]
        out.append(EvalSample(s["id"], str(qtype), question, str(answer), s["images"], msgs[:last]))
    return out


def build_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    image_token_id: int,
    tokens_per_image: int | list[int],  # one count for all images, or one per image
    n_images: int,
    sample_id: str = "?",
    source: str = "?",
) -> list[int]:
    """Prompt ids ending in the assistant header, image placeholders expanded."""
    ids = render_prompt(tokenizer, messages)
    n_placeholders = ids.count(image_token_id)
    if n_placeholders != n_images:
        raise DataError(
            sample_id, source, f"{n_placeholders} image placeholders but {n_images} images"
        )
    ids, _ = _expand(ids, [0] * len(ids), image_token_id, tokens_per_image)
    return ids
