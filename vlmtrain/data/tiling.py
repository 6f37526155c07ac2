"""Dynamic high resolution (InternVL 1.5 onward): an image becomes a grid of tower-sized tiles.

The grid is the one of ``min_tiles..max_tiles`` tiles whose aspect ratio is closest
to the image's; the image is stretched (not letterboxed) to that grid, cut row by
row, and, when there is more than one tile, a thumbnail of the whole image is
appended. Each tile is one tower input, so an image's token count is tiles x tokens
per tile. The grid choice reproduces InternVL's ``dynamic_preprocess`` bit for bit,
including its float comparisons and its tie-break (on equal aspect distance, a later,
larger grid wins only when the image covers more than half of its pixels).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from PIL import Image


@lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (cols, rows) with min_tiles <= cols*rows <= max_tiles, fewest tiles first.

    Two grids of one tile count can tie on aspect distance (1x2 and 2x1 for a 5:4 image
    when 1x1 is excluded); the first one seen then wins unless the tie-break takes the
    second. InternVL orders such grids as a Python set of the grids, built by tile count
    then columns then rows, iterates them; the set is built and sorted the same way here
    (a stable sort by tile count only), so even these ties resolve as InternVL's do.
    """
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"tiles: need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    grids = {
        (c, r)
        for n in range(min_tiles, max_tiles + 1)
        for c in range(1, n + 1)
        for r in range(1, n + 1)
        if min_tiles <= c * r <= max_tiles
    }
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def tile_grid(
    width: int, height: int, *, min_tiles: int = 1, max_tiles: int = 12, tile_size: int = 448
) -> tuple[int, int]:
    """(cols, rows) of the tile grid for a ``width`` x ``height`` image."""
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def tile_image(
    image: Image.Image, cols: int, rows: int, tile_size: int, thumbnail: bool = True
) -> list[Image.Image]:
    """The image stretched to ``cols*tile_size`` x ``rows*tile_size`` and cut row-major,
    plus the whole image at ``tile_size`` when there is more than one tile and
    ``thumbnail`` is on. PIL's default (bicubic) resampling, as InternVL's ``resize``."""
    resized = image.resize((cols * tile_size, rows * tile_size), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return tiles


@dataclass(frozen=True)
class Tiler:
    """One stage's tiling (``model.tiling``, tile size = the tower's image size)."""

    tile_size: int
    min_tiles: int = 1
    max_tiles: int = 12
    thumbnail: bool = True

    def __post_init__(self):
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(
                "model.tiling: need 1 <= min_tiles <= max_tiles, got "
                f"min_tiles={self.min_tiles}, max_tiles={self.max_tiles}"
            )

    def budget(self, n_images: int) -> int:
        """Images of one sample share the tile budget (InternVL: max(1, max_tiles // n))."""
        return max(1, self.max_tiles // max(1, n_images))

    def tile_count(self, width: int, height: int, n_images: int = 1) -> int:
        """Tower inputs for one image of a sample with ``n_images`` images."""
        cols, rows = self._grid(width, height, n_images)
        n = cols * rows
        return n + 1 if self.thumbnail and n > 1 else n

    def __call__(self, image: Image.Image, n_images: int = 1) -> list[Image.Image]:
        cols, rows = self._grid(*image.size, n_images)
        return tile_image(image, cols, rows, self.tile_size, self.thumbnail)

    def _grid(self, width: int, height: int, n_images: int) -> tuple[int, int]:
        budget = self.budget(n_images)
        return tile_grid(
            width,
            height,
            min_tiles=min(self.min_tiles, budget),
            max_tiles=budget,
            tile_size=self.tile_size,
        )


def tiler_for(model_cfg, image_size: int) -> Tiler | None:
    """The tiler ``model.tiling`` asks for, with tiles of the tower's ``image_size``."""
    t = model_cfg.tiling
    if not t.enabled:
        return None
    return Tiler(image_size, t.min_tiles, t.max_tiles, t.thumbnail)


def max_tower_inputs(model_cfg) -> int:
    """Tower inputs (tiles) of one image at most: 1 untiled; max_tiles (+ thumbnail)."""
    t = model_cfg.tiling
    if not t.enabled:
        return 1
    return t.max_tiles + (1 if t.thumbnail and t.max_tiles > 1 else 0)
