"""Model assembly, vision-tower cutting, freezing / LoRA, optimizer groups, schedule and
stage artifacts, all on tiny random-init models."""

from __future__ import annotations

import copy
import hashlib
import math
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import image_processor_for
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from vlmtrain.artifacts import load_component, read_manifest, save_artifact
from vlmtrain.config import LoraConfig, OptimConfig, TrainableConfig, VisionConfig
from vlmtrain.data.encode import SampleEncoder, collate
from vlmtrain.data.samples import load_samples
from vlmtrain.model.freezing import apply_trainable, parameter_counts
from vlmtrain.model.lm import load_tokenizer
from vlmtrain.model.vision import ConvPatchEmbedding, build_vision_tower
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.objectives.next_token import (
    NextTokenModule,
    loss_normalizer,
    supervised_positions,
    token_loss_sum,
)
from vlmtrain.objectives.optim import build_optimizer, param_groups, warmup_cosine
from vlmtrain.train import build_model, resolve_init

COMBOS = {
    "siglip-llama": (),
    "clip-llama": ("model.vision.type=clip",),
    "siglip-qwen2": ("model.lm.type=qwen2",),
    "clip-qwen2": ("model=tiny_clip_qwen2",),
}


# ------------------------------------------------------------------------- helpers
@pytest.fixture()
def tokenizer(compose):
    return load_tokenizer(compose().model)


