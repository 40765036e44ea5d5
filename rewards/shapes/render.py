"""Draws a correct image for a shapes-world prompt: random sizes and placements, anti-aliased.

Images are drawn at ``SUPERSAMPLE`` times the target size and box-filtered down, which anti-aliases the
edges the way a real image's are. Objects never overlap (a margin of background separates them), so a
correct image has exactly one connected region per object.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from rewards.shapes.grammar import COLORS, PromptSpec

SUPERSAMPLE = 4
BACKGROUND = (255, 255, 255)


def shape_polygon(shape: str, cx: float, cy: float, size: float) -> list[tuple[float, float]] | None:
    """Vertices of ``shape`` inscribed in the axis-aligned square of side ``size`` centred at (cx, cy).

    Returns ``None`` for the circle (drawn as an ellipse). Triangles point up; the diamond is a square
    turned 45 degrees; the cross is a plus sign with arms one third of the size wide.
    """
    h = size / 2
    if shape == "circle":
        return None
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    if shape == "cross":
        a = size / 6
        return [
            (cx - a, cy - h), (cx + a, cy - h), (cx + a, cy - a), (cx + h, cy - a),
            (cx + h, cy + a), (cx + a, cy + a), (cx + a, cy + h), (cx - a, cy + h),
            (cx - a, cy + a), (cx - h, cy + a), (cx - h, cy - a), (cx - a, cy - a),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, fill) -> None:
    """Draw one filled shape (coordinates in the drawing's own pixels)."""
    polygon = shape_polygon(shape, cx, cy, size)
    if polygon is None:
        h = size / 2
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def _relation_holds(relation: str, anchor: tuple[float, float], other: tuple[float, float], gap: float) -> bool:
    """Whether ``other`` lies ``relation`` ``anchor`` by at least ``gap`` along that axis, and mainly along it."""
    dx, dy = other[0] - anchor[0], other[1] - anchor[1]
    along, across = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return along >= gap and abs(across) <= 0.5 * along


def layout(
    spec: PromptSpec, resolution: int, rng: np.random.Generator, max_tries: int = 2000
) -> list[tuple[str, str, float, float, float]]:
    """Random non-overlapping placements satisfying ``spec``.

    Returns:
        One ``(shape, colour, cx, cy, size)`` per object, in pixels of a ``resolution`` square image.

    Raises:
        RuntimeError: if no placement is found in ``max_tries`` attempts (does not happen for the grammar).
    """
    n_objects = sum(obj.count for obj in spec.include)
    max_size = resolution * (0.34 if n_objects == 1 else 0.3 if n_objects == 2 else 0.25)
    min_size = resolution * 0.19
    margin = resolution * 0.03
    for _ in range(max_tries):
        placed: list[tuple[str, str, float, float, float]] = []
        group_centres: list[tuple[float, float]] = []
        ok = True
        for obj in spec.include:
            for _k in range(obj.count):
                color = obj.color or str(rng.choice(list(COLORS)))
                size = float(rng.uniform(min_size, max_size))
                h = size / 2
                cx = float(rng.uniform(margin + h, resolution - margin - h))
                cy = float(rng.uniform(margin + h, resolution - margin - h))
                if any(math.hypot(cx - p[2], cy - p[3]) < (h + p[4] / 2) * math.sqrt(2) + margin for p in placed):
                    ok = False
                    break
                if obj.position is not None and _k == 0:
                    relation, index = obj.position
                    if not _relation_holds(relation, group_centres[index], (cx, cy), 0.2 * resolution):
                        ok = False
                        break
                placed.append((obj.shape, color, cx, cy, size))
            if not ok:
                break
            group_centres.append((placed[-obj.count][2], placed[-obj.count][3]))
        if ok:
            return placed
    raise RuntimeError(f"could not lay out {spec.prompt!r} in {max_tries} tries")


def render(spec: PromptSpec, resolution: int = 64, seed: int | np.random.Generator = 0) -> np.ndarray:
    """A correct, anti-aliased image for ``spec``.

    Args:
        spec: the prompt and its metadata.
        resolution: side of the square image in pixels.
        seed: an int seed or a numpy Generator (sizes, positions and open colours are drawn from it).

    Returns:
        ``uint8`` array ``[resolution, resolution, 3]``.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    big = resolution * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape, color, cx, cy, size in layout(spec, resolution, rng):
        s = SUPERSAMPLE
        draw_shape(draw, shape, cx * s, cy * s, size * s, COLORS[color])
    return np.asarray(image.resize((resolution, resolution), Image.Resampling.BOX))
