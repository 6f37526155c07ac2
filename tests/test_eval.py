"""Evaluation: prompts match training, exact-match scoring, batching invariance, the CLI."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from helpers import image_processor_for
from omegaconf import OmegaConf

from vlmtrain.data.chat import render_messages
from vlmtrain.data.encode import _expand
from vlmtrain.data.shapes import ANSWERS
from vlmtrain.eval import build_prompt, evaluate_split, predict, read_eval_samples
from vlmtrain.eval.cli import main as eval_main
from vlmtrain.model.lm import load_tokenizer
from vlmtrain.model.vision import VisionSpec
from vlmtrain.model.vlm import VisionLanguageModel

HEADER = "<|im_start|>assistant\n"


def tiny_model(cfg, seed: int = 0):
    # Built like a fresh stage builds it (train.build_model with every component
    # "fresh"), without depending on the training entry point's signature.
    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    torch.manual_seed(seed)
    return tokenizer, VisionLanguageModel.build(cfg.model, tokenizer).eval()


# ------------------------------------------------------------------------- (a) prompts
def test_prompt_is_training_input_up_to_the_answer(compose, shapes_root):
    cfg = compose()
    tok = load_tokenizer(cfg.model, cfg.data.chat_template)
    image_id = tok.convert_tokens_to_ids(cfg.model.image_token)
    tpi = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2
    samples = read_eval_samples(shapes_root / "vqa_test.json")
    assert {s.type for s in samples} == set(ANSWERS)
    for s in samples:
        prompt = build_prompt(tok, s.messages, image_id, tpi, len(s.images))
        text = tok.decode(prompt)
        assert text.endswith(HEADER)
        assert prompt.count(image_id) == tpi
        assert s.answer not in text.split(HEADER)[-1] and s.answer not in s.question
        # The prompt is exactly the training input cut before the answer.
        full, mask = render_messages(tok, [*s.messages, {"role": "assistant", "content": s.answer}])
        full, _ = _expand(full, mask, image_id, tpi)
        assert full[: len(prompt)] == prompt
        assert tok.decode(full[len(prompt) :]) == s.answer + "<|im_end|>\n"


# ------------------------------------------------------------------------- (b) scoring
class ScriptedModel:
    """Stands in for the VLM: answers from a script keyed by (image, prompt)."""

    def __init__(
        self, script: dict[tuple[str, tuple[int, ...]], list[int]], spec: VisionSpec, image_id: int
    ):
        self.script, self.vision_spec, self.image_token_id = script, spec, image_id
        self.token_downsample = 1  # one image token per patch, as with an MLP projector
        self.batch_sizes: list[int] = []

    def generate(
        self, input_ids, attention_mask, pixel_values, *, max_new_tokens, eos_token_id, pad_token_id
    ):
        self.batch_sizes.append(len(input_ids))
        # Left padding: every row ends in a real token, padding only at the start.
        assert bool(attention_mask[:, -1].all())
        assert bool((attention_mask.diff(dim=1) >= 0).all())
        rows = []
        for ids, mask, pixels in zip(input_ids, attention_mask, pixel_values, strict=True):
            rows.append(
                self.script[(_digest(pixels), tuple(ids[mask.bool()].tolist()))][:max_new_tokens]
            )
        width = max(map(len, rows))
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])


def _digest(pixels: torch.Tensor) -> str:
    return hashlib.sha1(pixels.contiguous().numpy().tobytes()).hexdigest()


def test_exact_match_scoring(compose, shapes_root):
    cfg = compose()
    tok = load_tokenizer(cfg.model, cfg.data.chat_template)
    images, spec = image_processor_for(cfg, shapes_root)
    samples = read_eval_samples(shapes_root / "vqa_test.json")
    image_id = tok.convert_tokens_to_ids(cfg.model.image_token)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    script, expected = {}, {}
    for k, s in enumerate(samples):
        pixels = images([images.load(p, s.id, "test") for p in s.images])[0]
        wrong = next(a for a in ANSWERS[s.type] if a != s.answer)
        # Right, right with text after end-of-turn, right with spaces and no
        # end-of-turn, a near miss ("yes." is not "yes"), and plainly wrong.
        outputs = [
            (enc(s.answer) + [tok.eos_token_id], True),
            (enc(s.answer) + [tok.eos_token_id] + enc(" extra"), True),
            (enc(" " + s.answer + " "), True),
            (enc(s.answer + "."), False),
            (enc(wrong) + [tok.eos_token_id], False),
        ]
        ids, ok = outputs[k % len(outputs)]
        prompt = build_prompt(tok, s.messages, image_id, images.tokens_per_image(pixels[None]), 1)
        script[(_digest(pixels), tuple(prompt))] = ids
        expected.setdefault(s.type, []).append(ok)
    model = ScriptedModel(script, spec, image_id)
    res = evaluate_split(
        model, tok, images, shapes_root / "vqa_test.json", shapes_root, batch_size=16
    )

    assert max(model.batch_sizes) == 16 and sum(model.batch_sizes) == len(samples)
    flat = [ok for oks in expected.values() for ok in oks]
    assert res["overall"] == {"accuracy": sum(flat) / len(flat), "n": len(samples)}
    assert set(res["per_type"]) == set(expected)
    for qtype, oks in expected.items():
        assert res["per_type"][qtype]["accuracy"] == sum(oks) / len(oks)
        assert res["per_type"][qtype]["n"] == len(oks)
    chance = {t: row["chance"] for t, row in res["per_type"].items()}
    assert chance == pytest.approx(
        {"colour": 1 / 6, "shape": 1 / 3, "count": 1 / 3, "exist": 1 / 2, "position": 1 / 4}
    )
    ex = res["examples"]
    assert (
        len(ex) == 5
        and ex[0]["answer"] == samples[0].answer
        and ex[0]["prediction"] == samples[0].answer
    )


# --------------------------------------------------------------- (c) batching invariance
def test_left_padded_batches_match_one_by_one(compose, shapes_root):
    cfg = compose()
    tok, model = tiny_model(cfg, seed=1)
    with torch.no_grad():  # sharper logits than at init, so predictions differ between samples
        for p in model.language_model.parameters():
            p.mul_(4)
    images, _ = image_processor_for(cfg, shapes_root)
    # Multi-turn chats have prompts of many lengths, so batches need real padding.
    samples = read_eval_samples(shapes_root / "chat_test.json", 6) + read_eval_samples(
        shapes_root / "vqa_test.json", 6
    )
    tpi = model.vision_spec.tokens_per_image
    lengths = [len(build_prompt(tok, s.messages, model.image_token_id, tpi, 1)) for s in samples]
    assert max(lengths) - min(lengths) > 10
    one = predict(model, tok, images, samples, batch_size=1, max_new_tokens=6)
    batched = predict(model, tok, images, samples, batch_size=12, max_new_tokens=6)
    assert len(set(one)) > 1, "a model that says the same thing everywhere tests nothing"
    assert batched == one


# ---------------------------------------------------------------------------- (d) CLI
def test_cli_writes_json_and_markdown(compose, shapes_root, tmp_path, capsys):
    from vlmtrain.artifacts import save_artifact

    cfg = compose()
    tok, model = tiny_model(cfg)
    artifact = tmp_path / "run" / "sft" / "artifact"
    save_artifact(
        model, tok, artifact, {"config": OmegaConf.to_container(cfg, resolve=True), "stage": "x"}
    )

    assert eval_main([str(artifact), "--data-root", str(shapes_root), "--limit", "6"]) == 0
    out_dir = tmp_path / "run" / "sft" / "eval-cli"  # the default: next to the artifact
    results = json.loads((out_dir / "eval.json").read_text())
    assert set(results) == {"test", "caption_test", "test_unseen", "caption_test_unseen"} | {
        "preference_test",  # held-out pairs (pref_test.json; test_unseen has none)
        "hallucination_test",
        "hallucination_test_unseen",
    }
    assert results["preference_test"]["overall"]["n"] == 6
    assert "## Caption hallucination" in (out_dir / "eval.md").read_text()
    acc = results["test"]["overall"]["accuracy"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0 and results["test"]["overall"]["n"] == 6
    assert results["caption_test"]["per_type"]["caption"]["chance"] is None
    md = (out_dir / "eval.md").read_text()
    assert (
        "| split | type | accuracy | chance | n |" in md and "| test_unseen | **overall** |" in md
    )
    assert "| split | type | accuracy | chance | n |" in capsys.readouterr().out

    with pytest.raises(FileNotFoundError, match="nope"):
        eval_main([str(artifact), "--data-root", str(shapes_root), "--splits", "nope"])