def build(cfg, tokenizer, seed=0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    return VisionLanguageModel.build(cfg.model, tokenizer)


def real_batch(cfg, tokenizer, files=("caption_train.json", "vqa_train.json"), n=2):
    """A collated batch of real shapes samples (with images) for ``cfg.model``."""
    images, _ = image_processor_for(cfg, cfg.data.root)
    enc = SampleEncoder(tokenizer, images, cfg.model.image_token, cfg.stage.max_length)
    root = Path(cfg.data.root)
    samples = [load_samples(root / f)[i] for f in files for i in range(n)]
    return collate([enc(s) for s in samples], tokenizer.pad_token_id)


def text_batch(tokenizer, n=2):
    texts = ["the square is red.", "question: how many shapes are there? answer: 2"][:n]
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    L_ = max(map(len, ids))
    input_ids = torch.full((len(ids), L_), tokenizer.pad_token_id)
    labels = torch.full((len(ids), L_), -100)
    mask = torch.zeros((len(ids), L_), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "pixel_values": None}


def loss_of(model, batch, exponent=0.0):
    logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    return token_loss_sum(logits, batch["labels"], exponent) / loss_normalizer(
        batch["labels"], exponent
    )


def tensor_hashes(module: nn.Module) -> dict[str, str]:
    return {
        k: hashlib.sha256(v.detach().contiguous().cpu().numpy().tobytes()).hexdigest()
        for k, v in module.state_dict().items()
    }


def build_from_config(cfg, run_dir):
    """What a stage does before training: resolve ``stage.init`` and build the model."""
    return build_model(cfg, resolve_init(cfg.stage, cfg.model, run_dir))


# ------------------------------------------------------------------ 1. forward shapes
@pytest.mark.parametrize("combo", list(COMBOS))
def test_forward_shapes_and_vision_gradients(compose, tokenizer, combo):
    cfg = compose(*COMBOS[combo])
    vision_type, lm_type = combo.split("-")
    assert cfg.model.vision.type == vision_type and cfg.model.lm.type == lm_type
    model = build(cfg, tokenizer)
    assert model.language_model.config.model_type == lm_type
    assert model.get_submodule("vision_tower.model").config.model_type.startswith(vision_type)
    assert model.language_model.get_input_embeddings().num_embeddings == len(tokenizer)

    batch = real_batch(cfg, tokenizer, n=1)
    B, L_ = batch["input_ids"].shape
    logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    assert logits.shape == (B, L_, len(tokenizer))
    assert torch.isfinite(logits).all()

    # Tokens per image: (64 / 8)^2 = 64, class token (CLIP) dropped.
    pix = batch["pixel_values"]
    feats = model.image_features(pix)
    assert feats.shape == (pix.shape[0], 64, cfg.model.lm.hidden_size)
    raw = model.vision_tower.model(pixel_values=pix).last_hidden_state
    assert raw.shape[1] == (65 if vision_type == "clip" else 64)
    assert model.vision_spec.tokens_per_image == 64

    # Image features replace exactly the placeholder embeddings, in order.
    embeds = model.embed(batch["input_ids"], pix)
    is_image = batch["input_ids"] == model.image_token_id
    assert torch.allclose(embeds[is_image], feats.reshape(-1, feats.shape[-1]))
    text_ref = model.language_model.get_input_embeddings()(batch["input_ids"])
    assert torch.equal(embeds[~is_image], text_ref[~is_image])

    # Tower cut at the feature layer: nothing left unused.
    n_layers = cfg.model.vision.num_hidden_layers
    keep = n_layers if cfg.model.vision.feature_layer == -1 else n_layers - 1
    assert len(model.vision_tower.model.encoder.layers) == keep
    names = [n for n, _ in model.vision_tower.named_parameters()]
    assert not any(".head." in n or n.startswith("model.head") for n in names)
    assert not any("post_layernorm" in n for n in names)
    model.zero_grad(set_to_none=True)
    loss_of(model, batch).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
    zero = [n for n, p in model.vision_tower.named_parameters() if p.grad.abs().sum() == 0]
    assert zero == []


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("model.lm.type=qwen2",),
        # Gemma 2 soft-caps its logits in the causal-LM head; the shortcut must too.
        ("model.lm.type=gemma2", "+model.lm.extra.final_logit_softcapping=0.5"),
    ],
    ids=["llama", "qwen2", "gemma2-softcap"],
)
@pytest.mark.parametrize("lora", [False, True])
def test_logits_at_supervised_positions_match_the_full_head(compose, tokenizer, overrides, lora):
    cfg = compose("stage=sft", f"stage.lora.enabled={lora}", *overrides)
    model = build(cfg, tokenizer)
    apply_trainable(model, cfg.stage.trainable, cfg.stage.lora)
    batch = real_batch(cfg, tokenizer, n=2)
    at = supervised_positions(batch["labels"])
    assert 0 < at.sum() < at.numel() / 4  # a VQA/caption batch: few positions need logits
    inputs = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    full = model(*inputs)
    if "gemma2" in str(overrides):
        assert full.abs().max() <= 0.5  # the cap is really in force
    torch.testing.assert_close(model(*inputs, logits_at=at), full[at], atol=1e-5, rtol=1e-5)
    # The loss from either form is the same number.
    loss_full = token_loss_sum(full, batch["labels"], 0.5)
    loss_at = token_loss_sum(model(*inputs, logits_at=at), batch["labels"], 0.5)
    torch.testing.assert_close(loss_at, loss_full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vision_type", ["siglip", "clip"])
def test_conv_stem_feeds_the_tower_and_every_stem_weight_learns(compose, tokenizer, vision_type):
    cfg = compose(
        "model.vision.stem=conv", "model.vision.stem_blocks=2", f"model.vision.type={vision_type}"
    )
    model = build(cfg, tokenizer)
    stem = model.vision_tower.model.embeddings.patch_embedding
    assert isinstance(stem, ConvPatchEmbedding)
    assert [m.stride for m in stem.conv if isinstance(m, nn.Conv2d)] == [(2, 2)] * 3  # 8 = 2^3
    assert len(stem.blocks) == 2
    pix = real_batch(cfg, tokenizer, n=1)["pixel_values"]
    feats = model.image_features(pix)
    assert feats.shape == (pix.shape[0], 64, cfg.model.lm.hidden_size)
    feats.square().mean().backward()
    for name, p in stem.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"stem": "cnn"}, r"model\.vision\.stem='cnn'"),
        ({"stem": "conv", "path": "/models/siglip"}, r"model\.vision\.stem=conv.*pretrained"),
        ({"stem": "conv", "patch_size": 14}, r"patch_size must be a power of two"),
        ({"stem_blocks": 2}, r"model\.vision\.stem_blocks=2.*stem='patch'"),
        ({"stem": "conv", "stem_blocks": -1}, r"model\.vision\.stem_blocks=-1"),
    ],
)
def test_conv_stem_misconfigurations_name_the_key(fields, match):
    with pytest.raises(ValueError, match=match):
        build_vision_tower(VisionConfig(**fields))


