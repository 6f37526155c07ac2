"""A GRPO stage as a user runs it: through the command line, killed, resumed."""

from __future__ import annotations

import csv

import pytest
import torch
from test_cli import base_args, kill_and_resume, losses, vlmtrain


def _args(shapes_root, tmp_path, *extra):
    return [
        *base_args(shapes_root, tmp_path),
        "stage=grpo",
        "stage.batch_size=2",
        "stage.optim.lr=3e-3",
        "stage.grpo.num_generations=4",
        "stage.grpo.max_new_tokens=6",
        # Random weights never say the right answer; a format rule that random text
        # sometimes meets gives the groups rewards that differ.
        "+stage.grpo.rewards.format=0.5",
        "stage.grpo.format_pattern=.*e.*",
        *extra,
    ]


def _rows(path):
    with path.open() as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def test_grpo_stage_trains_and_logs(shapes_root, tmp_path):
    """Two optimizer steps on one generation batch (iterations=2): the second step's ratio
    is no longer 1, every promised figure is logged, the artifact is written."""
    args = _args(shapes_root, tmp_path, "stage.max_steps=2", "stage.grpo.iterations=2")
    vlmtrain([*args, "trainer.checkpoint_every=2", "run_name=r"], cwd=tmp_path)
    stage_dir = tmp_path / "r" / "grpo"
    rows = _rows(stage_dir / "logs" / "csv" / "metrics.csv")
    assert len(rows) == 2
    for name in (
        "train/rewards/exact_match",
        "train/rewards/format",
        "train/rewards/format_std",
        "train/kl",
        "train/clip_fraction",
        "train/completion_length",
        "perf/generation_tokens_per_s",
        "perf/training_tokens_per_s",
    ):
        assert rows[-1][name], name
    assert float(rows[0]["train/kl"]) == 0.0, "the first step's policy is the reference"
    assert float(rows[1]["train/kl"]) > 0.0, "the second step's policy has moved"
    assert rows[0]["train/reward"] == rows[1]["train/reward"], "one generation batch, two steps"
    assert float(rows[0]["train/reward_std"]) > 0.0
    assert (stage_dir / "artifact" / "manifest.json").is_file()


@pytest.mark.slow
def test_grpo_stage_is_killed_and_resumes_exactly(shapes_root, tmp_path):
    """Killed after its second generation batch, the stage resumes from its checkpoint and
    samples, scores and logs exactly what the uninterrupted run did."""
    args = _args(
        shapes_root, tmp_path, "stage.max_steps=6", "stage.grpo.iterations=2",
        "trainer.checkpoint_every=2",
    )  # fmt: skip
    stage_dir = tmp_path / "killed" / "grpo"

    def checkpoint_after_kill() -> None:
        newest = sorted((stage_dir / "checkpoints").glob("step-*.ckpt"))[-1]
        ckpt = torch.load(newest, weights_only=True)
        assert ckpt["vlmtrain_grpo_time"]["generation_s"] > 0
        assert not any("reference" in k for k in ckpt["state_dict"]), "the reference is saved"

    kill_and_resume(args, tmp_path, kill_after=4, between=checkpoint_after_kill)
    want = losses(tmp_path / "straight" / "grpo" / "logs" / "csv" / "metrics.csv")
    got = losses(stage_dir / "logs" / "csv" / "metrics.csv")
    assert len(want) == 6 and got == want
    rewards = [r["train/reward"] for r in _rows(stage_dir / "logs" / "csv" / "metrics.csv")]
    straight = _rows(tmp_path / "straight" / "grpo" / "logs" / "csv" / "metrics.csv")
    assert rewards[-2:] == [r["train/reward"] for r in straight][-2:]


def test_grpo_config_errors_name_the_keys(compose):
    from omegaconf import OmegaConf

    from vlmtrain.objectives.registry import objective_for

    check = objective_for("grpo").check
    base = compose("stage=grpo")
    check(base)
    bad = {
        ("stage.grpo.iterations", 2): "stage.max_steps (3)",
        ("stage.grpo.reference", "none"): "beta=0",
        ("stage.grpo.loss_type", "ppo"): "loss_type='ppo'",
    }
    for (key, value), message in bad.items():
        cfg = base.copy()
        OmegaConf.update(cfg, "stage.max_steps", 3)
        OmegaConf.update(cfg, key, value)
        with pytest.raises(ValueError, match="stage.grpo") as e:
            check(cfg)
        assert message in str(e.value), (key, str(e.value))


@pytest.mark.slow
def test_grpo_on_two_cpu_ranks(shapes_root, tmp_path):
    """Two gloo ranks sample their own prompts' groups (seeded by rank), reduce the step's
    normalizer and metrics over both, and write one artifact."""
    args = _args(shapes_root, tmp_path, "stage.max_steps=2", "stage.accumulate=1")
    vlmtrain([*args, "trainer=ddp_cpu", "run_name=ddp"], cwd=tmp_path)
    rows = _rows(tmp_path / "ddp" / "grpo" / "logs" / "csv" / "metrics.csv")
    assert len(rows) == 2 and float(rows[-1]["train/kl"]) > 0.0
    assert (tmp_path / "ddp" / "grpo" / "artifact" / "manifest.json").is_file()
