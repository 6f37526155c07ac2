"""Requeue on a signal, as a SLURM job warned of its time limit or pre-emption: the signal
lands mid-stage, the next optimizer step saves a checkpoint, the job exits to be requeued,
and the same command resumes exactly. Tested without SLURM: through the CLI, and through
submitit's local executor (the same checkpoint-and-requeue protocol as on SLURM)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from test_cli import base_args, losses, vlmtrain

from vlmtrain.requeue import EXIT_REQUEUE

REPO = Path(__file__).resolve().parents[1]


def logged_steps(metrics_csv: Path) -> list[int]:
    if not metrics_csv.is_file():
        return []
    with metrics_csv.open() as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def signal_when_logged(
    proc: subprocess.Popen, metrics_csv: Path, step: int, sig: int, pid=None
) -> None:
    """Send ``sig`` once ``step`` is in the stage's metrics (flushed every step)."""
    deadline = time.monotonic() + 240
    while max(logged_steps(metrics_csv), default=-1) < step:
        assert proc.poll() is None, f"ended before step {step}:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no training step logged"
        time.sleep(0.02)
    os.kill(pid() if pid else proc.pid, sig)


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "vlmtrain.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# slow: two CLI runs (about 23 s); the default suite keeps the requeue unit tests
@pytest.mark.slow
def test_requeue_signal_saves_at_the_next_step_and_the_same_command_resumes_exactly(
    shapes_root, tmp_path
):
    """SIGUSR1 mid-stage, with gradient accumulation (2 micro-batches a step): the step in
    progress completes, its checkpoint is saved (beside the periodic ones, the oldest
    pruned), the process exits with the requeue code; the same command resumes from it and
    logs the uninterrupted run's loss and learning rate at every step, bit for bit."""
    args = [
        *base_args(shapes_root, tmp_path),
        "stage=align",
        "stage.max_steps=14",
        "trainer.checkpoint_every=4",
    ]
    vlmtrain([*args, "run_name=straight"], cwd=tmp_path)

    stage_dir = tmp_path / "requeued" / "align"
    metrics = stage_dir / "logs" / "csv" / "metrics.csv"
    proc = start([*args, "run_name=requeued"], cwd=tmp_path)
    signal_when_logged(proc, metrics, 1, signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_REQUEUE, stderr[-3000:]
    assert "SIGUSR1 received: checkpoint saved at step" in stderr
    assert "run the same command again to resume" in stderr

    saved = sorted((stage_dir / "checkpoints").glob("step-*.ckpt"))
    step = torch.load(saved[-1], weights_only=True, mmap=True)["global_step"]
    # Saved at the boundary of the step in progress: every logged step is in it, no more.
    assert step == max(logged_steps(metrics)) + 1 < 14
    assert f"step {step} " in stderr
    assert len(saved) <= 2  # trainer.keep_checkpoints: the requeue's counts among them
    assert not (stage_dir / "artifact").exists()

    resumed = vlmtrain([*args, "run_name=requeued"], cwd=tmp_path)
    assert "resuming from" in resumed.stdout and saved[-1].name in resumed.stdout
    want = losses(tmp_path / "straight" / "align" / "logs" / "csv" / "metrics.csv")
    assert len(want) == 14
    assert losses(metrics) == want
    manifest = json.loads((stage_dir / "artifact" / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 14


@pytest.mark.slow
def test_requeue_signal_to_one_rank_stops_both_at_the_same_step(shapes_root, tmp_path):
    """Two gloo ranks, the signal to rank 0 only: the ranks agree at the next step
    boundary, save one checkpoint together and stop; the same command resumes both."""
    args = [
        *base_args(shapes_root, tmp_path),
        "stage=align",
        "trainer=ddp_cpu",
        "stage.max_steps=10",
        "trainer.checkpoint_every=4",
        "run_name=ddp",
    ]
    stage_dir = tmp_path / "ddp" / "align"
    metrics = stage_dir / "logs" / "csv" / "metrics.csv"
    proc = start(args, cwd=tmp_path)
    signal_when_logged(proc, metrics, 1, signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_REQUEUE, stderr[-3000:]
    saved = sorted((stage_dir / "checkpoints").glob("step-*.ckpt"))
    ckpt = torch.load(saved[-1], weights_only=True, mmap=True)
    assert ckpt["global_step"] == max(logged_steps(metrics)) + 1 < 10
    assert ckpt["vlmtrain"]["world_size"] == 2
    vlmtrain(args, cwd=tmp_path)
    assert len(losses(metrics)) == 10
    assert (stage_dir / "artifact" / "manifest.json").is_file()


def _job_process(parent: int) -> int:
    """The submitit task process (the one that trains) under the sweep's main process."""
    for child in psutil.Process(parent).children(recursive=True):
        if "submitit.core._submit" in " ".join(child.cmdline()):
            return child.pid
    raise AssertionError("no submitit job process")


@pytest.mark.slow
def test_submitit_requeue_protocol_resumes_the_job(shapes_root, tmp_path):
    """Through hydra-submitit-launcher (its local executor: the same signal handling and
    requeue as on SLURM): SIGUSR2 to the job saves at the next step, submitit checkpoints
    the launcher's call (a DelayedSubmission of the same job) and requeues it; the
    requeued job resumes and finishes with the uninterrupted run's losses."""
    args = [
        *base_args(shapes_root, tmp_path),
        "stage=align",
        "stage.max_steps=14",
        "trainer.checkpoint_every=4",
    ]
    vlmtrain([*args, "run_name=straight"], cwd=tmp_path)
    submitit = [
        "hydra/launcher=submitit_local",
        "trainer.requeue_signal=SIGUSR2",  # submitit's preemption signal, as cluster=slurm
        "hydra.launcher.timeout_min=10",
    ]
    metrics = tmp_path / "sub" / "align" / "logs" / "csv" / "metrics.csv"
    proc = start(["-m", *args, *submitit, "run_name=sub"], cwd=tmp_path)
    signal_when_logged(proc, metrics, 1, signal.SIGUSR2, pid=lambda: _job_process(proc.pid))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    logs = "".join(p.read_text() for p in (tmp_path / "sub" / ".submitit").rglob("*_log.*"))
    assert "SIGUSR2 received: checkpoint saved at step" in logs
    assert "Calling checkpoint method" in logs and "Requeued job" in logs
    # One job, no swept key: trained in the run directory itself, as without -m.
    assert (tmp_path / "sub" / "align" / "artifact" / "manifest.json").is_file()
    invocations = (tmp_path / "sub" / "align" / "invocations.jsonl").read_text().splitlines()
    assert [json.loads(x)["resumed"] for x in invocations] == [False, True]
    want = losses(tmp_path / "straight" / "align" / "logs" / "csv" / "metrics.csv")
    assert losses(metrics) == want


@pytest.mark.parametrize(
    "env, job",
    [
        ({"SLURM_JOB_ID": "123"}, "123"),
        ({"SLURM_JOB_ID": "130", "SLURM_ARRAY_JOB_ID": "128", "SLURM_ARRAY_TASK_ID": "2"}, "128_2"),
    ],
)
def test_under_plain_slurm_rank_zero_requeues_the_job(tmp_path, monkeypatch, capsys, env, job):
    """Without submitit, under sbatch/srun: `scontrol requeue <job>` (an array task by its
    array id), then the requeue exit code."""
    from vlmtrain.requeue import RequeueRequested, _requeue

    record = tmp_path / "scontrol.args"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" > {record}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_:
        _requeue(RequeueRequested(signal.SIGUSR1, 7, "step-0000007.ckpt"), signal.SIG_DFL)
    assert exit_.value.code == EXIT_REQUEUE
    assert record.read_text().split() == ["requeue", job]
    assert f"requeued SLURM job {job}" in capsys.readouterr().err