def test_clip_qwen2_preset_cuts_penultimate_layer(compose):
    cfg = compose("model=tiny_clip_qwen2")
    assert cfg.model.vision.feature_layer == -2
    tower = build_vision_tower(cfg.model.vision)
    assert len(tower.model.encoder.layers) == cfg.model.vision.num_hidden_layers - 1
    assert tower.config.num_hidden_layers == cfg.model.vision.num_hidden_layers - 1


# A small transformers vision tower, for comparing against the uncut reference model.
SMALL_TOWER = dict(
    image_size=64, patch_size=8, hidden_size=32, intermediate_size=64, num_attention_heads=4
)


@pytest.mark.parametrize("vision_type", ["siglip", "clip"])
@pytest.mark.parametrize("feature_layer,hidden_index", [(-1, 3), (-2, 2), (1, 1)])
def test_feature_layer_matches_uncut_tower_hidden_states(vision_type, feature_layer, hidden_index):
    """Features of layer k are hidden_states[k] of the full transformers tower (Llava)."""
    dims = {**SMALL_TOWER, "num_hidden_layers": 3}
    torch.manual_seed(0)
    if vision_type == "siglip":
        ref = SiglipVisionModel(SiglipVisionConfig(vision_use_head=False, **dims)).eval()
    else:
        ref = CLIPVisionModel(CLIPVisionConfig(**dims)).eval()
    tower = build_vision_tower(VisionConfig(type=vision_type, feature_layer=feature_layer, **dims))
    result = tower.model.load_state_dict(ref.state_dict(), strict=False)
    assert result.missing_keys == []
    pix = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        hidden = ref(pixel_values=pix, output_hidden_states=True).hidden_states[hidden_index]
        expected = hidden[:, 1:] if vision_type == "clip" else hidden
        got = tower.eval()(pix)
    assert got.shape == (2, 64, 32)
    assert torch.allclose(got, expected, atol=1e-5)


def test_siglip_tower_without_pooling_head(compose, tmp_path):
    cfg = compose()
    tower = build_vision_tower(cfg.model.vision)
    assert not any("head" in n for n, _ in tower.named_parameters())
    # A pretrained SigLIP directory with a pooling head: the head is dropped on load.
    dims = {**SMALL_TOWER, "num_hidden_layers": 2}
    SiglipVisionModel(SiglipVisionConfig(vision_use_head=True, **dims)).save_pretrained(
        tmp_path / "sig"
    )
    loaded = build_vision_tower(VisionConfig(type="siglip", path=str(tmp_path / "sig")))
    assert not any("head" in n for n, _ in loaded.named_parameters())
    loaded(torch.randn(1, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in loaded.parameters())


# --------------------------------------------------------------- 2. feature layer range
@pytest.mark.parametrize("feature_layer", [0, 3, -3, -10])
def test_out_of_range_feature_layer(compose, tokenizer, feature_layer):
    cfg = compose(f"model.vision.feature_layer={feature_layer}")
    with pytest.raises(ValueError, match="model.vision.feature_layer") as info:
        build(cfg, tokenizer)
    assert str(feature_layer) in str(info.value)


# --------------------------------------------------------------------- 3. frozen parts
def test_align_stage_trains_only_the_projector(compose, tokenizer):
    cfg = compose("stage=align")
    stage = cfg.stage
    assert stage.name == "align"
    model = build(cfg, tokenizer)
    apply_trainable(model, stage.trainable, stage.lora)
    counts = parameter_counts(model)
    assert counts["vision"][0] == 0 and counts["lm"][0] == 0 and counts["projector"][1] == 0

    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.multi_modal_projector.parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    optimizer = build_optimizer(
        param_groups(model.components(), stage.optim, stage.trainable), stage.optim
    )
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in trainable}

    batch = real_batch(cfg, tokenizer)
    loss_of(model, batch).backward()
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    optimizer.step()

    state_ids = {id(p) for p in optimizer.state}
    assert state_ids == {id(p) for p in trainable}
    assert not state_ids & {id(p) for p in frozen}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n  # bit-identical


