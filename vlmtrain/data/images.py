"""Image loading and preprocessing; the number of image tokens comes from the processed pixels.

The count of tokens per image is computed here, from the very tensor that the
vision tower will see, so the placeholder expansion and the tower cannot
disagree.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from vlmtrain.data.samples import DataError


class ImageProcessor:
    """Wraps a transformers image processor for one vision tower."""

    def __init__(self, processor, patch_size: int, image_root: str | Path, downsample: int = 1):
        self.processor = processor
        self.patch_size = patch_size
        self.downsample = downsample  # patches merged per image token, per side
        self.image_root = Path(image_root)

    def load(self, rel_path: str, sample_id: str, source: str) -> Image.Image:
        path = self.image_root / rel_path
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except FileNotFoundError:
            raise DataError(sample_id, source, f"image {str(path)!r} not found") from None
        except (UnidentifiedImageError, OSError) as e:
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

    @cached_property
    def nominal_tokens(self) -> int:
        """Image tokens of an image as the processor sizes it (a length hint: an image
        processor that tiles or keeps the aspect ratio may give others more)."""
        return self.tokens_per_image(self([Image.new("RGB", (512, 512))]))

    def tokens_per_image(self, pixel_values: torch.Tensor) -> int:
        h, w = pixel_values.shape[-2:]
        cell = self.patch_size * self.downsample
        return (h // cell) * (w // cell)
