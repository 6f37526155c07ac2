"""Bounding boxes as text, Qwen-VL style: integer corners normalized to 0-999.

One fixed format, ``BOX_FORMAT``, for what the data writes and what evaluation parses:
``<box>(x1,y1),(x2,y2)</box>`` with (x1, y1) the top-left and (x2, y2) the bottom-right
corner. A pixel coordinate ``v`` of an image ``size`` pixels wide (or high) becomes
``min(999, v * 1000 // size)``, so the text is independent of the image's resolution and
every box of the same object reads the same whatever canvas or tower sees it.
"""

from __future__ import annotations

import re

BOX_FORMAT = "<box>({x1},{y1}),({x2},{y2})</box>"
BOX_SCALE = 1000  # coordinates are integers in [0, BOX_SCALE - 1]
IOU_THRESHOLD = 0.5  # a predicted box is right when its IoU with the reference reaches this

Box = tuple[int, int, int, int]  # x1, y1, x2, y2

# Whitespace tolerated inside the tags; anything else (a missing corner, a float) is not a box.
_BOX_RE = re.compile(
    r"<box>\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*</box>"
)


def normalize_box(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> Box:
    """Pixel corners (x2, y2 exclusive edges) of a ``width`` x ``height`` image -> 0-999."""

    def norm(v: float, size: int) -> int:
        return max(0, min(BOX_SCALE - 1, int(v * BOX_SCALE // size)))

    return norm(x1, width), norm(y1, height), norm(x2, width), norm(y2, height)


def format_box(box: Box) -> str:
    x1, y1, x2, y2 = box
    return BOX_FORMAT.format(x1=x1, y1=y1, x2=x2, y2=y2)


def parse_box(text: str) -> Box | None:
    """The box in ``text`` when it is exactly one box in ``BOX_FORMAT`` (surrounding
    whitespace aside) with coordinates in 0-999; else None. Corners in the wrong order
    still parse: such a box is empty, and ``iou`` gives it 0."""
    m = _BOX_RE.fullmatch(text.strip())
    if m is None:
        return None
    x1, y1, x2, y2 = (int(g) for g in m.groups())
    return None if max(x1, y1, x2, y2) >= BOX_SCALE else (x1, y1, x2, y2)


def _area(b: Box) -> int:
    return max(0, b[2] - b[0]) * max(0, b[3] - b[1])


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes in the same (normalized) coordinates."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy if _area(a) and _area(b) else 0
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0