def test_sft_lora_trains_only_adapters_and_projector(compose, tokenizer):
    from peft.tuners.lora import LoraLayer

    cfg = compose("stage=sft", "stage.lora.enabled=true")
    model = build(cfg, tokenizer)
    apply_trainable(model, cfg.stage.trainable, cfg.stage.lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for n in trainable:
        assert "lora_" in n or n.startswith("multi_modal_projector."), n
    lora_names = [n for n in trainable if "lora_" in n]
    assert lora_names and all(n.startswith("language_model.") for n in lora_names)
    # Every configured target module of every LM layer got an adapter.
    n_layers = cfg.model.lm.num_hidden_layers
    for target in cfg.stage.lora.target_modules:
        hits = {
            n.split(".layers.")[1].split(".")[0] for n in lora_names if f".{target}.lora_A" in n
        }
        assert hits == {str(i) for i in range(n_layers)}, target
    assert all(p.requires_grad for p in model.multi_modal_projector.parameters())
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    # No adapter in the vision tower (it has q_proj/k_proj/... of its own).
    assert not any("lora_" in n for n, _ in model.vision_tower.named_parameters())
    assert not any(isinstance(m, LoraLayer) for m in model.vision_tower.modules())
    # The base LM weights are frozen.
    base = [n for n, p in model.language_model.named_parameters() if "lora_" not in n]
    assert base and not any(
        dict(model.language_model.named_parameters())[n].requires_grad for n in base
    )

    # And it trains: the adapters and projector get gradients.
    module = NextTokenModule(model, cfg.stage)
    loss_of(model, real_batch(cfg, tokenizer, n=1)).backward()
    module._check_every_trainable_has_grad()


def test_lora_needs_a_trainable_lm(compose, tokenizer):
    cfg = compose("stage=align", "stage.lora.enabled=true")
    model = build(cfg, tokenizer)
    with pytest.raises(ValueError, match="stage.trainable.lm"):
        apply_trainable(model, cfg.stage.trainable, cfg.stage.lora)


# -------------------------------------------------------- 4. every trainable gets a grad
@pytest.mark.parametrize(
    "overrides",
    [
        ("stage=sft", "stage.trainable.vision=true"),  # everything trains
        ("stage=align",),  # frozen tower and LM around the projector
        ("stage=sft", "stage.lora.enabled=true"),
    ],
)
def test_activation_checkpointing_recomputes_layers_and_leaves_gradients_unchanged(
    compose, tokenizer, overrides
):
    cfg = compose(*overrides)
    batch = real_batch(cfg, tokenizer)

    def step(checkpointing: bool):
        model = build(cfg, tokenizer)
        apply_trainable(model, cfg.stage.trainable, cfg.stage.lora)
        if checkpointing:
            model.enable_activation_checkpointing()
        model.train()
        calls = Counter()
        # transformers checkpoints a layer's forward, so its own hooks run once; its MLP
        # starts again when backward recomputes the layer (a pre-hook: torch stops the
        # recompute early, once the tensors backward needs are back).
        mlps = {
            "vision": model.vision_tower.model.encoder.layers[0].mlp,
            "lm": model.language_model.get_decoder().layers[0].mlp,
        }
        for name, mlp in mlps.items():
            mlp.register_forward_pre_hook(lambda *_, name=name: calls.update([name]))
        loss = loss_of(model, batch)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, calls

    loss, grads, calls = step(False)
    ck_loss, ck_grads, ck_calls = step(True)
    assert calls == {"vision": 1, "lm": 1}
    # Each layer backward passes through ran again; a frozen tower is not in backward.
    assert ck_calls == {"vision": 2 if cfg.stage.trainable.vision else 1, "lm": 2}
    assert torch.equal(loss, ck_loss)
    assert grads.keys() == ck_grads.keys() and grads
    for n, g in grads.items():
        assert g is not None and torch.allclose(g, ck_grads[n], rtol=1e-5, atol=1e-7), n


def test_unused_trainable_parameter_is_reported(compose, tokenizer):
    cfg = compose()
    model = build(cfg, tokenizer)
    apply_trainable(model, cfg.stage.trainable, cfg.stage.lora)
    model.multi_modal_projector.orphan = nn.Parameter(torch.zeros(3))
    module = NextTokenModule(model, cfg.stage)
    loss_of(model, real_batch(cfg, tokenizer, n=1)).backward()
    with pytest.raises(RuntimeError, match=r"multi_modal_projector\.orphan") as info:
        module._check_every_trainable_has_grad()
    assert str(info.value).startswith("1 trainable parameters")


def test_trainable_vision_without_images_is_reported(compose, tokenizer):
    cfg = compose("stage.trainable.vision=true")
    model = build(cfg, tokenizer)
    apply_trainable(model, cfg.stage.trainable, cfg.stage.lora)
    module = NextTokenModule(model, cfg.stage)
    loss_of(model, text_batch(tokenizer)).backward()
    with pytest.raises(RuntimeError) as info:
        module._check_every_trainable_has_grad()
    msg = str(info.value)
    n_missing = sum(
        1 for m in (model.vision_tower, model.multi_modal_projector) for _ in m.parameters()
    )
    assert msg.startswith(f"{n_missing} trainable parameters")
    assert "vision_tower.model.embeddings.patch_embedding.weight" in msg
    assert f"and {n_missing - 10} more" in msg
    assert "language_model" not in msg


def test_normal_sft_step_passes_the_grad_check(compose, tokenizer):
    cfg = compose()
    model = build(cfg, tokenizer)
    apply_trainable(model, cfg.stage.trainable, cfg.stage.lora)
    module = NextTokenModule(model, cfg.stage)
    loss_of(model, real_batch(cfg, tokenizer, n=1)).backward()
    module._check_every_trainable_has_grad()


class _OneBatch(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return self.batch


def _fit_one_step(module, batch):
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    loader = torch.utils.data.DataLoader(_OneBatch(batch), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


@pytest.mark.parametrize("reduction,exponent", [("token", 0.0), ("square", 0.5)])
def test_training_step_checks_grads_and_normalizes_by_step_tokens(
    compose, tokenizer, reduction, exponent
):
    cfg = compose(
        "stage.batch_size=1",
        "stage.max_steps=5",
        "stage.optim.grad_clip=null",
        f"stage.loss_reduction={reduction}",
    )
    batch = real_batch(cfg, tokenizer, n=1)  # 2 samples of different lengths -> 2 micro-batches
    batch["ids"] = ["s0", "s1"]
    model = build(cfg, tokenizer)
    apply_trainable(model, cfg.stage.trainable, cfg.stage.lora)
    with torch.no_grad():
        expected = loss_of(copy.deepcopy(model), batch, exponent)
        assert not torch.allclose(expected, loss_of(copy.deepcopy(model), batch, exponent + 0.5))
    trainer = _fit_one_step(NextTokenModule(model, cfg.stage), batch)
    assert trainer.global_step == 1
    assert torch.allclose(trainer.callback_metrics["train/loss"], expected, atol=1e-5)

    # Through the real training step: an unused trainable parameter stops step one.
    broken = build(cfg, tokenizer)
    apply_trainable(broken, cfg.stage.trainable, cfg.stage.lora)
    broken.multi_modal_projector.orphan = nn.Parameter(torch.zeros(3))
    with pytest.raises(RuntimeError, match=r"multi_modal_projector\.orphan"):
        _fit_one_step(NextTokenModule(broken, cfg.stage), batch)


def test_unknown_loss_reduction_names_the_key(compose, tokenizer):
    cfg = compose("stage.loss_reduction=mean")
    with pytest.raises(ValueError, match=r"stage\.loss_reduction='mean'.*sample.*square.*token"):
        NextTokenModule(build(cfg, tokenizer), cfg.stage)


# --------------------------------------------------------------- 5. lr multipliers
def test_param_groups_lr_multipliers_and_weight_decay(compose, tokenizer):
    cfg = compose()
    model = build(cfg, tokenizer)
    trainable = TrainableConfig(
        vision=True, projector=True, lm=True, lr_mult={"vision": 0.5, "projector": 1.0, "lm": 2.0}
    )
    optim = OptimConfig(lr=1e-3, weight_decay=0.1)
    apply_trainable(model, trainable, LoraConfig(enabled=False))
    groups = param_groups(model.components(), optim, trainable)
    names = [g["name"] for g in groups]
    assert sorted(names) == sorted(
        ["vision", "vision_no_decay", "projector", "projector_no_decay", "lm", "lm_no_decay"]
    )
    expected_lr = {"vision": 0.5e-3, "projector": 1e-3, "lm": 2e-3}
    optimizer = build_optimizer(groups, optim)
    component_of = {}
    for g in optimizer.param_groups:
        comp = g["name"].removesuffix("_no_decay")
        assert g["lr"] == pytest.approx(expected_lr[comp])
        if g["name"].endswith("_no_decay"):
            assert g["weight_decay"] == 0.0
            assert all(p.ndim < 2 for p in g["params"])
        else:
            assert g["weight_decay"] == pytest.approx(0.1)
            assert all(p.ndim >= 2 for p in g["params"])
        for p in g["params"]:
            assert id(p) not in component_of, "a parameter in two groups"
            component_of[id(p)] = comp
    # Each parameter sits in its own component's group, and all of them are there.
    for comp, module in model.components().items():
        for p in module.parameters():
            assert component_of[id(p)] == comp
    assert len(component_of) == len(list(model.parameters()))
    # Norm weights and biases (1-D) never decay.
    norm_w = model.language_model.model.norm.weight
    assert component_of[id(norm_w)] == "lm"
    assert any(norm_w is p for g in groups if g["name"] == "lm_no_decay" for p in g["params"])


def test_nothing_trainable_raises(compose, tokenizer):
    cfg = compose()
    model = build(cfg, tokenizer)
    nothing = TrainableConfig(vision=False, projector=False, lm=False)
    apply_trainable(model, nothing, LoraConfig(enabled=False))
    with pytest.raises(ValueError, match="no trainable parameter"):
        param_groups(model.components(), OptimConfig(), nothing)


# ---------------------------------------------------------------------- 6. schedule
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
def test_warmup_cosine(min_lr_ratio):
    total, ratio = 200, 0.05
    f = warmup_cosine(total, ratio, min_lr_ratio)
    warmup = math.ceil(total * ratio)  # 10
    values = [f(s) for s in range(total + 1)]
    assert 0 < values[0] <= 1 / warmup + 1e-12  # starts near 0
    assert all(
        a < b for a, b in zip(values[: warmup - 1], values[1:warmup], strict=True)
    )  # linear rise
    assert values[warmup - 1] == pytest.approx(1.0)  # peak reached at the end of warmup
    assert values[warmup] == pytest.approx(1.0)
    post = values[warmup:]
    assert all(a >= b for a, b in zip(post[:-1], post[1:], strict=True))  # monotone cosine decay
    mid = warmup + (total - warmup) // 2
    assert values[mid] == pytest.approx(min_lr_ratio + (1 - min_lr_ratio) * 0.5, abs=1e-2)
    assert values[total] == pytest.approx(min_lr_ratio)
    assert f(total + 50) == pytest.approx(min_lr_ratio)  # stays at the floor
    assert min(values) >= min_lr_ratio - 1e-12


def test_warmup_cosine_without_warmup_starts_at_peak():
    f = warmup_cosine(100, 0.0, 0.0)
    assert f(0) == pytest.approx(1.0)
    assert f(100) == pytest.approx(0.0)


# ---------------------------------------------------------------------- 7. artifacts
@pytest.mark.parametrize("tied, stem", [(False, "patch"), (True, "patch"), (False, "conv")])
def test_artifact_round_trip_is_bit_exact(compose, tokenizer, tmp_path, tied, stem):
    blocks = 2 if stem == "conv" else 0
    cfg = compose(
        f"model.lm.tie_word_embeddings={str(tied).lower()}",
        f"model.vision.stem={stem}",
        f"model.vision.stem_blocks={blocks}",
    )
    model = build(cfg, tokenizer, seed=1)
    lm = model.language_model
    if tied:
        assert lm.lm_head.weight is lm.get_input_embeddings().weight
    out = save_artifact(model, tokenizer, tmp_path / "artifact", {"stage": "unit"})
    assert read_manifest(out)["stage"] == "unit"
    for name in ("vision", "projector", "lm"):
        assert (out / f"{name}.safetensors").is_file()

    fresh = build(cfg, tokenizer, seed=2)
    for name, module in model.components().items():
        assert tensor_hashes(fresh.components()[name]) != tensor_hashes(module)  # really different
        load_component(fresh.components()[name], name, out)
        assert tensor_hashes(fresh.components()[name]) == tensor_hashes(module), name
    if tied:
        flm = fresh.language_model
        assert flm.lm_head.weight is flm.get_input_embeddings().weight
    batch = real_batch(cfg, tokenizer, n=1)
    with torch.no_grad():
        assert torch.equal(
            model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]),
            fresh(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]),
        )


