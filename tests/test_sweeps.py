"""Sweeps: the metric a run returns to the sweeper, the Optuna sweeper through the CLI
(one directory per trial; a re-run resumes the unfinished trial and skips finished ones),
and the wandb run id a resumed stage continues."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from test_cli import base_args, vlmtrain

from vlmtrain.loggers import WANDB_ID_FILE, wandb_run_id
from vlmtrain.requeue import signal_number
from vlmtrain.sweep import check_objective, objective, write_sweep_summary

REPO = Path(__file__).resolve().parents[1]


def _trials(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.name.startswith("stage.optim.lr="))


@pytest.mark.slow
def test_optuna_sweep_returns_the_metric_and_a_rerun_resumes_and_skips_trials(
    shapes_root, tmp_path
):
    """Two Optuna trials through the CLI, the first killed mid-stage: the re-run of the same
    command proposes the same parameters (seeded sampler), resumes the killed trial from
    its checkpoint and runs the second; a third run skips both, returning the same values."""
    args = [
        "-m",
        *base_args(shapes_root, tmp_path),
        "run_name=opt",
        "stage=align",
        "stage.max_steps=4",
        "trainer.checkpoint_every=1",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=2",
        "stage.optim.lr=tag(log, interval(1e-4, 1e-2))",
        "sweep.metric=train/loss",
    ]
    sweep = tmp_path / "opt"
    killed = vlmtrain(args, cwd=tmp_path, env={"VLMTRAIN_KILL_AFTER_STEP": "3"}, check=False)
    assert killed.returncode != 0
    (first,) = _trials(sweep)
    assert not (first / "align" / "artifact").exists()

    resumed = vlmtrain(args, cwd=tmp_path)
    trials = _trials(sweep)
    assert len(trials) == 2 and first in trials  # the same first trial, resumed in place
    assert "resuming from" in resumed.stdout
    values = {t.name: json.loads((t / "sweep_metric.json").read_text())["value"] for t in trials}
    for t in trials:  # the value returned is the stage's final training loss
        manifest = json.loads((t / "align" / "artifact" / "manifest.json").read_text())
        assert values[t.name] == manifest["metrics"]["train/loss"]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == min(values.values())

    again = vlmtrain(args, cwd=tmp_path)
    assert again.stdout.count("already finished") == 2
    assert _trials(sweep) == trials
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text()) == results


def test_objective_is_the_named_metric_of_the_named_stage(tmp_path, compose):
    """What a run returns: the metric of its last stage (or sweep.stage), from the artifact
    or an evaluation; a metric the stage lacks is an error listing those it has."""
    cfg = compose("recipe=tiny", "sweep.metric=eval/test", "sweep.direction=maximize")
    stages = list(cfg.stages)
    rows = []
    for name in stages:
        artifact = tmp_path / name / "artifact"
        artifact.mkdir(parents=True)
        metrics = {"train/loss": 1.5, "val/loss": 2.5}
        (artifact / "manifest.json").write_text(json.dumps({"metrics": metrics}))
        rows.append({"stage": name, "artifact": str(artifact), "eval": {"test": 0.75}})
    assert objective(cfg, rows, tmp_path) == 0.75
    assert json.loads((tmp_path / "sweep_metric.json").read_text())["stage"] == stages[-1]
    cfg.sweep.metric, cfg.sweep.stage = "val/loss", stages[0]
    assert objective(cfg, rows, tmp_path) == 2.5
    cfg.sweep.metric = "val/accuracy"
    with pytest.raises(ValueError, match="has no such metric; it has .*train/loss"):
        objective(cfg, rows, tmp_path)
    # A sweep summary names the best job by that metric and direction.
    for job, value in (("a", 0.5), ("b", 0.9)):
        (tmp_path / job).mkdir()
        (tmp_path / job / "summary.json").write_text(json.dumps([{"stage": "sft"}]))
        record = {"stage": "sft", "metric": "eval/test", "value": value, "direction": "maximize"}
        (tmp_path / job / "sweep_metric.json").write_text(json.dumps(record))
    _, md = write_sweep_summary(tmp_path)
    assert "best (maximize sft eval/test): b = 0.9" in md.read_text()


@pytest.mark.parametrize(
    "overrides, error",
    [
        (("sweep.metric=eval/val",), "evaluates"),
        (("sweep.metric=val/loss", "stage.val_every=0"), "never validates"),
        (("sweep.metric=train/loss", "sweep.stage=nope"), "not a stage of this run"),
        (("sweep.metric=train/loss", "sweep.direction=up"), "minimize or maximize"),
    ],
)
def test_a_metric_the_run_cannot_have_is_refused_before_training(compose, overrides, error):
    cfg = compose("stage=sft", *overrides)
    with pytest.raises(ValueError, match=error):
        check_objective(cfg)


def test_wandb_run_id_is_kept_in_the_stage_directory(tmp_path):
    """A stage started from scratch gets a new id, written in the stage directory; a
    resumed one reads it back (whatever the directory's path now is)."""
    first = wandb_run_id(tmp_path / "sft", fresh_start=True)
    assert (tmp_path / "sft" / WANDB_ID_FILE).read_text() == first
    moved = tmp_path / "moved"
    (tmp_path / "sft").rename(moved)
    assert wandb_run_id(moved, fresh_start=False) == first
    again = wandb_run_id(moved, fresh_start=True)
    assert again != first and wandb_run_id(moved, fresh_start=False) == again


def test_requeue_signal_names():
    assert signal_number("SIGUSR1") == signal_number("usr1") == 10
    with pytest.raises(ValueError, match="trainer.requeue_signal='SIGNOPE'"):
        signal_number("SIGNOPE")


def test_cluster_slurm_composes_a_submitit_job_from_the_trainer():
    """cluster=slurm: the submitit launcher with one task and one GPU per device, the
    requeue signal the one submitit asks SLURM for."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from submitit.core.job_environment import JobEnvironment

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose(
            "config",
            ["cluster=slurm", "trainer=gpu", "trainer.devices=4", "trainer.num_nodes=2"],
            return_hydra_config=True,
        )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["tasks_per_node"], launcher["gpus_per_node"], launcher["nodes"]) == (4, 4, 2)
    assert launcher["max_num_timeout"] > 0 and launcher["additional_parameters"]["requeue"]
    assert cfg.trainer.requeue_signal == "SIG" + JobEnvironment.USR_SIG
