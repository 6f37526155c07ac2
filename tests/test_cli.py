"""The command line as a user runs it: print config, train, kill, resume, sweep."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmtrain.artifacts import config_hash

REPO = Path(__file__).resolve().parents[1]


def vlmtrain(args: list[str], cwd: Path, env: dict | None = None, check: bool = True):
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "vlmtrain.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"vlmtrain {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return proc


def kill_and_resume(args: list[str], cwd: Path, kill_after: int, between=None):
    """Run ``args`` uninterrupted as run ``straight``, then as run ``killed``: killed by the
    kill hook after step ``kill_after``, ``between()`` (if given) inspecting what the kill
    left, then the same command again, which must resume. Returns the resumed process."""
    vlmtrain([*args, "run_name=straight"], cwd=cwd)
    env = {"VLMTRAIN_KILL_AFTER_STEP": str(kill_after)}
    killed = vlmtrain([*args, "run_name=killed"], cwd=cwd, env=env, check=False)
    assert killed.returncode != 0, "the kill hook did not fire"
    if between is not None:
        between()
    resumed = vlmtrain([*args, "run_name=killed"], cwd=cwd)
    assert "resuming from" in resumed.stdout
    return resumed


def base_args(shapes_root: Path, out: Path, stages: tuple[str, ...] = ("stage",)) -> list[str]:
    """Small data, one thread, and a small batch for each of ``stages`` (config prefixes)."""
    args = [
        f"data.root={shapes_root}",
        "data.generate=null",
        f"output_dir={out}",
        "trainer.progress_bar=false",
        "trainer.num_threads=1",
    ]
    for prefix in stages:
        # Tests train components from scratch in any order, frozen or not.
        args += [f"{prefix}.batch_size=4", f"{prefix}.accumulate=2"]
        args += [f"{prefix}.allow_frozen_fresh=true"]
    return args


def losses(metrics_csv: Path) -> dict[int, tuple[str, ...]]:
    """step -> (loss, learning rates..., per-dataset losses...) as logged; a step logged
    twice (redone after a kill) keeps the last."""
    out = {}
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                lrs = tuple(row[k] for k in sorted(row) if k.startswith("train/lr_"))
                assert lrs, "no learning rate logged"
                by_dataset = tuple(row[k] for k in sorted(row) if k.startswith("train/loss_"))
                out[int(row["step"])] = (row["train/loss"], *lrs, *by_dataset)
    return out


def test_cfg_job_prints_composed_config(shapes_root, tmp_path):
    proc = vlmtrain(["stage=align", "stage.optim.lr=0.25", "--cfg", "job"], cwd=tmp_path)
    assert "name: align" in proc.stdout
    assert "lr: 0.25" in proc.stdout


def test_unknown_key_fails_naming_it(tmp_path):
    proc = vlmtrain(["stage.learning_rate=1"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "learning_rate" in proc.stderr


def test_kill_and_rerun_resumes_exactly(shapes_root, tmp_path):
    """A run SIGKILLed mid-stage and started again with the same command reproduces the
    uninterrupted run's loss and learning rate at every step, bit for bit, with steps
    grouped by length (the tiny recipe's SFT)."""
    args = [
        *base_args(shapes_root, tmp_path),
        "stage=sft",
        "stage.max_steps=8",
        "trainer.checkpoint_every=3",
        "+stage.mixture.vqa=1.0",
        "stage.group_by_length=true",
    ]
    vlmtrain([*args, "run_name=straight"], cwd=tmp_path)
    # The per-dataset losses are the total's parts: it is their weighted mean. A step
    # logs only the datasets it had (short VQA and long chats mostly get steps of their own).
    with (tmp_path / "straight" / "sft" / "logs" / "csv" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    parts = [[float(r[k]) for k in ("train/loss_instruct", "train/loss_vqa") if r[k]] for r in rows]
    assert len(rows) == 8 and 1 in {len(p) for p in parts}, "every step logged both datasets"
    for r, p in zip(rows, parts, strict=True):
        assert min(p) - 1e-5 <= float(r["train/loss"]) <= max(p) + 1e-5

    killed = vlmtrain(
        [*args, "run_name=killed"], cwd=tmp_path, env={"VLMTRAIN_KILL_AFTER_STEP": "5"}, check=False
    )
    assert killed.returncode != 0, "the kill hook did not fire"
    stage_dir = tmp_path / "killed" / "sft"
    last = stage_dir / "checkpoints" / "step-0000003.ckpt"
    assert sorted(p.name for p in last.parent.iterdir()) == [last.name]
    assert not (stage_dir / "artifact").exists()
    # The stage's wall time continues from the checkpoint's: make that time unmistakable.
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["callbacks"]["StageClock"]["elapsed_s"] > 0
    ckpt["callbacks"]["StageClock"]["elapsed_s"] = 1000.0
    torch.save(ckpt, last)

    resumed = vlmtrain([*args, "run_name=killed"], cwd=tmp_path)
    assert "resuming from" in resumed.stdout
    manifest = json.loads((stage_dir / "artifact" / "manifest.json").read_text())
    assert 1000 < manifest["metrics"]["wall_time_s"] < 1000 + 300

    want = losses(tmp_path / "straight" / "sft" / "logs" / "csv" / "metrics.csv")
    got = losses(stage_dir / "logs" / "csv" / "metrics.csv")
    assert len(want) == 8
    assert got == want

    again = vlmtrain([*args, "run_name=killed"], cwd=tmp_path)
    assert "already finished" in again.stdout
    changed = vlmtrain([*args, "run_name=killed", "stage.optim.lr=0.01"], cwd=tmp_path, check=False)
    assert changed.returncode != 0 and "different config" in changed.stderr
    assert "stage.optim.lr: 0.001 -> 0.01" in changed.stderr


def test_stage_finished_before_a_schema_field_existed_is_reused(shapes_root, tmp_path):
    """A manifest written before ``stage.loss_reduction`` existed (the key absent from its
    config and its hash) and before data fingerprints were recorded still matches when the
    field is at its default, and only then."""
    args = [*base_args(shapes_root, tmp_path), "stage=sft", "stage.max_steps=2", "run_name=old"]
    vlmtrain(args, cwd=tmp_path)
    path = tmp_path / "old" / "sft" / "artifact" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["config"]["stage"]["loss_reduction"]
    del manifest["data_files"]
    hashed = {k: manifest["config"][k] for k in ("model", "data", "stage", "seed")}
    manifest["config_hash"] = config_hash({**hashed, "sources": {}})  # as the old code hashed
    path.write_text(json.dumps(manifest))

    again = vlmtrain(args, cwd=tmp_path)
    assert "already finished" in again.stdout and "stage.loss_reduction" in again.stdout
    said = " ".join(again.stdout.split())  # rich wraps long lines
    assert "its data files (finished before data fingerprints were recorded" in said
    square = vlmtrain([*args, "stage.loss_reduction=square"], cwd=tmp_path, check=False)
    assert square.returncode != 0
    assert "stage.loss_reduction: '<absent>' -> 'square'" in square.stderr


def test_align_then_sft_takes_projector_by_reference(shapes_root, tmp_path):
    args = [*base_args(shapes_root, tmp_path), "run_name=chain", "stage.max_steps=2"]
    vlmtrain([*args, "stage=align"], cwd=tmp_path)
    vlmtrain([*args, "stage=sft", "stage.init.projector=from:align"], cwd=tmp_path)

    manifest = json.loads((tmp_path / "chain" / "sft" / "artifact" / "manifest.json").read_text())
    assert manifest["init"]["projector"].endswith("align/artifact")
    missing = vlmtrain(
        [*args, "stage=sft", "run_name=other", "stage.init.lm=from:lm_pretrain"],
        cwd=tmp_path,
        check=False,
    )
    assert missing.returncode != 0 and "lm_pretrain" in missing.stderr


def test_multirun_sweep_one_directory_per_job(shapes_root, tmp_path):
    args = [*base_args(shapes_root, tmp_path), "run_name=sweep", "stage=align", "stage.max_steps=2"]
    args += ["sweep.metric=train/loss"]  # what each job returns to the sweeper
    proc = vlmtrain(["-m", *args, "stage.optim.lr=0.001,0.002"], cwd=tmp_path)
    sweep = tmp_path / "sweep"
    jobs = sorted(p for p in sweep.iterdir() if (p / "align" / "artifact").is_dir())
    # Named by the values the sweep varies, so a re-run finds each job whatever the order.
    assert [j.name for j in jobs] == ["stage.optim.lr=0.001", "stage.optim.lr=0.002"]
    lrs = [
        json.loads((j / "align" / "artifact" / "manifest.json").read_text())["config"]["stage"][
            "optim"
        ]["lr"]
        for j in jobs
    ]
    assert lrs == [0.001, 0.002]
    # Each stage records its resolved config and the overrides it was started with.
    record = [json.loads(line) for line in (jobs[0] / "align" / "invocations.jsonl").open()]
    assert "stage.optim.lr=0.001" in record[0]["overrides"] and record[0]["code_version"]
    # One table of every job's results.
    with (sweep / "sweep_summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["job"] for r in table] == [j.name for j in jobs]
    assert all(float(r["align/final_loss"]) > 0 for r in table)
    assert "sweep summary" in proc.stdout and (sweep / "sweep_summary.md").is_file()
    # Each job returned its stage's train/loss (recorded beside it), and the best is named.
    returned = [json.loads((j / "sweep_metric.json").read_text())["value"] for j in jobs]
    assert returned == [float(r["align/final_loss"]) for r in table]
    assert [float(r["objective"]) for r in table] == returned
    best = jobs[returned.index(min(returned))].name
    assert f"best (minimize align train/loss): {best}" in (sweep / "sweep_summary.md").read_text()


@pytest.mark.slow
def test_lora_sft_stage_runs(shapes_root, tmp_path):
    args = [
        *base_args(shapes_root, tmp_path),
        "run_name=lora",
        "stage=sft",
        "stage.max_steps=3",
        "stage.lora.enabled=true",
    ]
    vlmtrain(args, cwd=tmp_path)
    assert (tmp_path / "lora" / "sft" / "artifact" / "lm.safetensors").is_file()


def test_pixel_shuffle_stage_trains_and_evaluates(shapes_root, tmp_path):
    """The token count of a pixel-shuffle projector reaches the data pipeline and the
    evaluator through the same path a user's run takes."""
    args = [
        *base_args(shapes_root, tmp_path),
        "run_name=ps",
        "stage=sft",
        "stage.max_steps=2",
        "model/projector=pixel_shuffle_mlp",
        "stage.eval_splits=[test]",
        "stage.eval_limit=10",
    ]
    vlmtrain(args, cwd=tmp_path)
    result = json.loads((tmp_path / "ps" / "sft" / "eval" / "eval.json").read_text())
    assert result["test"]["overall"]["n"] == 10


@pytest.mark.slow
def test_two_process_ddp_on_cpu_with_text_only_batches(shapes_root, tmp_path):
    """Two gloo ranks with vision and projector trainable and batches that carry no image
    at all: DDP still gets a gradient for every parameter on every rank (no hang, no
    unused-parameter error); one run directory, one artifact."""
    args = [
        *base_args(shapes_root, tmp_path),
        "run_name=ddp",
        "stage=sft",
        "trainer=ddp_cpu",
        "stage.max_steps=3",
        "stage.trainable.vision=true",
        "stage.mixture.instruct=0",
        "+stage.mixture.text=1.0",
    ]
    vlmtrain(args, cwd=tmp_path)
    assert (tmp_path / "ddp" / "sft" / "artifact" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ddp"]


def test_wandb_logger_runs_offline_and_keeps_its_run_id(shapes_root, tmp_path):
    args = [
        *base_args(shapes_root, tmp_path),
        "run_name=wb",
        "stage=align",
        "stage.max_steps=2",
        "logger=wandb",
        "trainer.checkpoint_every=1",
    ]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    vlmtrain(args, cwd=tmp_path, env=env)
    runs = list((tmp_path / "wb" / "align" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The run's id is kept in the stage directory: a resumed stage logs to the same run
    # (tests/test_requeue.py reads it back).
    assert (
        runs[0].name.rsplit("-", 1)[-1] == (tmp_path / "wb" / "align" / "wandb_run_id").read_text()
    )
