"""Drawing the region a Sherlock record points at into its image.

Boxes are ``(left, top, width, height)`` in the pixels of the original image,
given as tuples or as the dicts of the Sherlock JSON. ``highlight`` reproduces
the look of the official Sherlock baselines (a translucent pink fill and a
green outline, composited over the image), so checkpoints trained here see the
same pixels as checkpoints trained with the official code.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

from .schemas import REGION_MODES  # noqa: F401  (defined with the recipe schema; re-exported here)

Box = Tuple[float, float, float, float]
BoxLike = Union[Mapping[str, float], Sequence[float]]

# The official colours: #ff05cd with alpha 0x3c, outline #05ff37, 3 px.
HIGHLIGHT_FILL = (255, 5, 205, 0x3C)
HIGHLIGHT_OUTLINE = (5, 255, 55, 255)
HIGHLIGHT_WIDTH = 3


def to_box(b: BoxLike) -> Box:
    """A Sherlock box dict or a 4-sequence -> ``(left, top, width, height)`` floats."""
    if isinstance(b, Mapping):
        return (float(b["left"]), float(b["top"]), float(b["width"]), float(b["height"]))
    left, top, width, height = b
    return (float(left), float(top), float(width), float(height))


def clamp_box(box: BoxLike, size: Tuple[int, int]) -> Optional[Box]:
    """Clip a box to an image of ``size=(W, H)``; None when no part of it is inside."""
    W, H = size
    l, t, w, h = to_box(box)
    x0, y0 = min(max(l, 0.0), W), min(max(t, 0.0), H)
    x1, y1 = min(max(l + w, 0.0), W), min(max(t + h, 0.0), H)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None
    return (x0, y0, x1 - x0, y1 - y0)


def clamp_boxes(boxes: Iterable[BoxLike], size: Tuple[int, int]) -> List[Box]:
    out = []
    for b in boxes:
        c = clamp_box(b, size)
        if c is not None:
            out.append(c)
    return out


def union_box(boxes: Sequence[BoxLike]) -> Box:
    """The smallest box holding all ``boxes`` (there must be at least one)."""
    bs = [to_box(b) for b in boxes]
    if not bs:
        raise ValueError("union_box needs at least one box")
    x0 = min(b[0] for b in bs)
    y0 = min(b[1] for b in bs)
    x1 = max(b[0] + b[2] for b in bs)
    y1 = max(b[1] + b[3] for b in bs)
    return (x0, y0, x1 - x0, y1 - y0)


def highlight(image: Image.Image, boxes: Sequence[BoxLike], scale: float = 1.0) -> Image.Image:
    """Pink translucent fill + green outline per box, alpha-composited over ``image``.

    ``scale``: the image is the original scaled by this factor (reduced JPEG
    decoding); the outline keeps its width relative to the original pixels.
    """
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    width = max(1, int(round(HIGHLIGHT_WIDTH * scale)))
    for b in boxes:
        l, t, w, h = to_box(b)
        draw.rectangle([(l, t), (l + w, t + h)], fill=HIGHLIGHT_FILL, outline=HIGHLIGHT_OUTLINE, width=width)
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")


def _pixel_span(lo: float, hi: float, limit: int) -> Tuple[int, int]:
    """Pixel indices [a, b) touched by the continuous span [lo, hi)."""
    return max(0, int(math.floor(lo))), min(limit, int(math.ceil(hi)))


def crop_window(size: Tuple[int, int], boxes: Sequence[BoxLike], margin: float = 0.1) -> Tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)``: the union of ``boxes`` grown by ``margin`` x its size on each side, in the image."""
    l, t, w, h = union_box(boxes)
    W, H = size
    x0, x1 = _pixel_span(l - margin * w, l + w + margin * w, W)
    y0, y1 = _pixel_span(t - margin * h, t + h + margin * h, H)
    return x0, y0, x1, y1


def crop_to_boxes(image: Image.Image, boxes: Sequence[BoxLike],
                  margin: float = 0.1) -> Tuple[Image.Image, List[Box]]:
    """Crop to the union of ``boxes`` grown by ``margin`` x its size on each side.

    Returns the crop and the boxes moved into its coordinates.
    """
    x0, y0, x1, y1 = crop_window(image.size, boxes, margin)
    crop = image.crop((x0, y0, x1, y1))
    moved = [(b[0] - x0, b[1] - y0, b[2], b[3]) for b in map(to_box, boxes)]
    return crop, clamp_boxes(moved, crop.size)


def blackout_others(image: Image.Image, boxes: Sequence[BoxLike]) -> Image.Image:
    """Keep the pixels inside any box; everything else becomes black."""
    arr = np.asarray(image)
    keep = np.zeros(arr.shape[:2], dtype=bool)
    W, H = image.size
    for b in boxes:
        l, t, w, h = to_box(b)
        x0, x1 = _pixel_span(l, l + w, W)
        y0, y1 = _pixel_span(t, t + h, H)
        keep[y0:y1, x0:x1] = True
    out = np.where(keep[..., None], arr, 0).astype(np.uint8)
    return Image.fromarray(out, mode=image.mode)


def region_frame(size: Tuple[int, int], boxes: Sequence[BoxLike], mode: str, *,
                 margin: float = 0.1) -> Tuple[int, int]:
    """Size of the image ``render_region`` returns for an image of ``size`` (no pixels needed)."""
    clipped = clamp_boxes(boxes, size)
    if mode != "crop" or not clipped:
        return size
    x0, y0, x1, y1 = crop_window(size, clipped, margin)
    return x1 - x0, y1 - y0


def render_region(image: Image.Image, boxes: Sequence[BoxLike], mode: str = "highlight",
                  *, margin: float = 0.1, scale: float = 1.0) -> Tuple[Image.Image, List[Box]]:
    """Show the region ``boxes`` in ``image`` the way ``mode`` says.

    Modes: ``highlight`` (official look), ``crop`` (union of the boxes plus
    ``margin``), ``blackout_others`` (black outside the boxes), ``none``.
    Boxes are clipped to the image first; boxes wholly outside are dropped.

    Returns ``(image, boxes)``: an RGB image and the clipped boxes in that
    image's pixels (for ``crop``, moved into the crop), which the train image
    processors use to keep the region in view.
    """
    if mode not in REGION_MODES:
        raise ValueError(f"unknown region mode {mode!r}; choose one of {', '.join(REGION_MODES)}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    clipped = clamp_boxes(boxes, image.size)
    if not clipped or mode == "none":
        return image, clipped
    if mode == "highlight":
        return highlight(image, clipped, scale), clipped
    if mode == "crop":
        return crop_to_boxes(image, clipped, margin)
    return blackout_others(image, clipped), clipped