def test_artifact_with_other_dims_fails_before_training(compose, tokenizer, tmp_path):
    cfg = compose()
    out = save_artifact(build(cfg, tokenizer), tokenizer, tmp_path / "artifact", {"stage": "a"})

    small = compose("model.lm.hidden_size=32", f"++stage.init.lm={out}")
    with pytest.raises(ValueError) as info:
        build_from_config(small, tmp_path / "run")
    msg = str(info.value)
    assert "component 'lm'" in msg
    for key in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.0.self_attn.q_proj.weight",
    ):
        assert key in msg
    assert f"artifact ({len(tokenizer)}, 64) vs model ({len(tokenizer)}, 32)" in msg

    small_model = build(small, tokenizer)
    with pytest.raises(ValueError, match=r"linear_1\.weight"):
        load_component(small_model.multi_modal_projector, "projector", out)
    # A tower cut to fewer layers: the artifact's extra layer is named.
    cut = build(compose("model.vision.feature_layer=-2"), tokenizer)
    with pytest.raises(ValueError, match=r"unexpected tensor model\.encoder\.layers\.1\."):
        load_component(cut.vision_tower, "vision", out)


def test_artifact_missing_tensors_in_component_raise(compose, tokenizer, tmp_path):
    cut_cfg = compose("model.vision.feature_layer=-2")
    out = save_artifact(build(cut_cfg, tokenizer), tokenizer, tmp_path / "artifact", {"stage": "a"})
    full = build(compose(), tokenizer)
    with pytest.raises(ValueError, match=r"missing .*encoder\.layers\.1\."):
        load_component(full.vision_tower, "vision", out)


