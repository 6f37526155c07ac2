"""Requeue on a signal vs no handler, on the shapes world: the same SFT stage is warned
(SIGUSR1, as SLURM's `--signal` does before a time limit) once a given step is logged,
then the same command is run again, as a requeued job would be.

* requeue: vlmtrain's handler (trainer.requeue_signal=SIGUSR1, the default) saves at the
  next step boundary and exits 75; the re-run resumes from that step.
* no handler: trainer.requeue_signal=null, so the signal ends the process (its default
  action); the re-run resumes from the last periodic checkpoint and redoes the steps since.

Prints, per variant: steps trained in all (redone ones included), steps redone, the wall
time of both invocations, and whether every step's loss equals the uninterrupted run's.

    python scripts/demo_requeue.py --out /tmp/requeue_demo
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], out: Path, name: str, signal_at: int | None = None) -> float:
    """One invocation; with ``signal_at``, SIGUSR1 once that step is logged. Its seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "vlmtrain.cli", *args, f"output_dir={out}", f"run_name={name}"]
    metrics = out / name / "sft" / "logs" / "csv" / "metrics.csv"
    start = time.perf_counter()
    with (out / f"{name}.log").open("a") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        while signal_at is not None and max(steps(metrics), default=-1) < signal_at:
            if proc.poll() is not None:
                raise SystemExit(f"{name} ended before step {signal_at}: see {log.name}")
            time.sleep(0.02)
        if signal_at is not None:
            os.kill(proc.pid, signal.SIGUSR1)
        proc.wait()
    if signal_at is None and proc.returncode:
        raise SystemExit(f"{name} failed ({proc.returncode}): see {out / name}.log")
    return time.perf_counter() - start


def steps(metrics: Path) -> list[int]:
    if not metrics.is_file():
        return []
    with metrics.open() as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def losses(metrics: Path) -> dict[int, str]:
    with metrics.open() as f:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/requeue_demo"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--signal-at", type=int, default=45)
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    common = [
        "stage=sft",
        "stage.allow_frozen_fresh=true",  # SFT from scratch: only the requeue is compared
        f"stage.max_steps={a.steps}",
        f"trainer.checkpoint_every={a.checkpoint_every}",
        "trainer.num_threads=1",
        "trainer.progress_bar=false",
    ]
    run(common, a.out, "straight")
    want = losses(a.out / "straight" / "sft" / "logs" / "csv" / "metrics.csv")
    print(
        f"{a.steps} steps, checkpoint every {a.checkpoint_every}, SIGUSR1 once step "
        f"{a.signal_at} is logged, then the same command again\n"
        "| variant | first exit code | steps trained (all) | steps redone | wall time (both runs) "
        "| losses equal the uninterrupted run's |\n|---|---:|---:|---:|---:|---|"
    )
    for name, extra in (("requeue", []), ("no_handler", ["trainer.requeue_signal=null"])):
        first = run([*common, *extra], a.out, name, signal_at=a.signal_at)
        code = (a.out / f"{name}.log").read_text()
        exit_code = "75" if "run the same command again to resume" in code else "killed"
        second = run([*common, *extra], a.out, name)
        metrics = a.out / name / "sft" / "logs" / "csv" / "metrics.csv"
        trained = len(steps(metrics))
        same = losses(metrics) == want
        print(
            f"| {name} | {exit_code} | {trained} | {trained - a.steps} | "
            f"{first + second:.1f} s | {'yes' if same else 'NO'} |"
        )


if __name__ == "__main__":
    main()
