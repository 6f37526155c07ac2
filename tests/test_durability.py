"""Durability as a cluster user meets it, through the command line: kills in the middle of a
checkpoint write with TMPDIR on another file system, damaged checkpoints, checkpoints that
do not fit the run, stale data, damaged artifacts and reports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_cli import base_args
from test_cli import vlmtrain as _vlmtrain

from vlmtrain.checkpoints import KILL_DURING_WRITE_ENV

STAGE = ["stage=sft", "stage.max_steps=6", "trainer.checkpoint_every=2"]


def vlmtrain(args: list[str], cwd: Path, env: dict | None = None, check: bool = True):
    # Wide enough that rich never wraps a path in the messages checked here.
    return _vlmtrain(args, cwd, {"COLUMNS": "1000", **(env or {})}, check)


def said(proc) -> str:
    """stdout and stderr with rich's line wrapping undone."""
    return " ".join((proc.stdout + proc.stderr).split())


def weights(artifact: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(artifact.glob("*.safetensors")):
        # clone: load_file maps the file, and the tests rewrite artifacts in place
        out.update({f"{f.stem}.{k}": v.clone() for k, v in load_file(f).items()})
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def checkpoint_names(stage_dir: Path) -> list[str]:
    return sorted(p.name for p in (stage_dir / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def straight(shapes_root, tmp_path_factory) -> Path:
    """The artifact of the stage run without interruption."""
    out = tmp_path_factory.mktemp("straight")
    vlmtrain([*base_args(shapes_root, out), *STAGE, "run_name=straight"], cwd=out)
    return out / "straight" / "sft" / "artifact"


@pytest.fixture()
def two_file_systems(tmp_path):
    """(run directory, TMPDIR) on two different file systems: two tmpfs mounts when this
    process may mount (root), else the test's directory and /dev/shm."""
    run_fs, tmp_fs = tmp_path / "run_fs", tmp_path / "tmp_fs"
    run_fs.mkdir()
    tmp_fs.mkdir()
    mounted = []
    if os.geteuid() == 0:
        for d in (run_fs, tmp_fs):
            proc = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(d)], capture_output=True
            )
            if proc.returncode == 0:
                mounted.append(d)
    if len(mounted) < 2 and Path("/dev/shm").is_dir():
        tmp_fs = Path("/dev/shm") / f"vlmtrain-test-{os.getpid()}-{tmp_path.name}"
        tmp_fs.mkdir()
    if run_fs.stat().st_dev == tmp_fs.stat().st_dev:
        pytest.skip("no second file system to put TMPDIR on")
    yield run_fs, tmp_fs
    for d in mounted:
        subprocess.run(["umount", str(d)], capture_output=True)
    if tmp_fs.parent == Path("/dev/shm"):
        shutil.rmtree(tmp_fs, ignore_errors=True)


def files_under(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()]


def test_kill_during_checkpoint_write_with_tmpdir_elsewhere(
    shapes_root, straight, two_file_systems
):
    """SIGKILL with a third of step 4's checkpoint written, TMPDIR on another file system:
    step 2's checkpoint still loads (weights-only), nothing is left in TMPDIR, the partial
    file beside the target is cleared at the rerun, and the artifact equals the
    uninterrupted run's."""
    run_fs, tmp_fs = two_file_systems
    args = [*base_args(shapes_root, run_fs), *STAGE, "run_name=killed"]
    env = {"TMPDIR": str(tmp_fs)}
    killed = vlmtrain(args, cwd=run_fs, env={**env, KILL_DURING_WRITE_ENV: "4:700000"}, check=False)
    assert killed.returncode != 0, "the kill hook did not fire"
    stage_dir = run_fs / "killed" / "sft"
    names = checkpoint_names(stage_dir)
    assert names[-1] == "step-0000002.ckpt" and names[0].startswith(".step-0000004.ckpt.")
    assert (stage_dir / "checkpoints" / names[0]).stat().st_size >= 700000
    ckpt = torch.load(stage_dir / "checkpoints" / names[-1], weights_only=True)
    assert ckpt["global_step"] == 2
    assert files_under(tmp_fs) == []

    resumed = vlmtrain(args, cwd=run_fs, env=env)
    text = said(resumed)
    assert f"removed {names[0]}" in text and "resuming from" in text and names[-1] in text
    assert checkpoint_names(stage_dir) == ["step-0000004.ckpt", "step-0000006.ckpt"]
    assert files_under(tmp_fs) == []
    assert_same_weights(stage_dir / "artifact", straight)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(shapes_root, straight, tmp_path):
    """The newest checkpoint loses a block (zeroed, as after a crash of an unsynced file
    system): it is set aside with a message naming it, the run resumes from the previous
    one, and the artifact equals the uninterrupted run's."""
    args = [*base_args(shapes_root, tmp_path), *STAGE, "run_name=damaged"]
    vlmtrain(args, cwd=tmp_path, env={"VLMTRAIN_KILL_AFTER_STEP": "5"}, check=False)
    stage_dir = tmp_path / "damaged" / "sft"
    assert checkpoint_names(stage_dir) == ["step-0000002.ckpt", "step-0000004.ckpt"]
    newest = stage_dir / "checkpoints" / "step-0000004.ckpt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)
    newest.write_bytes(bytes(data))

    resumed = vlmtrain(args, cwd=tmp_path)
    text = said(resumed)
    assert f"checkpoint {newest} is damaged" in text
    assert "set aside as step-0000004.ckpt.damaged" in text
    assert "resuming from the previous checkpoint, step-0000002.ckpt" in text
    assert (stage_dir / "checkpoints" / "step-0000004.ckpt.damaged").is_file()
    assert_same_weights(stage_dir / "artifact", straight)


def _rewrite(path: Path, edit) -> None:
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _other_shape(ckpt: dict) -> None:
    key = next(k for k in ckpt["state_dict"] if k.endswith("embed_tokens.weight"))
    ckpt["state_dict"][key] = ckpt["state_dict"][key][:-3]


UNUSABLE = {
    # case: (edit of the only checkpoint, extra overrides, what the error must say)
    "damaged, no fallback": (_truncate, [], ["no checkpoint in", "reads back", "delete"]),
    "changed config": (None, ["stage.optim.lr=0.01"], ["stage.optim.lr: 0.001 -> 0.01"]),
    "other process count": (  # a DeepSpeed checkpoint is partitioned per process
        lambda p: _rewrite(p, lambda c: c["vlmtrain"].update(world_size=2, strategy="deepspeed")),
        [],
        ["written by a run of 2 processes; this run has 1", "same trainer.devices"],
    ),
    "other step size": (  # two processes made steps of twice the samples
        lambda p: _rewrite(p, lambda c: c["vlmtrain"].update(world_size=2)),
        [],
        ["samples per optimizer step: 16 -> 8", "stage.global_batch_size=16"],
    ),
    "other model shape": (
        lambda p: _rewrite(p, _other_shape),
        [],
        ["holds another model shape", "embed_tokens.weight: checkpoint"],
    ),
    "not weights only": (
        lambda p: _rewrite(p, lambda c: c.update(extra=Fraction(1, 3))),
        [],
        ["will not load it", "fractions.Fraction"],
    ),
}


@pytest.fixture(scope="module")
def interrupted(shapes_root, tmp_path_factory) -> Path:
    """A run directory whose stage was killed after step 3: one checkpoint, step 2."""
    out = tmp_path_factory.mktemp("interrupted")
    args = [*base_args(shapes_root, out), *STAGE, "run_name=cut"]
    vlmtrain(args, cwd=out, env={"VLMTRAIN_KILL_AFTER_STEP": "3"}, check=False)
    assert checkpoint_names(out / "cut" / "sft") == ["step-0000002.ckpt"]
    return out / "cut"


@pytest.mark.parametrize(
    "case",
    [
        "changed config",
        pytest.param("damaged, no fallback", marks=pytest.mark.slow),
        pytest.param("other process count", marks=pytest.mark.slow),
        pytest.param("other step size", marks=pytest.mark.slow),
        pytest.param("other model shape", marks=pytest.mark.slow),
        pytest.param("not weights only", marks=pytest.mark.slow),
    ],
)
def test_unusable_checkpoint_is_an_error_saying_what_to_do(
    shapes_root, interrupted, tmp_path, case
):
    edit, overrides, expected = UNUSABLE[case]
    run = tmp_path / "cut"
    shutil.copytree(interrupted, run)
    ckpt = run / "sft" / "checkpoints" / "step-0000002.ckpt"
    if edit:
        edit(ckpt)
    args = [*base_args(shapes_root, tmp_path), *STAGE, "run_name=cut", *overrides]
    proc = vlmtrain(args, cwd=tmp_path, check=False)
    text = said(proc)
    assert proc.returncode != 0
    for phrase in expected:
        assert phrase in text, (phrase, text[-3000:])
    assert "weights_only=False" not in text
    assert ckpt.is_file(), "an unusable checkpoint is left where it is"
    assert not (run / "sft" / "artifact").exists()
    if case in ("changed config", "other process count"):  # found before any model is built
        assert "parameters" not in proc.stdout
    starts = (run / "sft" / "invocations.jsonl").read_text().splitlines()
    assert len(starts) == 1, "a refused invocation changes no record of the run"


def _finished_on_own_data(shapes_root: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """A finished align stage trained on a copy of the shapes data; (its args, data root)."""
    root = tmp_path / "data"
    shutil.copytree(shapes_root, root, ignore=shutil.ignore_patterns("tokenizer"))
    args = [
        *base_args(shapes_root, tmp_path),
        f"data.root={root}",
        f"model.tokenizer={shapes_root / 'tokenizer'}",
        "stage=align",
        "stage.max_steps=2",
        "run_name=stale",
    ]
    vlmtrain(args, cwd=tmp_path)
    return args, root


def test_edited_data_makes_a_finished_stage_stale(shapes_root, tmp_path):
    """A finished stage is reused only with the data it was trained on: an edited record
    is named, and the stage is not reported finished."""
    args, root = _finished_on_own_data(shapes_root, tmp_path)
    captions = root / "caption_train.json"
    records = json.loads(captions.read_text())
    records[0]["conversations"][1]["value"] = "a large red square."
    captions.write_text(json.dumps(records))
    edited = vlmtrain(args, cwd=tmp_path, check=False)
    text = said(edited)
    assert edited.returncode != 0 and "already finished" in text
    assert f"data file {captions} (caption.train) changed since the stage ran" in text


@pytest.mark.slow
def test_replaced_image_makes_a_finished_stage_stale(shapes_root, tmp_path):
    """The same bytes again is the same data (mtime alone does not count for data files);
    a replaced image is named through the data file that names it."""
    args, root = _finished_on_own_data(shapes_root, tmp_path)
    captions = root / "caption_train.json"
    records = json.loads(captions.read_text())
    captions.write_text(captions.read_text())  # new mtime, same content
    assert "already finished" in said(vlmtrain(args, cwd=tmp_path))
    Image.new("RGB", (64, 64), (1, 2, 3)).save(root / records[1]["image"])
    replaced = vlmtrain(args, cwd=tmp_path, check=False)
    assert replaced.returncode != 0
    assert f"images named by {captions} (caption.train) changed" in said(replaced)


def test_damaged_artifact_is_trained_again(shapes_root, tmp_path):
    """A truncated weight file: the artifact is not taken as finished but set aside, and the
    stage finishes again from its newest checkpoint with the same weights."""
    args = [*base_args(shapes_root, tmp_path), *STAGE, "run_name=art"]
    vlmtrain(args, cwd=tmp_path)
    stage_dir = tmp_path / "art" / "sft"
    before = weights(stage_dir / "artifact")
    lm = stage_dir / "artifact" / "lm.safetensors"
    lm.write_bytes(lm.read_bytes()[:-1000])
    again = vlmtrain(args, cwd=tmp_path)
    text = said(again)
    assert f"its artifact {stage_dir / 'artifact'} is damaged" in text
    assert f"{lm} is" in text and "the manifest says" in text
    assert "resuming from" in text and "step-0000006.ckpt" in text
    assert (stage_dir / "artifact.damaged" / "lm.safetensors").is_file()
    after = weights(stage_dir / "artifact")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_damaged_reports_are_written_again(shapes_root, tmp_path):
    """A truncated eval.json (an older, non-atomic write cut short) and summary.json are
    written again when the command is run again, not a crash on every re-run."""
    args = [
        *base_args(shapes_root, tmp_path),
        *STAGE,
        "run_name=art",
        "stage.eval_splits=[test]",
        "stage.eval_limit=4",
    ]
    vlmtrain(args, cwd=tmp_path)
    stage_dir = tmp_path / "art" / "sft"
    report = stage_dir / "eval" / "eval.json"
    summary = tmp_path / "art" / "summary.json"
    results = json.loads(report.read_text())
    report.write_text(report.read_text()[:20])
    summary.write_text("[{")
    third = vlmtrain(args, cwd=tmp_path)
    assert "already finished" in said(third)
    rewritten = json.loads(report.read_text())
    assert rewritten.keys() == results.keys()
    for split, result in results.items():  # all but the time it took
        assert {k: v for k, v in rewritten[split].items() if k != "seconds"} == {
            k: v for k, v in result.items() if k != "seconds"
        }, split
    assert (
        json.loads(summary.read_text())[0]["eval"]["test"] == results["test"]["overall"]["accuracy"]
    )


def test_read_report_takes_a_damaged_report_for_missing(tmp_path):
    from vlmtrain.eval import read_report, write_report

    results = {"test": {"overall": {"accuracy": 0.5, "n": 2}, "per_type": {}}}
    write_report(results, tmp_path)
    assert read_report(tmp_path) == results
    assert not list(tmp_path.glob(".*"))  # no partial file left beside the reports
    (tmp_path / "eval.json").write_text('{"test": {"overall"')
    assert read_report(tmp_path) is None
    write_report(results, tmp_path)
    (tmp_path / "eval.md").unlink()
    assert read_report(tmp_path) is None
