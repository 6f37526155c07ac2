"""Every bad data file and image named: unreadable data files, oversized or escaping images,
faithful decoding of every PIL mode, and the skip budget and truncation report of a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import base_args
from test_durability import said, vlmtrain

from vlmtrain.data.images import ImageLimits, ImageProcessor, to_rgb
from vlmtrain.data.samples import DataError, DataFileError, load_samples

GOOD = {
    "id": "a",
    "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}],
}


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("empty.json", b"  \n", "is empty"),
        ("latin1.json", '[{"id": "caf\xe9"}]'.encode("latin-1"), "latin1.json:1: not UTF-8 text"),
        ("broken.json", b'[{"id": "a",}]', "broken.json: not valid JSON"),
        ("lines.json", b'{"id": "a"}\n{"id": "b"}\n', "name the file *.jsonl"),
        ("dict.json", b'{"id": "a"}', "expected a JSON list of samples, got dict"),
        ("scalars.json", b'[{"id": "a"}, 5]', "record #1 must be a JSON object, not int"),
        ("broken.jsonl", b'{"id": "a"}\n\n{"id": \n', "broken.jsonl:3: not valid JSON"),
        ("list.jsonl", b'{"id": "a"}\n[1, 2]\n', "list.jsonl:2: a record must be a JSON object"),
        ("bad_byte.jsonl", b'{"id": "a"}\n{"id": "\xff"}\n', "bad_byte.jsonl:2: not UTF-8 text"),
    ],
)
def test_unreadable_data_file_is_named(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataFileError) as e:
        load_samples(path)
    assert expected in str(e.value) and str(tmp_path) in str(e.value)


def test_malformed_records_are_named(tmp_path):
    path = tmp_path / "d.json"
    for record, expected in [
        ({**GOOD, "conversations": ["hi"]}, "malformed turn 'hi'"),
        ({**GOOD, "image": 5}, "image paths must be non-empty strings"),
    ]:
        path.write_text(json.dumps([GOOD, record]))
        with pytest.raises(DataError, match=expected) as e:
            load_samples(path)
        assert "d.json" in str(e.value)


def _pixel(image: Image.Image, xy=(0, 0)) -> tuple[int, ...]:
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    return rgb.getpixel(xy)


def test_every_mode_decodes_to_the_rgb_it_shows(tmp_path):
    # 16-bit gray from a real PNG: PIL's own conversion clips every value over 255 to white.
    png16 = tmp_path / "g16.png"
    Image.fromarray(np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)).save(png16)
    with Image.open(png16) as im:
        assert im.mode.startswith("I")
        assert [_pixel(im, (x, 0))[0] for x in range(4)] == [0, 4, 128, 255]
    assert _pixel(Image.new("I;16B", (1, 1), 65535)) == (255, 255, 255)
    assert _pixel(Image.new("I", (1, 1), 30000)) == (117, 117, 117)
    assert _pixel(Image.new("F", (1, 1), 0.5)) == (128, 128, 128)  # 0-1 floats
    assert _pixel(Image.new("F", (1, 1), 200.0)) == (200, 200, 200)  # 0-255 floats
    # Alpha over white: a fully transparent red pixel is white, a half transparent one pink.
    assert _pixel(Image.new("RGBA", (1, 1), (255, 0, 0, 0))) == (255, 255, 255)
    assert _pixel(Image.new("RGBA", (1, 1), (255, 0, 0, 128))) == (255, 127, 127)
    assert _pixel(Image.new("LA", (1, 1), (0, 0))) == (255, 255, 255)
    assert _pixel(Image.new("LA", (1, 1), (0, 255))) == (0, 0, 0)
    # A palette PNG whose index 0 is transparent (tRNS), as GIFs and icons are.
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    path = tmp_path / "pal.png"
    pal.save(path, transparency=0)
    with Image.open(path) as im:
        assert im.mode == "P"
        assert _pixel(im, (0, 0)) == (255, 255, 255) and _pixel(im, (1, 0)) == (200, 0, 0)
    assert _pixel(Image.new("CMYK", (1, 1), (255, 0, 0, 0))) == (0, 255, 255)
    assert _pixel(Image.new("CMYK", (1, 1), (0, 0, 0, 255))) == (0, 0, 0)
    assert _pixel(Image.new("1", (1, 1), 1)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    """A 2x1 image stored sideways with orientation 6 (rotate 90 degrees clockwise to view)
    is seen upright: 1x2, its left pixel on top."""
    im = Image.new("RGB", (2, 1))
    im.putpixel((0, 0), (255, 0, 0))
    im.putpixel((1, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.png"
    im.save(path, exif=exif)
    with Image.open(path) as f:
        upright = to_rgb(f)
    assert upright.size == (1, 2)
    assert upright.getpixel((0, 0)) == (255, 0, 0) and upright.getpixel((0, 1)) == (0, 0, 255)


def _processor(root: Path, **limits) -> ImageProcessor:
    return ImageProcessor(None, 8, root, limits=ImageLimits(**limits))


def test_oversized_stretched_and_escaping_images_are_named(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    # 40000 x 40000 one-bit pixels: a few kB of PNG, 1.6 G pixels once decoded.
    Image.new("1", (40000, 40000)).save(root / "bomb.png")
    Image.new("RGB", (200, 100)).save(root / "big.png")
    Image.new("RGB", (16, 400)).save(root / "strip.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "outside.png")
    cases = [
        (_processor(root), "bomb.png", "over data.max_image_pixels=89,478,485"),
        (_processor(root, max_pixels=10_000), "big.png", "200x100 = 20,000 pixels, over"),
        (_processor(root), "strip.png", "16x400, an aspect ratio over data.max_aspect_ratio=20"),
        (_processor(root), "../outside.png", "leads outside data.root"),
        (_processor(root), str(tmp_path / "outside.png"), "leads outside data.root"),
    ]
    for images, rel, expected in cases:
        with pytest.raises(DataError, match="sample 's1' \\(f.json\\)") as e:
            images.load(rel, "s1", "f.json")
        assert expected in str(e.value), str(e.value)
    # Allowed when configured; a symlink inside the root is inside the root.
    assert _processor(root, outside_root=True).load("../outside.png", "s", "f").size == (16, 16)
    (root / "link").symlink_to(tmp_path)
    assert _processor(root).load("link/outside.png", "s", "f").size == (16, 16)


def _with_bad_images(shapes_root: Path, tmp_path: Path, n_bad: int) -> Path:
    """A caption data file of 16 samples, ``n_bad`` of them with a missing image."""
    records = json.loads((shapes_root / "caption_train.json").read_text())[: 16 - n_bad]
    for i in range(n_bad):
        records.insert(3 + 5 * i, {**records[i], "id": f"bad-{i}", "image": f"images/none-{i}.png"})
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(records))
    return path


def test_bad_images_fail_or_are_skipped_within_the_budget(shapes_root, tmp_path):
    data = _with_bad_images(shapes_root, tmp_path, 2)
    args = [
        *base_args(shapes_root, tmp_path),
        "stage=align",
        "stage.max_steps=2",  # one epoch: every sample is seen
        f"+data.datasets.mine={{train: {data}}}",
        "stage.mixture.caption=0",
        "+stage.mixture.mine=1.0",
    ]
    failed = vlmtrain([*args, "run_name=strict"], cwd=tmp_path, check=False)
    assert failed.returncode != 0
    assert "sample 'bad-" in failed.stderr and str(data) in failed.stderr
    assert "none-" in failed.stderr and "not found" in failed.stderr

    over = vlmtrain([*args, "run_name=over", "data.max_skipped=1"], cwd=tmp_path, check=False)
    assert over.returncode != 0
    assert "2 bad samples skipped, over data.max_skipped=1" in said(over)

    ok = vlmtrain([*args, "run_name=ok", "data.max_skipped=2", "stage.max_length=96"], cwd=tmp_path)
    text = said(ok)
    assert "mine: 2 bad samples skipped" in text or "2 bad samples skipped" in text
    assert "skipped: sample 'bad-0'" in text and "skipped: sample 'bad-1'" in text
    assert "were cut at stage.max_length=96" in text
    manifest = json.loads((tmp_path / "ok" / "align" / "artifact" / "manifest.json").read_text())
    assert manifest["metrics"]["data/skipped/mine"] == 2
    assert manifest["metrics"]["data/seen/mine"] == 16
    assert 0 < manifest["metrics"]["data/truncated/mine"] <= 16
    assert sorted(manifest["skipped_samples"]) == ["mine/bad-0", "mine/bad-1"]


def test_unreadable_data_file_through_the_cli(shapes_root, tmp_path):
    bad = tmp_path / "mine.jsonl"
    shutil.copy(shapes_root / "text_train.jsonl", bad)
    with bad.open("ab") as f:
        f.write(b'{"id": "x", "text": "caf\xe9"}\n')
    n_lines = len(bad.read_bytes().splitlines())
    args = [
        *base_args(shapes_root, tmp_path),
        "stage=lm_pretrain",
        "stage.max_steps=1",
        f"+data.datasets.mine={{train: {bad}}}",
        "stage.mixture.text=0",
        "+stage.mixture.mine=1.0",
    ]
    proc = vlmtrain(args, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert f"data file {bad}:{n_lines}: not UTF-8 text" in said(proc)
