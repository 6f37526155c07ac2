"""The records of a run describe the model they sit next to: an evaluation or a metrics
log of an earlier training of a stage is never reported as the current model's."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from test_cli import base_args, vlmtrain

from vlmtrain.eval.cli import main as eval_main


def _rows(metrics_csv):
    with metrics_csv.open() as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def _manifest(stage_dir):
    return json.loads((stage_dir / "artifact" / "manifest.json").read_text())


def test_retrained_stage_gets_fresh_records_and_keeps_the_old_ones(shapes_root, tmp_path):
    args = [
        *base_args(shapes_root, tmp_path),
        "run_name=rec",
        "stage=sft",
        "stage.max_steps=2",
        "trainer.checkpoint_every=1",
        "stage.eval_splits=[test]",
        "stage.eval_limit=4",
    ]
    stage = tmp_path / "rec" / "sft"
    vlmtrain(args, cwd=tmp_path)
    first = _manifest(stage)
    assert "lr: 0.001" in (stage / "config.yaml").read_text()
    source = json.loads((stage / "eval" / "source.json").read_text())
    assert source["artifact_id"] == first["artifact_id"] and source["owner"] == "stage"

    # The artifact is removed; its last step is checkpointed, so nothing trains again.
    shutil.rmtree(stage / "artifact")
    vlmtrain(args, cwd=tmp_path)
    again = _manifest(stage)
    assert again["artifact_id"] != first["artifact_id"]
    # The final loss survives a re-run that trained no step (kept in the checkpoint).
    assert again["metrics"]["train/loss"] == first["metrics"]["train/loss"]
    assert again["metrics"]["steps"] == 2
    # The evaluation scored the old artifact: set aside, and the new one evaluated.
    assert (stage / "eval.previous-1" / "eval.json").is_file()
    assert (
        json.loads((stage / "eval" / "source.json").read_text())["artifact_id"]
        == again["artifact_id"]
    )
    summary = json.loads((tmp_path / "rec" / "summary.json").read_text())
    assert (
        summary[0]["final_loss"] == first["metrics"]["train/loss"] and "test" in summary[0]["eval"]
    )

    # Retrained from scratch with another config: logs and evaluation start fresh.
    shutil.rmtree(stage / "artifact")
    shutil.rmtree(stage / "checkpoints")
    proc = vlmtrain([*args, "stage.max_steps=3"], cwd=tmp_path)
    assert "kept as" in proc.stdout
    starts = [json.loads(line) for line in (stage / "invocations.jsonl").open()]
    assert [s["resumed"] for s in starts] == [False, True, False]
    assert "stage.max_steps=3" in starts[-1]["overrides"]

    # A refused invocation (a changed config on a finished stage) changes no record.
    before = {p: p.read_bytes() for p in (tmp_path / "rec").rglob("*") if p.is_file()}
    refused = vlmtrain([*args, "stage.max_steps=4"], cwd=tmp_path, check=False)
    assert refused.returncode != 0 and "stage.max_steps: 3 -> 4" in refused.stderr
    after = {p: p.read_bytes() for p in (tmp_path / "rec").rglob("*") if p.is_file()}
    assert after.keys() - before.keys() <= {tmp_path / "rec" / "cli.log"}
    assert all(after[p] == before[p] for p in before if p.name != "cli.log")
    assert [r["step"] for r in _rows(stage / "logs" / "csv" / "metrics.csv")] == ["0", "1", "2"]
    assert len(_rows(stage / "logs.previous-1" / "csv" / "metrics.csv")) == 2
    assert (stage / "eval.previous-2" / "eval.json").is_file()
    assert (
        json.loads((stage / "eval" / "source.json").read_text())["artifact_id"]
        == _manifest(stage)["artifact_id"]
    )


def test_eval_command_never_overwrites_a_stages_own_evaluation(shapes_root, tmp_path, capsys):
    args = [
        *base_args(shapes_root, tmp_path),
        "run_name=ev",
        "stage=align",
        "stage.max_steps=1",
        "stage.eval_splits=[test]",
        "stage.eval_limit=2",
    ]
    vlmtrain(args, cwd=tmp_path)
    stage = tmp_path / "ev" / "align"
    own = (stage / "eval" / "eval.json").read_text()
    common = [str(stage / "artifact"), "--data-root", str(shapes_root), "--splits", "test"]

    assert eval_main([*common, "--limit", "3"]) == 0  # default: beside it, not over it
    assert json.loads((stage / "eval-cli" / "eval.json").read_text())["test"]["overall"]["n"] == 3
    assert eval_main([*common, "--limit", "1"]) == 0  # its own earlier output: replaced
    assert (stage / "eval" / "eval.json").read_text() == own

    assert eval_main([*common, "--limit", "3", "--out", str(stage / "eval")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (stage / "eval" / "eval.json").read_text() == own
    assert eval_main([*common, "--limit", "3", "--out", str(stage / "eval"), "--overwrite"]) == 0
    assert json.loads((stage / "eval" / "eval.json").read_text())["test"]["overall"]["n"] == 3


@pytest.mark.parametrize("logger", ["tensorboard"])
def test_any_logger_gets_hyperparameters_and_the_loss_plot(shapes_root, tmp_path, logger):
    args = [
        *base_args(shapes_root, tmp_path),
        "run_name=lg",
        "stage=align",
        "stage.max_steps=2",
        f"logger={logger}",
        "stage.optim.lr=0.0123",
    ]
    proc = vlmtrain(args, cwd=tmp_path)
    stage = tmp_path / "lg" / "align"
    hparams = (stage / "logs" / "tensorboard" / "hparams.yaml").read_text()
    assert "0.0123" in hparams and "run_name: lg" in hparams
    assert list((stage / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(_rows(stage / "logs" / "csv" / "metrics.csv")) == 2  # summaries read it
    assert (tmp_path / "lg" / "loss_curves.png").stat().st_size > 1000
    assert str(stage / "logs" / "tensorboard") in proc.stdout.replace("\n", "")


def test_a_run_can_start_from_another_runs_finished_stages(shapes_root, tmp_path):
    args = [*base_args(shapes_root, tmp_path), "stage.max_steps=1"]
    vlmtrain([*args, "run_name=a", "stage=align"], cwd=tmp_path)
    source = tmp_path / "a" / "align" / "artifact"

    reused = vlmtrain(
        [*args, "run_name=b", "stage=align", f"start_from={tmp_path / 'a'}"], cwd=tmp_path
    )
    assert "reused from" in reused.stdout
    assert not (tmp_path / "b" / "align" / "logs").exists()  # nothing trained
    assert (tmp_path / "b" / "align" / "artifact" / "manifest.json").read_bytes() == (
        source / "manifest.json"
    ).read_bytes()
    # Later stages take it by reference as from any stage of this run.
    vlmtrain([*args, "run_name=b", "stage=sft", "stage.init.projector=from:align"], cwd=tmp_path)

    changed = vlmtrain(
        [*args, "run_name=c", "stage=align", f"start_from={tmp_path / 'a'}", "stage.optim.lr=0.5"],
        cwd=tmp_path,
    )
    assert "not reused" in changed.stdout and "stage.optim.lr: 0.001 -> 0.5" in changed.stdout
    trained = _manifest(tmp_path / "c" / "align")  # trained here
    assert trained["config"]["stage"]["optim"]["lr"] == 0.5 and trained["metrics"]["steps"] == 1
