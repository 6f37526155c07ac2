"""AIMv2 pieces: the prefix mask in real towers, the regression targets, the losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlmtrain.config import AimConfig, VisionConfig
from vlmtrain.data.chat import IGNORE_INDEX
from vlmtrain.model.aim import (
    AimDecoder,
    image_loss_sum,
    normalize_patches,
    patchify,
    prefix_attention_mask,
    sample_prefix_lengths,
    text_loss_sum,
)
from vlmtrain.model.vision import build_vision_tower


def reference_allowed(m: int, n: int) -> torch.Tensor:
    """The rule spelled out: query i sees key j iff j <= i or j < M."""
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            out[i, j] = j <= i or j < m
    return out


def test_prefix_mask_matches_the_rule_with_and_without_class_token():
    n = 6
    lengths = torch.tensor([1, 3, 5])
    mask = prefix_attention_mask(lengths, n)
    assert mask.shape == (3, 1, n, n)
    for b, m in enumerate(lengths.tolist()):
        assert torch.equal(mask[b, 0] == 0, reference_allowed(m, n))
    # CLIP: the class token leads and belongs to every prefix.
    with_cls = prefix_attention_mask(lengths, n, class_token=True)
    for b, m in enumerate(lengths.tolist()):
        allowed = with_cls[b, 0] == 0
        assert allowed[:, 0].all(), "every position sees the class token"
        assert torch.equal(allowed[0, 1:], torch.arange(n) < m), "it sees the prefix only"
        assert torch.equal(allowed[1:, 1:], reference_allowed(m, n))


def test_prefix_lengths_cover_one_to_patches_minus_one():
    g = torch.Generator().manual_seed(0)
    drawn = sample_prefix_lengths(4000, 5, g)
    assert set(drawn.tolist()) == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="at least 2 patches"):
        sample_prefix_lengths(1, 1)


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_tower_with_prefix_mask_ignores_later_patches(kind):
    """Perturb one patch: under the mask, the features of earlier patches change only when
    the perturbed patch is in the prefix; without it (later stages) they always change."""
    torch.manual_seed(0)
    cfg = VisionConfig(type=kind, image_size=32, patch_size=8, hidden_size=32, intermediate_size=64)
    tower = build_vision_tower(cfg).eval()
    spec = tower.spec()
    n, m = spec.tokens_per_image, 5
    mask = prefix_attention_mask(torch.tensor([m]), n, spec.has_class_token)
    x = torch.randn(1, 3, 32, 32)

    def perturbed(patch: int) -> torch.Tensor:
        y = x.clone()
        r, c = divmod(patch, 32 // 8)
        y[:, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] += 1.0
        return y

    with torch.no_grad():
        base = tower(x, attention_mask=mask)
        later = tower(perturbed(9), attention_mask=mask)  # 9 >= M: not in the prefix
        in_prefix = tower(perturbed(3), attention_mask=mask)
        full, full_later = tower(x), tower(perturbed(9))
    assert torch.equal(later[:, :9], base[:, :9]), "a patch saw a later non-prefix patch"
    assert not torch.allclose(later[:, 9:], base[:, 9:])
    assert (in_prefix[:, :3] - base[:, :3]).abs().amax() > 1e-4, "prefix is bidirectional"
    assert (full_later[:, :9] - full[:, :9]).abs().amax() > 1e-4, "no mask: bidirectional"


def test_patchify_order_is_the_towers_patch_order():
    """Changing the pixels of patchify's patch k changes the patch embedding at token k only."""
    torch.manual_seed(0)
    tower = build_vision_tower(VisionConfig(image_size=32, patch_size=8, hidden_size=32))
    embed = tower.model.embeddings.patch_embedding
    x = torch.randn(1, 3, 32, 32)
    patches = patchify(x, 8)
    assert patches.shape == (1, 16, 192)
    for k in (0, 1, 4, 11):
        y = patches.clone()
        y[:, k] += 1.0
        # Back to an image: invert patchify by its own layout.
        image = y.reshape(1, 4, 4, 3, 8, 8).permute(0, 3, 1, 4, 2, 5).reshape(1, 3, 32, 32)
        r, c = divmod(k, 4)
        assert torch.equal(
            image[0, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8], y[0, k].reshape(3, 8, 8)
        )
        changed = (embed(image) - embed(x)).flatten(2).transpose(1, 2).abs().sum(-1)[0] > 0
        assert changed.nonzero().flatten().tolist() == [k]