@pytest.mark.parametrize("saved_tied", [False, True])
def test_artifact_with_other_embedding_tying_is_refused(compose, tokenizer, tmp_path, saved_tied):
    def cfg_for(tied):
        return compose(f"model.lm.tie_word_embeddings={str(tied).lower()}")

    out = save_artifact(
        build(cfg_for(saved_tied), tokenizer), tokenizer, tmp_path / "artifact", {"stage": "a"}
    )
    other = build(cfg_for(not saved_tied), tokenizer)
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight"):
        load_component(other.language_model, "lm", out)


def test_artifact_lacking_a_component_is_named(compose, tokenizer, tmp_path):
    cfg = compose()
    out = save_artifact(build(cfg, tokenizer), tokenizer, tmp_path / "artifact", {"stage": "a"})
    (out / "projector.safetensors").unlink()
    fresh = build(cfg, tokenizer)
    with pytest.raises(FileNotFoundError, match="'projector'"):
        load_component(fresh.multi_modal_projector, "projector", out)
    with pytest.raises(FileNotFoundError, match="'projector'"):
        build_from_config(compose(f"++stage.init.projector={out}"), tmp_path / "run")


def test_lora_artifact_is_merged_into_plain_lm_weights(compose, tokenizer, tmp_path):
    cfg = compose("stage.lora.enabled=true", "stage.lora.dropout=0.0")
    model = build(cfg, tokenizer)
    apply_trainable(model, cfg.stage.trainable, cfg.stage.lora)
    with torch.no_grad():  # non-zero adapters, as after some training
        for n, p in model.language_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    batch = real_batch(cfg, tokenizer, n=1)
    model.eval()
    with torch.no_grad():
        before = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    out = save_artifact(model, tokenizer, tmp_path / "artifact", {"stage": "sft"})

    plain = build(compose(), tokenizer, seed=5)
    for name, module in plain.components().items():
        load_component(module, name, out)
    plain.eval()
    with torch.no_grad():
        after = plain(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    assert torch.allclose(before, after, atol=1e-4)
