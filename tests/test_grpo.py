"""GRPO: sampling inside training, rewards, advantages and the loss by hand."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import trained_model
from omegaconf import OmegaConf

from vlmtrain.data.encode import SampleEncoder
from vlmtrain.data.images import ImageProcessor
from vlmtrain.data.prompts import PromptEncoder, collate_prompts, load_prompts
from vlmtrain.model.vision import build_image_processor
from vlmtrain.objectives.grpo_loss import Normalizer, group_advantages, grpo_token_terms
from vlmtrain.objectives.rewards import exact_match, final_answer, resolve_rewards
from vlmtrain.objectives.rollout import completion_token_logps, repeat_features, sample_completions


@pytest.fixture(scope="module")
def policy(shapes_root, tmp_path_factory):
    from conftest import REPO
    from hydra import compose, initialize_config_dir

    from vlmtrain.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"data.root={shapes_root}", "stage=grpo"])
    torch.set_num_threads(1)
    model, tokenizer = trained_model(cfg, steps=6)
    processor = build_image_processor(cfg.model.vision, model.vision_spec)
    images = ImageProcessor(
        processor, model.vision_spec.patch_size, shapes_root, model.token_downsample
    )
    encoder = PromptEncoder(SampleEncoder(tokenizer, images, cfg.model.image_token, 128))
    prompts = load_prompts(shapes_root / "vqa_train.json")
    batch = collate_prompts([encoder(prompts[i]) for i in range(3)], tokenizer.pad_token_id)
    return model, tokenizer, batch


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_logps_match_the_training_forward(policy, temperature, top_p):
    """Prompts of different lengths (left padding), 4 samples each with the KV cache: the
    log-probs the training forward gives the sampled tokens are those recorded."""
    model, tokenizer, batch = policy
    gen = torch.Generator().manual_seed(0)
    rollout = sample_completions(
        model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
        batch["image_counts"], n=4, max_new_tokens=6, temperature=temperature, top_p=top_p,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, generator=gen,
    )  # fmt: skip
    assert rollout.sequences.shape[0] == 12 and rollout.completion_mask.sum() > 12
    features = repeat_features(
        model.image_features(batch["pixel_values"]), batch["image_counts"], 4
    )
    with torch.no_grad():
        again = completion_token_logps(model, rollout, features, temperature)
    mask = rollout.completion_mask.bool()
    assert torch.allclose(again[mask], rollout.logps[mask], atol=1e-4)
    assert (rollout.logps[~mask] == 0).all()
    # The same generator seed samples the same completions (exact resume needs no state).
    same = sample_completions(
        model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
        batch["image_counts"], n=4, max_new_tokens=6, temperature=temperature, top_p=top_p,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert torch.equal(same.sequences, rollout.sequences)


def test_rewards_read_the_final_answer():
    assert final_answer("red circle at 3,4; blue square at 9,4. Answer: Left.") == "left"
    assert final_answer(" left ") == "left"
    assert exact_match(["x. answer: left", "right", "answer: above"], ["left"] * 3) == [1, 0, 0]
    cfg = OmegaConf.create(
        {"rewards": {"format": 0.5, "math.fsum": 1.0}, "answer_marker": "answer:",
         "format_pattern": r".+answer:\s*\S.*"}
    )  # fmt: skip
    rewards = resolve_rewards(cfg)
    assert rewards["format"][0](["a b. answer: left", "left"], ["left"] * 2) == [1.0, 0.0]
    with pytest.raises(ValueError, match="stage.grpo.rewards.no_such.module"):
        resolve_rewards(OmegaConf.create({**cfg, "rewards": {"no_such.module": 1.0}}))


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0])
    adv = group_advantages(r, 3, scale=True)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    assert torch.allclose(adv[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]) / (std + 1e-4))
    assert torch.equal(adv[3:], torch.zeros(3)), "a group of equal rewards carries no signal"
    assert torch.allclose(group_advantages(r, 3, scale=False)[:3], torch.tensor([2, -1, -1]) / 3)


def _case():
    """Two completions of lengths 2 and 1 (T = 3), policy moved from the old policy."""
    old = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    new = torch.tensor([[-0.5, -2.1, 0.0], [-0.9, 0.0, 0.0]])
    ref = torch.tensor([[-1.2, -1.8, 0.0], [-0.6, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    return new, old, ref, mask, adv


def _by_hand(beta, eps):
    """Per-token terms written out: -min(r A, clip(r) A) + beta (exp(d) - d - 1)."""
    new, old, ref, _, adv = _case()
    out = {}
    for i, j in ((0, 0), (0, 1), (1, 0)):
        r = math.exp(new[i, j] - old[i, j])
        a = float(adv[i])
        surrogate = min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
        d = float(ref[i, j] - new[i, j])
        out[i, j] = -surrogate + beta * (math.exp(d) - d - 1)
    return out


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_loss_matches_a_hand_computation(loss_type):
    new, old, ref, mask, adv = _case()
    beta, eps = 0.04, 0.2
    t = _by_hand(beta, eps)
    per_token, kl, clipped = grpo_token_terms(
        new, old, ref, adv, beta=beta, epsilon_low=eps, epsilon_high=eps
    )
    norm = Normalizer(sequences=2, tokens=3, max_new_tokens=3)
    loss = float(norm.divide(per_token, mask, loss_type))
    want = {
        "grpo": ((t[0, 0] + t[0, 1]) / 2 + t[1, 0]) / 2,
        "dapo": (t[0, 0] + t[0, 1] + t[1, 0]) / 3,
        "dr_grpo": (t[0, 0] + t[0, 1] + t[1, 0]) / (2 * 3),
    }[loss_type]
    assert loss == pytest.approx(want, rel=1e-5)
    # ratio e^0.5 > 1.2 with A > 0 is clipped; e^-0.4 < 0.8 with A < 0 is clipped too.
    assert clipped.tolist() == [[True, False, False], [True, False, False]]
    # Split into two micro-batches, the step's loss is the same sum.
    halves = sum(
        float(norm.divide(per_token[k : k + 1], mask[k : k + 1], loss_type)) for k in (0, 1)
    )
    assert halves == pytest.approx(loss, rel=1e-6)


def test_dapo_clip_higher_is_asymmetric():
    new, old, ref, mask, adv = _case()
    _, _, clipped = grpo_token_terms(
        new, old, None, adv, beta=0.0, epsilon_low=0.2, epsilon_high=0.7
    )
    assert clipped.tolist()[0][0] is False  # e^0.5 = 1.65 < 1.7
