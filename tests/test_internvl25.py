"""recipes/internvl25.yaml: planned at real size, and run end to end with tiny substitutes
(tiled images, and a last stage at another resolution than the tower it carries)."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from safetensors import safe_open
from test_cli import base_args, vlmtrain

from vlmtrain.artifacts import load_model
from vlmtrain.chat import load_chat_model
from vlmtrain.chat import main as chat_main
from vlmtrain.export import NotExportable, check_exportable
from vlmtrain.plan import plan_recipe

GPU = ("recipe=internvl25", "trainer=gpu", "trainer.devices=8", "trainer.num_nodes=64")
STAGES = ("stages.mlp_warmup", "stages.full")  # stage 1.5 left out, as its comment says


def test_internvl25_plan_at_real_size(compose):
    """InternVL2.5-8B: InternViT-300M (0.30B) + a 4096-wide pixel-shuffle MLP (33.6M) +
    InternLM2.5-7B (7.74B), about 8.1B in all; 448 px tiles of 256 tokens, up to 12 + a
    thumbnail; packed batches of 512 / 1024 / 512 over 512 GPUs."""
    plans = plan_recipe(compose(*GPU))
    assert [p["stage"] for p in plans] == ["mlp_warmup", "vit_incremental", "full"]
    params = {k: v["trainable"] + v["frozen"] for k, v in plans[2]["parameters"].items()}
    assert abs(params["vision"] - 304e6) / 304e6 < 0.01
    assert params["projector"] == 4096 * 2 + 4096 * 4096 * 2 + 4096 * 2
    assert abs(params["lm"] - 7.74e9) / 7.74e9 < 0.005
    assert abs(sum(params.values()) - 8.08e9) / 8.08e9 < 0.01
    for p in plans:
        assert p["image_tokens_per_image"] == 13 * 256 and p["tiles_per_image"] == 13
    assert [p["samples_per_step"] for p in plans] == [512, 1024, 512]
    assert plans[0]["parameters"]["vision"]["trainable"] == 0
    assert plans[1]["parameters"]["lm"]["trainable"] == 0
    assert plans[2]["parameters"]["lm"]["trainable"] == params["lm"]
    # Stage 1.5 is optional: without it, the full stage takes the warm-up's encoder.
    skipped = plan_recipe(
        compose(
            *GPU,
            "~stages.vit_incremental",
            "stages.full.init.vision=from:mlp_warmup",
            "stages.full.init.projector=from:mlp_warmup",
        )
    )
    assert [p["stage"] for p in skipped] == ["mlp_warmup", "full"]
    assert skipped[1]["image_tokens_per_image"] == 13 * 256


def test_internvl25_runs_end_to_end_with_tiny_substitutes(shapes_root, tmp_path):
    """Tiny tower and LM from scratch on the shapes world, through the CLI, the optional
    stage 1.5 left out: 64 px images as 2x2 tiles of 32 px + a thumbnail (5 x 4 = 20
    tokens), then a last stage at 48 px whose carried tower's position table is
    interpolated from 4x4 to 6x6 once, stored so, and evaluated from the artifact."""
    args = [
        *base_args(shapes_root, tmp_path, STAGES),
        "recipe=internvl25",
        "run_name=ivl",
        "model=tiny",
        "model/projector=pixel_shuffle_mlp",
        "model.vision.image_size=32",
        "data=shapes",
        f"data.root={shapes_root}",
        "data.generate=null",
        "data.chat_template=null",
        "trainer=cpu",
        "trainer.strategy=auto",
        "trainer.precision=32-true",
        "trainer.activation_checkpointing=false",
        "~stages.vit_incremental",
        "stages.mlp_warmup.init.vision=fresh",
        "stages.mlp_warmup.init.lm=fresh",
        "stages.full.init.vision=from:mlp_warmup",
        "stages.full.init.projector=from:mlp_warmup",
        "stages.full.init.lm=from:mlp_warmup",
        *[f"{s}.global_batch_size=8" for s in STAGES],
        *[f"{s}.max_steps=2" for s in STAGES],
        *[f"{s}.max_length=256" for s in STAGES],
        "+stages.full.model={vision: {image_size: 48}}",
        "stages.full.eval_splits=[test]",
        "stages.full.eval_limit=4",
    ]
    vlmtrain(args, cwd=tmp_path)
    run = tmp_path / "ivl"
    tables = {}
    for stage in ("mlp_warmup", "full"):
        artifact = run / stage / "artifact"
        manifest = json.loads((artifact / "manifest.json").read_text())
        assert manifest["metrics"]["steps"] == 2
        assert manifest["config"]["model"]["tiling"]["enabled"] is True
        with safe_open(str(artifact / "vision.safetensors"), "pt") as f:
            tables[stage] = f.get_slice("model.embeddings.position_embedding.weight").get_shape()
        tables[stage + "_px"] = manifest["config"]["model"]["vision"]["image_size"]
    assert tables == {
        "mlp_warmup": [16, 64],
        "mlp_warmup_px": 32,
        "full": [36, 64],
        "full_px": 48,
    }
    evaluation = json.loads((run / "full" / "eval" / "eval.json").read_text())
    assert 0.0 <= evaluation["test"]["overall"]["accuracy"] <= 1.0
    # chat cuts the image as training did (a mismatch of image tokens and features raises);
    # export refuses: Llava's processor has no tiles.
    artifact = run / "full" / "artifact"
    image = next((shapes_root / "images" / "test").glob("*.png"))
    argv = [str(artifact), "--image", str(image), "--prompt", "What colour?"]
    assert chat_main([*argv, "--max-new-tokens", "3"]) == 0
    _, processor, _ = load_chat_model(artifact)
    assert processor([Image.open(image).convert("RGB")], "<image> hi")["pixel_values"].shape == (
        1,
        3,
        48,
        48,
    )
    with pytest.raises(NotExportable, match="model.tiling.enabled=true"):
        check_exportable(load_model(artifact)[2])
