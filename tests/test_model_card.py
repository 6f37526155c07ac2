"""The export's model card: Hugging Face layout, every stage of the recipe, evals, plot."""

from __future__ import annotations

import json

import yaml
from omegaconf import OmegaConf

from vlmtrain.artifacts import save_artifact
from vlmtrain.export import main as export_main
from vlmtrain.model.lm import load_tokenizer
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.recipe import stage_config

STAGES = ("lm_pretrain", "align", "sft")


def recipe_run(compose, run_dir):
    """A run directory as `vlmtrain recipe=tiny` leaves it: three stages, each artifact's
    manifest naming the artifacts it started from, an eval report, summary and plot."""
    cfg = compose("recipe=tiny", "model.vision.stem=patch", "model.vision.stem_blocks=0")
    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    model = VisionLanguageModel.build(cfg.model, tokenizer)
    previous = None
    for i, name in enumerate(STAGES):
        scfg = stage_config(cfg, name, cfg.stages[name])
        artifact = run_dir / name / "artifact"
        init = {c: "fresh" for c in ("vision", "projector", "lm")}
        if previous is not None:
            init = {c: str(previous) for c in init}
        metrics = {
            "steps": 100 * (i + 1),
            "tokens_seen": 12345 * (i + 1),
            "wall_time_s": 10.0 * (i + 1),
            "train/loss": 1.0 / (i + 1),
        }
        manifest = {
            "stage": name,
            "objective": scfg.stage.objective,
            "config": OmegaConf.to_container(scfg, resolve=True),
            "init": init,
            "metrics": metrics,
        }
        save_artifact(model, tokenizer, artifact, manifest)
        previous = artifact
    (run_dir / "sft" / "eval").mkdir()
    (run_dir / "sft" / "eval" / "eval.md").write_text(
        "| split | type | accuracy | chance | n |\n|---|---|---|---|---|\n"
        "| test | **overall** | 0.766 | | 500 |\n"
    )
    (run_dir / "summary.json").write_text(json.dumps([{"stage": s} for s in STAGES]))
    (run_dir / "loss_curves.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return previous


def test_card_lists_every_stage_of_the_recipe(compose, tmp_path):
    artifact = recipe_run(compose, tmp_path / "run")
    out = tmp_path / "export"
    assert export_main([str(artifact), str(out)]) == 0
    card = (out / "README.md").read_text()

    _, header, body = card.split("---\n", 2)
    meta = yaml.safe_load(header)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "image-text-to-text" and "vlmtrain" in meta["tags"]
    assert "base_model" not in meta  # trained from scratch: no base model to name

    rows = [line for line in body.splitlines() if line.startswith("| ") and "|---" not in line]
    stage_rows = [r for r in rows if r.split("|")[1].strip() in STAGES]
    assert [r.split("|")[1].strip() for r in stage_rows] == list(STAGES)  # in recipe order
    sft = stage_rows[-1].split("|")
    assert "vqa 0.6" in sft[3] and "300" in sft[4] and "37,035" in sft[5]
    assert "vision (lr x0.5), projector, lm" in sft[6] and "30 s" in sft[7]
    align = stage_rows[1].split("|")
    assert "vision (lr x0.5), projector" in align[6] and "lm" not in align[6]
    assert "| test | **overall** | 0.766 |" in body  # the evaluation table
    assert "(loss_curves.png)" in body and (out / "loss_curves.png").is_file()
    assert "transformers:" in body and "code (at training)" in body
    assert "LlavaForConditionalGeneration" in body


def test_card_names_pretrained_components_as_base_models(compose, tmp_path):
    from vlmtrain.model_card import render_card

    cfg = compose()
    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    model = VisionLanguageModel.build(cfg.model, tokenizer)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["model"]["lm"]["path"] = "/models/Qwen2-0.5B"
    artifact = save_artifact(
        model, tokenizer, tmp_path / "artifact", {"stage": "sft", "config": config, "init": {}}
    )
    text, chain = render_card(artifact, "LlavaForConditionalGeneration")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == ["/models/Qwen2-0.5B"] and len(chain) == 1