def test_patch_normalization_by_hand():
    patch = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]])
    mean = 3.0
    var = ((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 4  # 3.5, the biased variance
    want = torch.tensor([1.0, 2.0, 3.0, 6.0]).sub(mean).div((var + 1e-6) ** 0.5)
    assert torch.allclose(normalize_patches(patch)[0, 0], want)
    flat = torch.full((1, 1, 4), 5.0)
    assert torch.equal(normalize_patches(flat), torch.zeros(1, 1, 4)), "flat patch: zeros, no NaN"


def test_image_loss_targets_the_next_patch_after_the_prefix_only():
    torch.manual_seed(0)
    p, n = 2, 4  # a 4x4 image: a 2x2 grid of 2x2 patches
    pixels = torch.randn(2, 3, 4, 4, requires_grad=True)
    targets = normalize_patches(patchify(pixels.detach(), p))
    lengths = torch.tensor([1, 2])
    # Position i predicting patch i+1 exactly: zero loss; predicting patch i does not.
    shifted = torch.cat([targets[:, 1:], torch.zeros(2, 1, 12)], 1)
    loss, count = image_loss_sum(shifted, pixels, lengths, p)
    assert loss.item() == pytest.approx(0.0, abs=1e-9)
    assert count == ((n - 1) + (n - 2)) * 12  # patches 1..3 and 2..3
    same, _ = image_loss_sum(targets, pixels, lengths, p)
    want = sum(
        ((targets[b, i - 1] - targets[b, i]) ** 2).sum()
        for b, m in ((0, 1), (1, 2))
        for i in range(m, n)
    )
    assert same.item() == pytest.approx(want.item(), rel=1e-5)
    # The gradient reaches no prefix patch's pixels (their targets are not used).
    predicted = torch.randn(2, n, 12)
    loss, _ = image_loss_sum(predicted, pixels, lengths, p)
    loss.backward()
    grads = patchify(pixels.grad, p).abs().sum(-1)
    assert grads[0, 0] == 0 and (grads[0, 1:] > 0).all()
    assert (grads[1, :2] == 0).all() and (grads[1, 2:] > 0).all()


def test_text_loss_supervises_caption_positions_only():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[IGNORE_INDEX, 5, 2, IGNORE_INDEX]])  # BOS, two tokens, padding
    total, count = text_loss_sum(logits, labels)
    want = F.cross_entropy(logits[0, :2], torch.tensor([5, 2]), reduction="sum")
    assert count == 2 and total.item() == pytest.approx(want.item(), rel=1e-6)


def test_decoder_is_causal_over_image_then_caption():
    torch.manual_seed(0)
    decoder = AimDecoder(AimConfig(decoder_hidden_size=32), 16, 12, 20, 32).eval()
    features = torch.randn(1, 4, 16)
    ids, mask = torch.tensor([[0, 3, 4]]), torch.ones(1, 3, dtype=torch.long)
    pixels, logits = decoder(features, ids, mask)
    assert pixels.shape == (1, 4, 12) and logits.shape == (1, 3, 20)
    later = features.clone()
    later[:, 2] += 1.0
    pixels2, logits2 = decoder(later, torch.tensor([[9, 3, 5]]), mask)
    assert torch.equal(pixels2[:, :2], pixels[:, :2]), "an image position saw a later one"
    assert not torch.allclose(logits2[:, 0], logits[:, 0]), "the caption sees the image"
    # The BOS is the decoder's own embedding: the id at position 0 is never read.
    _, logits3 = decoder(features, torch.tensor([[9, 3, 4]]), mask)
    assert torch.equal(logits3, logits)


def test_caption_encoder_puts_bos_then_the_caption_and_checks_samples(compose, shapes_root):
    from helpers import image_processor_for

    from vlmtrain.data.samples import DataError, load_samples
    from vlmtrain.model.lm import load_tokenizer
    from vlmtrain.objectives.aim import CaptionEncoder

    cfg = compose("stage=aim")
    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    images, spec = image_processor_for(cfg, shapes_root)
    sample = load_samples(shapes_root / "caption_train.json")[0]
    caption = sample["messages"][-1]["content"]
    out = CaptionEncoder(tokenizer, images, 77)(sample)
    assert out["pixel_values"].shape == (1, 3, spec.image_size, spec.image_size)
    assert out["labels"][0] == IGNORE_INDEX, "the BOS is input only"
    assert torch.equal(out["labels"][1:], out["input_ids"][1:])
    assert tokenizer.decode(out["input_ids"][1:-1]) == caption
    assert out["input_ids"][-1] == tokenizer.eos_token_id and not out["truncated"]
    cut = CaptionEncoder(tokenizer, images, 3)(sample)
    assert len(cut["input_ids"]) == 4 and cut["truncated"]
    with pytest.raises(DataError, match="one image"):
        CaptionEncoder(tokenizer, images, 77)({**sample, "images": []})


def test_random_resized_crop_is_seeded_and_keeps_the_full_image_at_scale_one():
    from vlmtrain.model.aim import random_resized_crop

    pixels = torch.randn(3, 3, 16, 16)
    whole = random_resized_crop(pixels, (1.0, 1.0), torch.Generator().manual_seed(0), (1.0, 1.0))
    assert torch.allclose(whole, pixels, atol=1e-6)  # the whole image, resized to itself
    a = random_resized_crop(pixels, (0.25, 0.25), torch.Generator().manual_seed(1), (1.0, 1.0))
    b = random_resized_crop(pixels, (0.25, 0.25), torch.Generator().manual_seed(1), (1.0, 1.0))
    assert torch.equal(a, b) and a.shape == pixels.shape  # same draws, same crops (resume)
    # A quarter of the area at ratio 1 is an 8 x 8 window, upsampled: it matches one of them.
    windows = [
        torch.nn.functional.interpolate(
            pixels[:1, :, t : t + 8, left : left + 8], size=(16, 16), mode="bilinear"
        )[0]
        for t in range(9)
        for left in range(9)
    ]
    assert any(torch.allclose(a[0], w, atol=1e-6) for w in windows)
