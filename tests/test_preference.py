"""Preference pairs (data and errors), the pair forward, the three reference kinds, the
reference cache and micro-batching, on the tiny model and the small shapes data."""

from __future__ import annotations

import io
import json
import shutil

import datasets
import pytest
import torch
from PIL import Image

from vlmtrain.data.preference import PairEncoder, PreferenceDataModule, collate_pairs, load_pairs
from vlmtrain.data.samples import DataError
from vlmtrain.eval.preference_eval import MENTION
from vlmtrain.model.freezing import apply_trainable
from vlmtrain.model.lm import load_tokenizer
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.objectives.preference_module import PreferenceModule
from vlmtrain.train import make_encoder

LORA = (
    "stage=mpo",
    "stage.lora.enabled=true",
    "stage.lora.dropout=0.0",
    "stage.trainable.projector=false",
)


def setup_stage(compose, *overrides, seed=0):
    cfg = compose(*overrides)
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(seed)
    model = VisionLanguageModel.build(cfg.model, tokenizer)
    apply_trainable(model, cfg.stage.trainable, cfg.stage.lora)
    encoder = make_encoder(cfg, model, tokenizer)
    return cfg, model, tokenizer, encoder


def pair_batch(encoder, root, n=4):
    pairs = load_pairs(root / "pref_train.json")
    enc = PairEncoder(encoder)
    samples = [{**enc(pairs[i]), "dataset": "pref"} for i in range(n)]
    return collate_pairs(samples, encoder.tokenizer.pad_token_id)


