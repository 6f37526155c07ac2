"""Image loading and preprocessing; the number of image tokens comes from the processed pixels.

The count of tokens per image is computed here, from the very tensor that the
vision tower will see, so the placeholder expansion and the tower cannot
disagree.

Loading is checked before any pixel is decoded (the header gives the size):
paths stay inside ``data.root``, and images over ``data.max_image_pixels``
(decompression bombs) or ``data.max_aspect_ratio`` are bad input naming the
sample and file. Decoding is faithful to what the file shows (``to_rgb``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmtrain.data.samples import DataError
from vlmtrain.data.tiling import Tiler, tiler_for

# Transparent pixels are shown over white: what a viewer, a browser or a document shows
# (a black logo on a transparent background stays legible).
ALPHA_BACKGROUND = (255, 255, 255)
SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


@dataclass(frozen=True)
class ImageLimits:
    """``data.max_image_pixels``, ``data.max_aspect_ratio``, ``data.images_outside_root``."""

    max_pixels: int = 89_478_485
    max_aspect_ratio: float = 20.0
    outside_root: bool = False

    @classmethod
    def from_config(cls, data) -> ImageLimits:
        return cls(data.max_image_pixels, data.max_aspect_ratio, data.images_outside_root)


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB image showing what the file shows: EXIF orientation applied; 16-bit and
    32-bit integer modes (I;16*, I) scaled from 0-65535 to 0-255 (PIL clips them at 255);
    float mode F taken as 0-1 when its maximum is at most 1, else as 0-255; alpha (RGBA,
    LA, premultiplied, palette or single-colour transparency) composited over white; CMYK,
    palette, 1-bit, L, YCbCr and the rest through PIL's own conversion."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in SIXTEEN_BIT or mode == "I":
        values = np.asarray(image).astype(np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    has_alpha = "A" in mode or "a" in mode or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class ImageProcessor:
    """Wraps a transformers image processor for one vision tower."""

    def __init__(
        self,
        processor,
        patch_size: int,
        image_root: str | Path,
        downsample: int = 1,
        limits: ImageLimits | None = None,
        tiler: Tiler | None = None,
    ):
        self.processor = processor
        self.tiler = tiler  # dynamic tiling (model.tiling); None: one tower input per image
        self.patch_size = patch_size
        self.downsample = downsample  # patches merged per image token, per side
        self.image_root = Path(image_root)
        self.limits = limits or ImageLimits()

    @classmethod
    def for_model(
        cls, processor, model, model_cfg, image_root: str | Path, limits: ImageLimits | None = None
    ) -> ImageProcessor:
        """The one for ``model`` (a VisionLanguageModel): its tower's patch size, its token
        downsampling and the tiling ``model_cfg.tiling`` asks for, with tiles of the tower's
        resolution; training, eval and chat build it here so they cannot disagree."""
        spec = model.vision_spec
        tiler = tiler_for(model_cfg, spec.image_size)
        return cls(processor, spec.patch_size, image_root, model.token_downsample, limits, tiler)

    def path_of(self, rel_path: str, sample_id: str, source: str) -> Path:
        """The image's file; one outside ``data.root`` (an absolute path, or ``..``) is bad
        input unless allowed. Checked on the names, so symlinks inside the root still work."""
        path = self.image_root / rel_path
        if not self.limits.outside_root:
            root = os.path.abspath(self.image_root)  # lexical: no symlink is followed
            target = os.path.abspath(path)
            if os.path.isabs(rel_path) or not target.startswith(root.rstrip(os.sep) + os.sep):
                raise DataError(
                    sample_id,
                    source,
                    f"image path {rel_path!r} leads outside data.root ({root}); set "
                    "data.images_outside_root=true if the data set means it",
                )
        return path

    def check_size(self, width: int, height: int, path: Path, sample_id: str, source: str):
        limits = self.limits
        if width * height > limits.max_pixels:
            raise DataError(
                sample_id,
                source,
                f"image {str(path)!r} is {width}x{height} = {width * height:,} pixels, over "
                f"data.max_image_pixels={limits.max_pixels:,} (a decompression bomb, or raise it)",
            )
        if min(width, height) and max(width, height) / min(width, height) > limits.max_aspect_ratio:
            raise DataError(
                sample_id,
                source,
                f"image {str(path)!r} is {width}x{height}, an aspect ratio over "
                f"data.max_aspect_ratio={limits.max_aspect_ratio:g}",
            )

    def load(self, rel_path: str, sample_id: str, source: str) -> Image.Image:
        path = self.path_of(rel_path, sample_id, source)
        # PIL's own bomb check would fire first at twice its default; ours is the limit.
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < self.limits.max_pixels:
            Image.MAX_IMAGE_PIXELS = self.limits.max_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    self.check_size(*im.size, path, sample_id, source)  # before decoding
                    image = to_rgb(im)
        except FileNotFoundError:
            raise DataError(sample_id, source, f"image {str(path)!r} not found") from None
        except Image.DecompressionBombError as e:
            raise DataError(
                sample_id,
                source,
                f"image {str(path)!r} is over data.max_image_pixels={self.limits.max_pixels:,} "
                f"({e})",
            ) from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(
                sample_id, source, f"image {str(path)!r} cannot be decoded ({e})"
            ) from None
        if min(image.size) < self.patch_size:
            raise DataError(
                sample_id,
                source,
                f"image {str(path)!r} is {image.size[0]}x{image.size[1]}, smaller than the "
                f"{self.patch_size}px patch",
            )
        return image

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """(num_images, 3, H, W) float tensor."""
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def encode(self, images: list[Image.Image]) -> tuple[torch.Tensor, list[int]]:
        """The tower inputs of one sample's images, (inputs, 3, H, W), and each image's
        token count, counted on those very pixels (with tiling: its tiles x tokens per tile)."""
        if self.tiler is None:
            pixels = self(images)
            return pixels, [self.tokens_per_image(pixels)] * len(images)
        tiles = [self.tiler(image, len(images)) for image in images]
        pixels = self([t for per_image in tiles for t in per_image])
        per_tile = self.tokens_per_image(pixels)
        return pixels, [len(per_image) * per_tile for per_image in tiles]

    def tokens_hint(self, rel_paths: list[str], sample_id: str, source: str) -> int:
        """Image tokens of a sample, for length hints: with tiling, from each image's
        header size through the tiler's own grid choice (nothing decoded); a file that
        cannot be read counts one tile here and fails, named, when the sample is encoded."""
        if self.tiler is None:
            return self.nominal_tokens * len(rel_paths)
        tiles = 0
        for rel in rel_paths:
            try:
                with Image.open(self.path_of(rel, sample_id, source)) as im:
                    tiles += self.tiler.tile_count(*im.size, len(rel_paths))
            except (OSError, ValueError):
                tiles += 1
        return tiles * self.nominal_tokens

    @cached_property
    def nominal_tokens(self) -> int:
        """Image tokens of an image as the processor sizes it, i.e. of one tile when tiling
        (a length hint: a processor that keeps the aspect ratio may give others more)."""
        return self.tokens_per_image(self([Image.new("RGB", (512, 512))]))

    def tokens_per_image(self, pixel_values: torch.Tensor) -> int:
        h, w = pixel_values.shape[-2:]
        cell = self.patch_size * self.downsample
        return (h // cell) * (w // cell)
