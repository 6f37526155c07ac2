"""A plain `pip install` of the built wheel works from any directory: configs and recipes
ship inside the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Not the checkout: the wheel's vlmtrain must be the one found.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow  # builds a wheel and a virtualenv: 15-35 s
def test_built_wheel_runs_recipes_from_any_directory(shapes_root, tmp_path):
    # Built from a copy of the sources: a build writes build/ and egg-info beside them.
    src = tmp_path / "src"
    top = {".git", ".venv", "runs", "data", "build", ".cache", ".pytest_cache"}
    shutil.copytree(
        REPO,
        src,
        ignore=lambda d, names: (
            [n for n in names if Path(d) == REPO and n in top]
            + [n for n in names if n == "__pycache__" or n.endswith(".egg-info")]
        ),
    )
    dist = tmp_path / "dist"
    pip_wheel = ["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src]
    run([sys.executable, *pip_wheel], tmp_path)
    (wheel,) = dist.glob("vlmtrain-*.whl")
    venv = tmp_path / "fresh"
    run([sys.executable, "-m", "venv", venv], tmp_path)
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp_path)
    # The dependencies (torch, transformers, ...) come from this environment, added after
    # the fresh one's own site-packages, so vlmtrain itself is the wheel's.
    site = run([python, "-c", "import site; print(site.getsitepackages()[0])"], tmp_path)
    site = Path(site.stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run([python, "-c", "import vlmtrain; print(vlmtrain.__file__)"], work)
    assert where.stdout.startswith(str(site))

    vlmtrain = venv / "bin" / "vlmtrain"
    job = run([vlmtrain, "recipe=tiny", "--cfg", "job"], work)
    assert "lm_pretrain:" in job.stdout and "backbone: resnet" in job.stdout
    plan = run([vlmtrain, "recipe=llava15", "plan=true", "trainer=gpu", "trainer.devices=8"], work)
    assert "6,738,423,808" in plan.stdout
    steps = [f"stages.{s}.max_steps=2" for s in ("lm_pretrain", "align", "sft")]
    small = [f"data.root={shapes_root}", "data.generate=null", "trainer.progress_bar=false"]
    run([vlmtrain, "recipe=tiny", *small, "stages.sft.eval_limit=2", *steps], work)
    assert (work / "runs" / "default" / "sft" / "artifact" / "manifest.json").is_file()