def perturb_adapters(model, seed=1):
    """Move the policy away from its reference: random LoRA B matrices (they start at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- data
def test_shapes_pairs_have_a_hallucinated_rejected_answer(shapes_root):
    records = json.loads((shapes_root / "pref_train.json").read_text())
    test = json.loads((shapes_root / "pref_test.json").read_text())
    assert {r["type"] for r in records} >= {
        "colour",
        "shape",
        "count",
        "exist",
        "position",
        "caption_absent",
    }
    assert not {r["image"] for r in records} & {r["image"] for r in test}, (
        "test images are held out"
    )
    for r in records:
        assert r["chosen"] != r["rejected"] and "<image>" in r["conversations"][0]["value"]
        if r["type"] == "caption_absent":  # the rejected caption names one more object
            named = [MENTION.findall(x) for x in (r["chosen"], r["rejected"])]
            assert len(named[1]) == len(named[0]) + 1 and set(named[0]) < set(named[1])
        assert "red circle" not in r["rejected"] and "blue triangle" not in r["rejected"]


def test_hf_layout_from_parquet_with_embedded_image(compose, shapes_root, tmp_path):
    cfg, model, tokenizer, encoder = setup_stage(compose, "stage=dpo")
    buf = io.BytesIO()
    Image.open(
        shapes_root / json.loads((shapes_root / "pref_train.json").read_text())[0]["image"]
    ).save(buf, format="PNG")
    rows = {
        "prompt": ["What colour is the square?"],
        "chosen": [[{"role": "assistant", "content": "red"}]],
        "rejected": [[{"role": "assistant", "content": "blue"}]],
        "images": [[{"bytes": buf.getvalue(), "path": None}]],
    }
    ds = datasets.Dataset.from_dict(
        rows,
        features=datasets.Features(
            {
                "prompt": datasets.Value("string"),
                "chosen": datasets.List(
                    {"role": datasets.Value("string"), "content": datasets.Value("string")}
                ),
                "rejected": datasets.List(
                    {"role": datasets.Value("string"), "content": datasets.Value("string")}
                ),
                "images": datasets.List(datasets.Image()),
            }
        ),
    )
    ds.to_parquet(str(tmp_path / "pairs.parquet"))
    (pair,) = load_pairs(tmp_path / "pairs.parquet")
    assert pair["prompt"][0]["content"].startswith("<image>\n") and pair["chosen"] == "red"
    enc = PairEncoder(encoder)(pair)
    image_id = encoder.image_token_id
    assert int((enc["chosen_input_ids"] == image_id).sum()) == model.tokens_per_image
    # Only the answer (and its end-of-turn) is supervised; the prompt is identical.
    n_prompt = int((enc["chosen_labels"] != -100).nonzero()[0])
    assert torch.equal(enc["chosen_input_ids"][:n_prompt], enc["rejected_input_ids"][:n_prompt])


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(chosen="a <image> red square."), "<image> placeholder inside the chosen answer"),
        (dict(rejected="green"), None),  # fine
        (dict(chosen="same", rejected="same"), "chosen and rejected are identical"),
        (dict(max_length=40), "prompt image tokens reach position"),
        (dict(max_length=80, prompt_pad=60), "the chosen completion is empty after truncation"),
    ],
)
def test_bad_pairs_fail_naming_the_sample(compose, shapes_root, tmp_path, change, message):
    cfg, model, tokenizer, encoder = setup_stage(compose, "stage=dpo")
    record = json.loads((shapes_root / "pref_train.json").read_text())[0]
    record.update(
        id="bad-1", chosen=change.get("chosen", "red"), rejected=change.get("rejected", "blue")
    )
    record["conversations"][0]["value"] += " word" * change.get("prompt_pad", 0)
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(record) + "\n")
    encoder.max_length = change.get("max_length", encoder.max_length)
    (pair,) = load_pairs(path)
    if message is None:
        PairEncoder(encoder)(pair)
        return
    with pytest.raises(DataError, match="bad-1") as e:
        PairEncoder(encoder)(pair)
    assert message in str(e.value)


# ------------------------------------------------------------------- the forward
def test_image_encoded_once_per_pair_and_one_lm_forward(compose, shapes_root):
    cfg, model, tokenizer, encoder = setup_stage(compose, "stage=dpo", "stage.batch_size=4")
    module = PreferenceModule(model, cfg.stage)
    seen = {"images": 0, "ref_images": 0, "lm_rows": [], "ref_lm_rows": []}
    model.vision_tower.register_forward_hook(
        lambda m, a, o: seen.__setitem__("images", seen["images"] + a[0].shape[0])
    )
    model.language_model.model.register_forward_hook(
        lambda m, a, k, o: seen["lm_rows"].append(k["inputs_embeds"].shape[0]), with_kwargs=True
    )
    ref = module.reference.model
    ref.vision_tower.register_forward_hook(
        lambda m, a, o: seen.__setitem__("ref_images", seen["ref_images"] + a[0].shape[0])
    )
    ref.language_model.model.register_forward_hook(
        lambda m, a, k, o: seen["ref_lm_rows"].append(k["inputs_embeds"].shape[0]), with_kwargs=True
    )
    batch = pair_batch(encoder, shapes_root, n=4)
    module.step_loss(batch, backward=True)
    assert seen["images"] == 4, "each pair's image is encoded once, for chosen and rejected"
    assert seen["lm_rows"] == [8], "one LM forward over chosen and rejected together"
    # The projector trains here, so the reference encodes the images with its own
    # weights: once per pair too, the same pixels. (A frozen image path shares them.)
    assert seen["ref_images"] == 4 and seen["ref_lm_rows"] == [8]


def test_three_references_give_the_same_loss(compose, shapes_root, tmp_path):
    results = {}
    for kind in ("copy", "disabled_adapter", "precomputed"):
        cfg, model, tokenizer, encoder = setup_stage(
            compose,
            *LORA,
            f"stage.preference.reference={kind}",
            "stage.batch_size=4",
            "stage.accumulate=2",
        )
        dm = PreferenceDataModule(cfg.data, cfg.stage, encoder, cfg.seed)
        dm.setup()
        module = PreferenceModule(model, cfg.stage, tmp_path / kind, dm.encoder)
        if kind == "precomputed":
            module.reference = module.precompute(dm)
        perturb_adapters(model)  # the policy now differs from its reference
        batch = collate_pairs([dm.train_set[i] for i in range(8)], tokenizer.pad_token_id)
        loss, metrics = module.step_loss(batch, backward=True)
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results[kind] = (loss, metrics, grads)
    want_loss, want, want_grads = results["copy"]
    assert abs(want["rewards/margins"]) > 1e-3, "policy and reference should differ"
    for kind in ("disabled_adapter", "precomputed"):
        loss, metrics, grads = results[kind]
        assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5), kind
        for k in ("rewards/chosen", "rewards/rejected", "sigmoid", "bco_pair", "sft"):
            assert metrics[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), (kind, k)
        for g, w in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_micro_batching_does_not_change_loss_or_gradients(compose, shapes_root):
    out = []
    for batch_size in (8, 3):
        cfg, model, tokenizer, encoder = setup_stage(
            compose, *LORA, f"stage.batch_size={batch_size}"
        )
        module = PreferenceModule(model, cfg.stage)
        module.reward_mean.update(0.3, 2)  # a non-zero d, the same in every micro-batch
        perturb_adapters(model)
        loss, metrics = module.step_loss(pair_batch(encoder, shapes_root, n=8))
        out.append(
            (
                loss,
                metrics,
                [p.grad.clone() for p in model.parameters() if p.requires_grad],
                module.reward_mean.mean,
            )
        )
    (l1, m1, g1, d1), (l2, m2, g2, d2) = out
    assert l1.item() == pytest.approx(l2.item(), rel=1e-5)
    assert m1["rewards/accuracies"] == m2["rewards/accuracies"] and d1 == pytest.approx(d2)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- cache
def test_precomputed_cache_is_reused_and_invalidated(compose, shapes_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(shapes_root, data, ignore=shutil.ignore_patterns("vqa_*", "text_*", "chat_*"))

    def run(seed=0, max_length=None):
        extra = [f"stage.max_length={max_length}"] if max_length else []
        cfg, model, tokenizer, encoder = setup_stage(
            compose, "stage=dpo", "stage.preference.reference=precomputed", *extra, seed=seed
        )
        cfg.data.root = str(data)
        cfg.data.datasets.pref.train = str(data / "pref_train.json")
        encoder.images.image_root = data
        dm = PreferenceDataModule(cfg.data, cfg.stage, encoder, cfg.seed)
        dm.setup()
        module = PreferenceModule(model, cfg.stage, tmp_path / "stage", dm.encoder)
        table = module.precompute(dm).table
        return table, capsys.readouterr().out

    first, out = run()
    assert "computed, cached" in out
    again, out = run()
    assert f"{len(first)} pairs from" in out and "computed, cached" not in out
    assert all(torch.equal(first[k], again[k]) for k in first)
    _, out = run(seed=1)  # other starting weights: another reference
    assert "stale (reference_weights changed)" in out
    records = json.loads((data / "pref_train.json").read_text())
    records[0]["chosen"] = "a large green circle."
    (data / "pref_train.json").write_text(json.dumps(records))
    changed, out = run(seed=1)
    assert "stale (data.pref.train changed)" in out
    key = f"pref/{records[0]['id']}"
    assert not torch.equal(changed[key], first[key])
    _, out = run(seed=1, max_length=100)
    assert "stale (encoding.max_length changed)" in out


# ---------------------------------------------------------------------------- eval
def test_hallucination_rate_counts_objects_not_in_the_image():
    from vlmtrain.eval.preference_eval import hallucination_rate

    objects = [[{"colour": "red", "shape": "square"}], [{"colour": "green", "shape": "circle"}]]
    captions = ["a small red square and a large blue circle.", "a large green circle."]
    r = hallucination_rate(captions, objects)
    # 3 objects named, 1 absent (blue circle); 1 of 2 captions names one.
    assert r["object_rate"] == pytest.approx(1 / 3) and r["caption_rate"] == 0.5


def test_preference_accuracy_matches_pair_by_pair(compose, shapes_root):
    from vlmtrain.eval.preference_eval import preference_accuracy
    from vlmtrain.objectives.reference import pair_logps

    cfg, model, tokenizer, encoder = setup_stage(compose, "stage=dpo")
    model.eval()
    path = shapes_root / "pref_test.json"
    got = preference_accuracy(model, tokenizer, encoder.images, "<image>", path, batch_size=7)
    wins = []
    for i in range(len(load_pairs(path))):
        b = pair_batch_at(encoder, path, i)
        with torch.no_grad():
            logps, _ = pair_logps(model, b, model.image_features(b["pixel_values"]))
        wins.append(bool(logps[0] > logps[1]))
    assert got["overall"]["accuracy"] == pytest.approx(sum(wins) / len(wins))
    assert set(got["per_type"]) >= {"colour", "count"}


def pair_batch_at(encoder, path, i):
    pair = load_pairs(path)[i]
    return collate_pairs([PairEncoder(encoder)(pair)], encoder.tokenizer.pad_token_id)


# ---------------------------------------------------------------------------- plan
def test_plan_counts_the_reference_per_kind(compose):
    from vlmtrain.plan import plan_recipe

    def dpo_memory(*overrides):
        plans = plan_recipe(compose("recipe=tiny_preference", *overrides))
        assert [p["stage"] for p in plans] == ["lm_pretrain", "align", "sft", "mpo"]
        return plans[-1]["memory_gib_per_device"], plans[-2]["memory_gib_per_device"]

    copy, sft = dpo_memory()
    assert copy["reference"] == pytest.approx(copy["weights"])
    lora = (
        "stages.mpo.lora.enabled=true",
        "stages.mpo.trainable.projector=false",
        "stages.mpo.trainable.vision=false",
    )
    adapter, _ = dpo_memory(*lora, "stages.mpo.preference.reference=disabled_adapter")
    precomputed, _ = dpo_memory("stages.mpo.preference.reference=precomputed")
    assert adapter["reference"] == 0 and precomputed["reference"] == 0
    assert copy["total"] - precomputed["total"] == pytest.approx(copy["weights"])
    with pytest.raises(ValueError, match=r"stage 'mpo'.*stage\.lora\.enabled"):
        dpo_memory("stages.mpo.preference.reference=disabled_adapter")
