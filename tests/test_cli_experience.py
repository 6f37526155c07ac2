"""The command line as a new user meets it: help, one-line errors, the smoke switch."""

from __future__ import annotations

import json

from test_cli import base_args, vlmtrain


def test_help_lists_subcommands_plan_and_config_groups(tmp_path):
    out = vlmtrain(["--help"], cwd=tmp_path).stdout
    for expected in ("eval ", "generate-shapes", "plan=true", "debug=smoke", "-m", "--cfg job"):
        assert expected in out, expected
    groups = {line.split(":")[0]: line for line in out.splitlines() if ": " in line}
    assert all(name in groups["stage"] for name in ("align", "lm_pretrain", "sft", "dpo"))
    assert all(name in groups["recipe"] for name in ("tiny", "llava15"))


def test_own_errors_are_one_line_and_reach_the_run_log(shapes_root, tmp_path):
    args = [*base_args(shapes_root, tmp_path), "run_name=err", "stage=sft"]
    proc = vlmtrain([*args, "stage.init.lm=pretrained"], cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "vlmtrain: error: stage.init.lm=pretrained, but model.lm.path is not set"
    ]
    clash = vlmtrain(["recipe=tiny", "stage.optim.lr=0.1"], cwd=tmp_path, check=False)
    assert clash.returncode == 2 and "write stages.<name>.optim.lr=0.1" in clash.stderr
    assert "Traceback" not in clash.stderr


def test_smoke_switch_runs_every_stage_of_a_recipe_for_a_few_steps(shapes_root, tmp_path):
    args = [
        f"data.root={shapes_root}",
        "data.generate=null",
        f"output_dir={tmp_path}",
        "trainer.progress_bar=false",
        "trainer.num_threads=1",
        *[f"stages.{s}.batch_size=4" for s in ("lm_pretrain", "align", "sft")],
    ]
    proc = vlmtrain(["recipe=tiny", "debug=smoke", *args], cwd=tmp_path)
    run = tmp_path / "smoke"
    summary = json.loads((run / "summary.json").read_text())
    assert [(r["stage"], r["steps"]) for r in summary] == [
        ("lm_pretrain", 2),
        ("align", 2),
        ("sft", 2),
    ]
    evaluation = json.loads((run / "sft" / "eval" / "eval.json").read_text())
    assert evaluation["test"]["overall"]["n"] == 8
    log = (run / "cli.log").read_text()  # the console's messages are in the run's log too
    assert "stage sft" in log and "recipe summary" in log and "\x1b[" not in log
    assert "recipe summary" in proc.stdout


def test_a_frozen_fresh_component_is_refused_unless_intended(shapes_root, tmp_path):
    common = [
        f"data.root={shapes_root}",
        "data.generate=null",
        f"output_dir={tmp_path}",
        "trainer.progress_bar=false",
        "stage=align",
        "stage.max_steps=1",
        "stage.batch_size=4",
    ]
    refused = vlmtrain([*common, "run_name=ff"], cwd=tmp_path, check=False)
    assert refused.returncode == 1
    assert "its vision starts fresh (random weights) and does not train" in refused.stderr
    assert "stage.allow_frozen_fresh=true" in refused.stderr
    assert not (tmp_path / "ff" / "align").exists()
    vlmtrain([*common, "run_name=ff", "stage.allow_frozen_fresh=true"], cwd=tmp_path)
    assert (tmp_path / "ff" / "align" / "artifact" / "manifest.json").is_file()


def test_inspect_data_renders_supervised_spans_and_counts_truncation(shapes_root, tmp_path):
    common = [f"data.root={shapes_root}", "data.generate=null"]
    out = vlmtrain(
        [
            "inspect-data",
            "--show",
            "2",
            "--examine",
            "30",
            "stage=sft",
            "stage.mixture.instruct=0",
            "+stage.mixture.vqa=1.0",
            "stage.max_length=200",
            *common,
        ],
        cwd=tmp_path,
    ).stdout
    assert "stage sft (max_length 200)" in out and "cut at max_length 0.0%" in out
    # An image run collapsed, the answer (and only it) between « », the turn end inside.
    vqa = next(line for line in out.splitlines() if line.strip().startswith("vqa-"))
    assert "<image x64>" in vqa and vqa.count("«") == 1 and "<|im_end|>»" in vqa
    cut = vlmtrain(
        [
            "inspect-data",
            "--show",
            "1",
            "--examine",
            "30",
            "stage=sft",
            "stage.mixture.instruct=0",
            "+stage.mixture.caption=1.0",
            "stage.max_length=90",
            *common,
        ],
        cwd=tmp_path,
    ).stdout
    fraction = float(cut.split("cut at max_length ")[1].split("%")[0])
    assert 0 < fraction <= 100 and "[cut at max_length]" in cut
