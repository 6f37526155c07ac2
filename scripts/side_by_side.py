"""Shared by the demo scripts: training runs launched through the CLI, one thread each,
side by side, each with its command and log in the output directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launch(name: str, args: list[str], common: list[str], out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    log = (out / f"{name}.log").open("w")
    cmd = [sys.executable, "-m", "vlmtrain.cli", *common, f"run_name={name}", *args]
    (out / f"{name}.cmd").write_text(" ".join(cmd) + "\n")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait(procs: dict[str, subprocess.Popen], out: Path) -> None:
    """Wait for every run; a failed one stops the demo with the end of its log."""
    for name, proc in procs.items():
        if proc.wait():
            tail = (out / f"{name}.log").read_text()[-3000:]
            raise SystemExit(f"run {name} failed ({proc.returncode}):\n{tail}")
