"""A preference stage as a user runs it: through the command line, killed, resumed."""

from __future__ import annotations

import csv

import pytest
import torch
from test_cli import base_args, kill_and_resume, losses, vlmtrain


def test_mpo_stage_is_killed_and_resumes_exactly(shapes_root, tmp_path):
    """MPO (sigmoid + bco_pair + sft) with a precomputed reference: the killed run resumes
    from its checkpoint, reuses the cached reference log-probs, restores BCO's running
    reward mean, and logs the uninterrupted run's values at every step."""
    args = [
        *base_args(shapes_root, tmp_path),
        "stage=mpo",
        "stage.max_steps=8",
        "stage.optim.lr=3e-3",
        "trainer.checkpoint_every=3",
        "stage.preference.reference=precomputed",
        "stage.val_every=4",
        "stage.val_batches=2",
    ]
    stage_dir = tmp_path / "killed" / "mpo"

    def checkpoint_after_kill() -> None:
        newest = sorted((stage_dir / "checkpoints").glob("step-*.ckpt"))[-1]
        ckpt = torch.load(newest, weights_only=True)
        assert ckpt["vlmtrain_reward_mean"]["count"] > 0
        assert not any("reference" in k for k in ckpt["state_dict"]), "the reference is saved"

    resumed = kill_and_resume(args, tmp_path, kill_after=5, between=checkpoint_after_kill)
    assert "pairs from" in resumed.stdout, "the cached reference log-probs were recomputed"

    want = losses(tmp_path / "straight" / "mpo" / "logs" / "csv" / "metrics.csv")
    got = losses(stage_dir / "logs" / "csv" / "metrics.csv")
    assert len(want) == 8 and got == want
    with (stage_dir / "logs" / "csv" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    names = ("loss_sigmoid", "loss_bco_pair", "loss_sft", "rewards/chosen", "rewards/margins")
    for name in (*names, "rewards/rejected", "rewards/accuracies", "logps/chosen"):
        assert rows[-1][f"train/{name}"], name
    assert rows[-1]["perf/tokens_per_s"]
    assert float(rows[-1]["train/rewards/chosen"]) != 0.0, "the policy never left its reference"
    assert (stage_dir / "artifact" / "manifest.json").is_file()


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(shapes_root, tmp_path):
    """Two gloo ranks with a precomputed reference (rank 0 writes it, rank 1 waits and
    reads it) log the losses and rewards of one process taking the same pairs per step."""
    args = [
        *base_args(shapes_root, tmp_path),
        "stage=mpo",
        "stage.max_steps=3",
        "stage.preference.reference=precomputed",
        "stage.batch_size=4",
    ]
    vlmtrain([*args, "run_name=ddp", "trainer=ddp_cpu", "stage.accumulate=1"], cwd=tmp_path)
    vlmtrain([*args, "run_name=one", "stage.accumulate=2"], cwd=tmp_path)

    def rows(run):
        with (tmp_path / run / "mpo" / "logs" / "csv" / "metrics.csv").open() as f:
            return [r for r in csv.DictReader(f) if r.get("train/loss")]

    ddp, one = rows("ddp"), rows("one")
    assert len(ddp) == len(one) == 3
    for a, b in zip(ddp, one, strict=True):
        for key in ("train/loss", "train/loss_bco_pair", "train/rewards/margins"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-6), key
