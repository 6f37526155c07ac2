"""Helpers several test modules share."""

from __future__ import annotations

from pathlib import Path

from vlmtrain.data.images import ImageProcessor
from vlmtrain.model.vision import VisionSpec, build_image_processor


def image_processor_for(cfg, image_root: str | Path) -> tuple[ImageProcessor, VisionSpec]:
    """The image processor and tower spec of ``cfg.model.vision`` (a config-only tower),
    without building the model."""
    v = cfg.model.vision
    spec = VisionSpec(v.hidden_size, v.image_size, v.patch_size, v.type == "clip")
    return ImageProcessor(build_image_processor(v, spec), spec.patch_size, image_root), spec
