"""Dynamic tiling (InternVL 1.5+): the grid choice, the tiler, and the token counts that
follow each image from its pixels into placeholders, batches and the model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmtrain.data.encode import collate
from vlmtrain.data.samples import DataError, load_samples
from vlmtrain.data.tiling import Tiler, tile_grid, tile_image
from vlmtrain.model.lm import load_tokenizer
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.train import make_encoder

# (width, height, min_tiles, max_tiles) -> (cols, rows), at the default 448 px tile, worked
# out by hand from InternVL's rule (closest aspect ratio; on an exact tie a later, larger
# grid wins only when the image's area exceeds half the grid's pixels).
CHECK_VECTORS = [
    ((448, 448, 1, 12), (1, 1)),  # ties 2x2 and 3x3 on ratio, but covers 1 tile of pixels
    ((896, 896, 1, 12), (2, 2)),  # 4 tiles of pixels > half of 2x2, not > half of 3x3
    ((1344, 1344, 1, 12), (3, 3)),
    ((1344, 1344, 1, 6), (2, 2)),
    ((800, 600, 1, 12), (4, 3)),  # exact 4:3
    ((1920, 1080, 1, 12), (4, 2)),  # 16:9: 2x1 and 4x2 tie at 2.0; big enough for 4x2
    ((1920, 1080, 1, 6), (2, 1)),
    ((1000, 100, 1, 12), (10, 1)),
    ((1000, 100, 1, 6), (6, 1)),
    ((100, 1000, 1, 12), (1, 10)),
    ((150, 100, 1, 12), (3, 2)),  # small images are upscaled into many tiles
    ((672, 448, 1, 2), (2, 1)),  # 1.5 ties 1x1 and 2x1 on distance; 1.5 tiles > half of 2
    ((150, 100, 1, 2), (1, 1)),  # the same tie, too small for 2x1
    ((500, 400, 1, 6), (1, 1)),  # 1.25 ties 1x1 and 3x2; 200,000 px <= half of 6 tiles
    ((500, 400, 2, 2), (1, 2)),  # 1x2 and 2x1 tie; 200,000 px is not > 200,704: first stays
    ((448, 448, 2, 12), (2, 2)),  # min_tiles excludes 1x1
    ((10, 10, 1, 12), (1, 1)),
]


@pytest.mark.parametrize(("args", "grid"), CHECK_VECTORS)
def test_tile_grid_check_vectors(args, grid):
    w, h, lo, hi = args
    assert tile_grid(w, h, min_tiles=lo, max_tiles=hi) == grid
    assert tile_grid(w, h, min_tiles=lo, max_tiles=hi, tile_size=448) == grid


def test_tile_grid_scales_with_tile_size():
    # The same shapes at a quarter of the tile size choose the same grids.
    for (w, h, lo, hi), grid in CHECK_VECTORS:
        if w % 4 == 0 and h % 4 == 0:
            assert tile_grid(w // 4, h // 4, min_tiles=lo, max_tiles=hi, tile_size=112) == grid


def test_tiles_are_row_major_stretched_with_a_thumbnail():
    """A 3x2 grid of colours, 60x20 px (aspect 3, so 3x1 tiles at 2..3 tiles): stretched,
    not letterboxed, cut left to right, then the thumbnail; one tile: no thumbnail."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    image = Image.new("RGB", (60, 20))
    for i, c in enumerate(colours):
        image.paste(c, (20 * i, 0, 20 * (i + 1), 20))
    assert tile_grid(60, 20, min_tiles=1, max_tiles=3, tile_size=16) == (3, 1)
    tiles = Tiler(16, max_tiles=3)(image)
    assert len(tiles) == 4 and all(t.size == (16, 16) for t in tiles)
    for tile, colour in zip(tiles, colours, strict=False):
        assert tile.getpixel((8, 8)) == colour
    thumb = tiles[3]
    assert [thumb.getpixel((x, 8)) for x in (2, 8, 13)] == colours
    assert len(tile_image(image, 1, 1, 16)) == 1
    assert len(Tiler(16, max_tiles=3, thumbnail=False)(image)) == 3
    # A sample's images share the budget: two images get max(1, 3 // 2) = 1 tile each.
    assert Tiler(16, max_tiles=3).tile_count(60, 20, n_images=2) == 1
    with pytest.raises(ValueError, match="min_tiles"):
        Tiler(16, min_tiles=4, max_tiles=3)


TILED = (
    "stage=sft",
    "model/projector=pixel_shuffle_mlp",
    "model.vision.image_size=32",
    "model.tiling.enabled=true",
    "model.tiling.max_tiles=4",
)


def _tiled_setup(compose, *extra):
    cfg = compose(*TILED, *extra)
    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    torch.manual_seed(0)
    model = VisionLanguageModel.build(cfg.model, tokenizer).eval()
    return cfg, tokenizer, model, make_encoder(cfg, model, tokenizer)


def test_tiled_samples_expand_and_scatter_per_sample(compose, shapes_root, tmp_path):
    """64 px shapes images at 32 px tiles: 2x2 tiles + thumbnail = 5 tower inputs of
    4x4 patches, 2x2 tokens each after pixel shuffle = 20 image tokens; a 64x32 image:
    2x1 + thumbnail = 3 inputs, 12 tokens. A batch mixing them gives each sample its own
    tiles' features: the same embeddings as each sample alone."""
    cfg, tokenizer, model, encoder = _tiled_setup(compose, "data.images_outside_root=true")
    assert model.tokens_per_image == 4
    vqa = load_samples(shapes_root / "vqa_train.json")
    square = encoder(vqa[0])
    assert square["pixel_values"].shape == (5, 3, 32, 32)
    assert int((square["input_ids"] == encoder.image_token_id).sum()) == 20
    wide_image = tmp_path / "wide.png"
    Image.open(shapes_root / vqa[1]["images"][0]).resize((64, 32)).save(wide_image)
    wide = encoder({**vqa[1], "images": [str(wide_image)]})
    assert wide["pixel_values"].shape[0] == 3
    assert int((wide["input_ids"] == encoder.image_token_id).sum()) == 12
    # Length hints take each image's size from its header, through the same grid choice.
    assert encoder.images.tokens_hint([str(wide_image)], "w", "f") == 12
    assert encoder.images.tokens_hint(vqa[0]["images"], "s", "f") == 20

    batch = collate([square, wide], tokenizer.pad_token_id)
    assert batch["image_counts"].tolist() == [5, 3]
    with torch.no_grad():
        together = model.embed(batch["input_ids"], batch["pixel_values"])
        for row, sample in enumerate((square, wide)):
            alone = model.embed(sample["input_ids"][None], sample["pixel_values"])[0]
            assert torch.allclose(together[row, : len(alone)], alone, atol=1e-6)


def test_tiny_and_stretched_images_are_named_errors(compose, shapes_root, tmp_path):
    cfg, _, _, encoder = _tiled_setup(
        compose, f"data.root={tmp_path}", f"model.tokenizer={shapes_root / 'tokenizer'}"
    )
    Image.new("RGB", (6, 40)).save(tmp_path / "sliver.png")  # narrower than the 8 px patch
    Image.new("RGB", (30 * 16, 16)).save(tmp_path / "banner.png")  # 30:1 > max_aspect_ratio
    sample = load_samples(shapes_root / "vqa_train.json")[0]
    for name, expected in (("sliver.png", "smaller than the 8px patch"), ("banner.png", "aspect")):
        bad = {**sample, "id": "bad-1", "images": [name]}
        with pytest.raises(DataError, match=rf"sample 'bad-1' .*{name}.*{expected}"):
            encoder(bad)
