"""``vlmtrain chat`` through the command line, on an image the user drew themselves."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import trained_model, write_artifact
from PIL import Image, ImageDraw

from vlmtrain.chat import answer, load_chat_model
from vlmtrain.chat import main as chat_main
from vlmtrain.export import main as export_main

QUESTION = "What colour is the circle?"


def vlmtrain(args: list[str], cwd: Path, check: bool = True, input: str | None = None):
    """The command as a user runs it (tests/test_cli.py's helper, with stdin), in a process
    of its own so that nothing of the test's setup leaks into it."""
    proc = subprocess.run(
        [sys.executable, "-m", "vlmtrain.cli", *args],
        cwd=cwd,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
        input=input,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"vlmtrain {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return proc


def drawn_image(path: Path) -> Path:
    """Not a shapes-world file: another size (so the processor resizes) and hand-drawn."""
    image = Image.new("RGB", (96, 80), "white")
    ImageDraw.Draw(image).ellipse((20, 14, 70, 64), fill=(220, 30, 30))
    image.save(path)
    return path


def greedy(model_dir: Path, image: Path, prompts: list[str]) -> list[str]:
    """The answers chat should print, computed in this process."""
    model, processor, _ = load_chat_model(model_dir)
    gen = dict(
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=processor.tokenizer.eos_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    messages, out = [], []
    for i, text in enumerate(prompts):
        content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": text}]
        messages.append({"role": "user", "content": content})
        reply = answer(model, processor, messages, Image.open(image).convert("RGB"), gen, False)
        messages.append({"role": "assistant", "content": reply})
        out.append(reply)
    return out


def test_chat_one_shot_on_an_export_streams_the_greedy_answer(compose, tmp_path):
    cfg = compose()
    model, tokenizer = trained_model(cfg, steps=40)
    artifact = write_artifact(cfg, model, tokenizer, tmp_path / "run" / "sft" / "artifact")
    export = tmp_path / "export"
    assert export_main([str(artifact), str(export)]) == 0
    image = drawn_image(tmp_path / "mine.png")

    (expected,) = greedy(export, image, [QUESTION])
    assert expected, "the trained model answers something"
    args = ["chat", str(export), "--image", str(image), "--prompt", QUESTION]
    proc = vlmtrain([*args, "--max-new-tokens", "12"], cwd=tmp_path)
    assert proc.stdout.strip() == expected
    assert "LlavaForConditionalGeneration" in proc.stderr

    # The other options, in-process (the same main() the command runs).
    argv = [str(export), "--image", str(image), "--prompt", QUESTION, "--max-new-tokens", "5"]
    assert chat_main([*argv, "--temperature", "1.5", "--top-p", "0.9", "--seed", "3"]) == 0
    with pytest.raises(SystemExit, match="nope.png"):
        chat_main([str(export), "--image", str(tmp_path / "nope.png")])


def test_chat_interactive_on_a_conv_stem_artifact(compose, tmp_path, monkeypatch, capsys):
    """Prompts from stdin, one conversation; an artifact that cannot be exported still
    chats, on vlmtrain's own model."""
    cfg = compose("model.vision.stem=conv", "model.vision.stem_blocks=1")
    model, tokenizer = trained_model(cfg, steps=40)
    artifact = write_artifact(cfg, model, tokenizer, tmp_path / "artifact")
    image = drawn_image(tmp_path / "mine.png")
    prompts = [QUESTION, "How many shapes are there?"]

    torch.manual_seed(0)
    expected = greedy(artifact, image, prompts)
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(prompts) + "\n"))
    assert chat_main([str(artifact), "--image", str(image), "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr()
    assert out.out.strip().splitlines() == expected
    assert "not exportable" in out.err
