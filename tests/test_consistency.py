"""Self-improvement by consistency: MBR scores, the data sets a generate stage writes, and
later stages naming them (from:<stage>/<file>)."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf
from test_cli import base_args, kill_and_resume, vlmtrain

from vlmtrain.data.preference import load_pairs
from vlmtrain.data.samples import load_samples
from vlmtrain.data.stage_data import resolve_stage_data
from vlmtrain.objectives.consistency import mbr_scores, scored_record, similarity_for, token_f1
from vlmtrain.objectives.generate import write_data


def test_mbr_scores_by_exact_final_answer():
    sim = similarity_for("exact", "answer:")
    samples = ["a at 1 2. answer: left", "left", "answer: right", "b. answer: Left."]
    assert mbr_scores(samples, sim) == pytest.approx([2 / 3, 2 / 3, 0.0, 2 / 3])
    row = scored_record(
        {"id": "q", "images": [], "conversations": [], "type": "position"},
        samples,
        mbr_scores(samples, sim),
    )
    assert row["best"] == samples[0] and row["worst"] == samples[2]


def test_token_f1_for_long_answers():
    assert token_f1("a red circle", "a red circle") == 1.0
    assert token_f1("a red circle", "a blue square") == pytest.approx(1 / 3)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    with pytest.raises(ValueError, match="stage.generate.similarity='no_such.fn'"):
        similarity_for("no_such.fn", "answer:")


def _rows():
    prompt = {"conversations": [{"from": "human", "value": "<image>\nWhere is a?"}]}
    agree = scored_record(
        {**prompt, "id": "p1", "images": ["a.png"], "type": "position"},
        ["left", "left", "right"],
        [0.5, 0.5, 0.0],
    )
    split = scored_record(
        {**prompt, "id": "p2", "images": ["b.png"], "type": "position"},
        ["left", "right", "above"],
        [0.0, 0.0, 0.0],
    )
    return [agree, split]


def test_written_data_sets_read_with_the_existing_loaders(tmp_path):
    fingerprint = write_data(tmp_path, _rows(), min_consistency=0.5)
    assert fingerprint["samples.jsonl"]["rows"] == 2
    sft = load_samples(tmp_path / "sft.jsonl")  # only the prompt whose samples agree
    assert [s["id"] for s in sft] == ["p1"]
    assert sft[0]["messages"][-1] == {"role": "assistant", "content": "left"}
    pairs = load_pairs(tmp_path / "pref.jsonl")  # all-equal scores give no pair
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("left", "right")]
    assert json.loads((tmp_path / "fingerprint.json").read_text())["pref.jsonl"]["rows"] == 1


def test_a_stage_names_an_earlier_stages_data(tmp_path):
    cfg = OmegaConf.create(
        {
            "data": {"datasets": {"self": {"train": "from:gen/sft.jsonl"}, "vqa": {"train": "v"}}},
            "stage": {"mixture": {"self": 1.0, "vqa": 1.0}},
        }
    )
    with pytest.raises(FileNotFoundError, match="data.datasets.self.train.*has not finished"):
        resolve_stage_data(cfg, tmp_path)
    (tmp_path / "gen" / "artifact").mkdir(parents=True)
    (tmp_path / "gen" / "artifact" / "manifest.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="wrote no 'sft.jsonl'"):
        resolve_stage_data(cfg, tmp_path)
    write_data(tmp_path / "gen" / "data", _rows())
    resolved = resolve_stage_data(cfg, tmp_path)
    assert resolved.data.datasets.self.train == str(tmp_path / "gen" / "data" / "sft.jsonl")
    assert cfg.data.datasets.self.train == "from:gen/sft.jsonl", "the caller's config is kept"


@pytest.mark.slow
def test_generate_stage_resumes_exactly_and_feeds_sft(shapes_root, tmp_path):
    """A generate stage killed after step 3 of 4 resumes from its step-2 checkpoint and
    writes the uninterrupted run's files; an SFT stage of the same run trains on its best
    samples by naming the stage. (Killed after step 2, it had no checkpoint yet: the kill
    hook runs before the step's checkpoint is saved, and the rerun started afresh.)"""
    args = [
        *base_args(shapes_root, tmp_path),
        "stage=generate",
        "stage.batch_size=2",
        "stage.max_steps=4",
        "stage.generate.num_samples=4",
        "stage.generate.min_consistency=0",
        "trainer.checkpoint_every=2",
    ]
    kill_and_resume(args, tmp_path, kill_after=3)
    for name in ("samples.jsonl", "sft.jsonl", "pref.jsonl"):
        want = (tmp_path / "straight" / "generate" / "data" / name).read_text()
        assert (tmp_path / "killed" / "generate" / "data" / name).read_text() == want, name
    rows = (tmp_path / "straight" / "generate" / "data" / "samples.jsonl").read_text()
    assert len(rows.splitlines()) == 16  # 4 steps x 2 prompts x accumulate 2
    sft = [
        *base_args(shapes_root, tmp_path),
        "stage=sft",
        "stage.max_steps=2",
        "stage.val_every=0",
        "+data.datasets.self={train: from:generate/sft.jsonl}",
        "~stage.mixture.instruct",
        "+stage.mixture.self=1.0",
        "run_name=straight",
    ]
    vlmtrain(sft, cwd=tmp_path)
    manifest = json.loads(
        (tmp_path / "straight" / "sft" / "artifact" / "manifest.json").read_text()
    )
    assert manifest["data_files"]["self.train"]["path"].endswith("generate/data/sft.jsonl")
