"""Scores any image against a shapes-world prompt's metadata, GenEval-style.

Method, in three stages that mirror GenEval's detector + colour classifier:

1. **Colour segmentation.** A pixel is foreground when its HSV saturation exceeds ``SATURATION_MIN``
   (the background is white, grey smudges are not objects). Each foreground pixel takes the palette colour
   whose hue is nearest; connected regions (8-connected) of one colour are candidate objects, and regions
   smaller than ``MIN_AREA_FRAC`` of the image are noise. Objects lie on a background: a region covering
   more than ``MAX_AREA_FRAC`` of the image or more than ``MAX_BORDER_FRAC`` of its border pixels is a
   filled canvas, a frame or a band, not an object (otherwise a canvas flooded with one colour would be
   "a square" and earn full reward without drawing anything).
2. **Shape classification.** Each region's mask is cropped to its bounding box, resized to
   ``TEMPLATE_SIZE`` squared and compared by soft IoU with templates drawn by the renderer, each shape in
   two variants: as drawn, and grown by ``TEMPLATE_GROWTH`` (see ``_templates``); a shape's best variant
   names it, the best shape wins. The IoU is kept as the detection's confidence.
3. **Scoring.** For each required group (shape, count, optional colour) the detections of that shape are
   counted; ``credit = min(correct colour, count) / max(count, found)`` penalises missing, surplus and
   wrongly coloured objects alike. Objects of shapes the prompt does not name dilute the score. A relation
   (``position``) counts as one more fact, judged by GenEval's rule (centre offset, shrunk by 10% of the
   two boxes' sizes, must point within 60 degrees of the named direction), with mask centroids as centres.
   A region more than ``MAX_ASPECT`` times as long as wide is a stroke, an object of no named shape.

``score = (sum_g count_g * credit_g + relations_ok) / (sum_g count_g + extras + relations)``, in [0, 1].
``correct`` is GenEval's strict flag: exact counts, right colours, no extras, relation satisfied.
The score's parts are kept too (a probe learns from them as auxiliary targets, ``probe/model.py``):
``object_credit = sum_g count_g * credit_g / sum_g count_g`` and ``extras``, the objects of unnamed shapes.
"""

from __future__ import annotations

import colorsys
import dataclasses
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy import ndimage

from rewards.shapes.grammar import COLORS, SHAPES, PromptSpec
from rewards.shapes.render import draw_shape

SATURATION_MIN = 0.35
MIN_AREA_FRAC = 0.005
# The world's largest object (one square, 0.34 of the side, render.layout) covers 0.12 of the image and keeps
# 3% of the side off every edge; an object the edge clips touches at most its own width, under 9% of the
# border. A region past 0.2 of the image, or along 0.15 of the border (a block of 20 px in a corner of 64), is
# background: at 0.25 both, a colour block flooding a corner read as "a red square" and four coloured quadrants
# as "four squares", at full score. No held-out score of the shipped model, nor of a GRPO-trained LoRA, changed
# (docs/experiments.md, "Corner blocks and quadrants").
MAX_AREA_FRAC = 0.2
MAX_BORDER_FRAC = 0.15
TEMPLATE_SIZE = 24
# A third of a pixel on a 10-13 px object, two thirds on the largest (22 px): about what a rasterizer that fills
# every pixel an edge touches adds around a shape drawn without anti-aliasing. 0.01-0.02 is under half a
# template pixel and righted none of the misread crosses (see _templates).
TEMPLATE_GROWTH = 0.03
POSITION_SHRINK = 0.1
# Every shape of this world has a square bounding box; a region more than twice as long as it is wide is a
# stroke, not a shape (stretched to the templates' square it would match a square or circle perfectly, so a
# policy could draw lines for full reward). It counts as an object of no named shape: an extra.
MAX_ASPECT = 2.0
STROKE = "stroke"
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_PALETTE_HUES = np.array([colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for rgb in COLORS.values()])


@dataclasses.dataclass(frozen=True)
class Detection:
    """One object found in an image (pixel coordinates; ``box`` is ``(x0, y0, x1, y1)``, exclusive)."""

    shape: str
    color: str
    center: tuple[float, float]
    box: tuple[int, int, int, int]
    area: int
    confidence: float


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """Outcome of checking one image: ``score`` in [0, 1] with partial credit, GenEval's strict ``correct``, and
    the score's parts: ``object_credit`` in [0, 1], ``extras`` (objects of unnamed shapes), ``relation_ok`` (None
    without a relation)."""

    score: float
    correct: bool
    detections: tuple[Detection, ...]
    relation_ok: bool | None
    object_credit: float
    extras: int


@lru_cache(maxsize=1)
def _templates() -> torch.Tensor:
    """Soft masks ``[2, len(SHAPES), T, T]`` of each shape filling its bounding box, drawn by the renderer.

    Variant 0 is the shape as drawn; variant 1 is the shape drawn ``1 - 2 * TEMPLATE_GROWTH`` its size and
    grown by ``TEMPLATE_GROWTH`` of the box on every side (rounded corners, thicker cross arms). Without
    anti-aliasing a small cross's arms come out up to a pixel thicker than a third of its size, and the
    as-drawn cross template then ranks below the circle's: 5% of 10-13 px crosses (17% at whole-pixel sizes
    and centres) read as circles with variant 0 alone, none with both (tests/rewards/shapes/test_checker.py).
    """
    big = TEMPLATE_SIZE * 8
    variants = []
    for growth in (0.0, TEMPLATE_GROWTH):
        masks = []
        for shape in SHAPES:
            image = Image.new("L", (big, big), 0)
            draw_shape(ImageDraw.Draw(image), shape, big / 2, big / 2, big * (1 - 2 * growth), 255)
            grown = ndimage.distance_transform_edt(np.asarray(image) == 0) <= growth * big
            mask = Image.fromarray(grown.astype(np.uint8) * 255)
            masks.append(np.asarray(mask.resize((TEMPLATE_SIZE, TEMPLATE_SIZE), Image.Resampling.BOX)) / 255.0)
        variants.append(np.stack(masks))
    return torch.tensor(np.stack(variants), dtype=torch.float32)


def _to_hwc_float(image: np.ndarray | torch.Tensor | Image.Image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    if isinstance(image, torch.Tensor):  # NumPy has no bf16: floats come over as fp32, uint8 as it is
        image = image.detach().cpu()
        array = (image if image.dtype == torch.uint8 else image.float()).numpy()
    else:
        array = np.asarray(image)
    if array.ndim != 3 or 3 not in (array.shape[0], array.shape[-1]):
        raise ValueError(f"an image is [H, W, 3] or [3, H, W], got shape {array.shape}")
    if array.shape[-1] != 3:  # channels first, as tensors come
        array = array.transpose(1, 2, 0)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return np.clip(array.astype(np.float32), 0.0, 1.0)


def _hue_saturation(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised HSV hue and saturation of ``[H, W, 3]`` in [0, 1]."""
    cmax, cmin = rgb.max(-1), rgb.min(-1)
    delta = cmax - cmin
    saturation = np.where(cmax > 0, delta / np.maximum(cmax, 1e-8), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(delta, 1e-8)
    hue = np.select(
        [cmax == r, cmax == g],
        [((g - b) / safe) % 6.0, (b - r) / safe + 2.0],
        (r - g) / safe + 4.0,
    )
    return hue / 6.0, saturation


def _classify_shape(mask: np.ndarray) -> tuple[str, float]:
    height, width = mask.shape
    if max(height, width) > MAX_ASPECT * min(height, width):
        return STROKE, 0.0
    crop = torch.tensor(mask, dtype=torch.float32)[None, None]
    resized = F.interpolate(crop, size=(TEMPLATE_SIZE, TEMPLATE_SIZE), mode="area")[0, 0]
    templates = _templates()
    iou = torch.minimum(templates, resized).sum((2, 3)) / torch.maximum(templates, resized).sum((2, 3))
    iou = iou.amax(0)
    best = int(iou.argmax())
    return SHAPES[best], float(iou[best])


def detect(image: np.ndarray | torch.Tensor | Image.Image) -> list[Detection]:
    """Segment and classify every object in one image.

    Reliable from about 48 px a side: on the renderer's own correct images the score is 1.0 at 48-256 px, 0.86
    at 32 and 0.71 at 24 (small shapes fall under ``MIN_AREA_FRAC`` or lose their outline).

    Args:
        image: ``[H, W, 3]`` or ``[3, H, W]``, uint8 in [0, 255] or float in [0, 1] (NumPy or torch), or a PIL
            image.

    Raises:
        ValueError: on any other layout.

    Returns:
        Detections, largest first.
    """
    rgb = _to_hwc_float(image)
    height, width = rgb.shape[:2]
    hue, saturation = _hue_saturation(rgb)
    foreground = saturation > SATURATION_MIN
    hue_distance = np.abs(hue[..., None] - _PALETTE_HUES)
    hue_distance = np.minimum(hue_distance, 1.0 - hue_distance)
    color_index = hue_distance.argmin(-1)
    min_area, max_area = MIN_AREA_FRAC * height * width, MAX_AREA_FRAC * height * width
    max_border = MAX_BORDER_FRAC * (2 * (height + width) - 4)
    color_names = list(COLORS)
    detections = []
    for index, color in enumerate(color_names):
        labels, n_regions = ndimage.label(foreground & (color_index == index), structure=_EIGHT_CONNECTED)
        if n_regions == 0:
            continue
        border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
        border_pixels = np.bincount(border, minlength=n_regions + 1)
        for region, region_slice in enumerate(ndimage.find_objects(labels), start=1):
            mask = labels[region_slice] == region
            area = int(mask.sum())
            if not min_area <= area <= max_area or border_pixels[region] > max_border:
                continue
            ys, xs = np.nonzero(mask)
            shape, confidence = _classify_shape(mask.astype(np.float32))
            y0, x0 = region_slice[0].start, region_slice[1].start
            detections.append(
                Detection(
                    shape=shape,
                    color=color,
                    center=(float(x0 + xs.mean() + 0.5), float(y0 + ys.mean() + 0.5)),
                    box=(x0, y0, region_slice[1].stop, region_slice[0].stop),
                    area=area,
                    confidence=confidence,
                )
            )
    return sorted(detections, key=lambda d: -d.area)


def relation_holds(relation: str, anchor: Detection, other: Detection) -> bool:
    """Whether ``other`` lies ``relation`` (``left of``, ...) ``anchor``, by GenEval's rule (the offset shrunk by
    the boxes' sizes, within 60 degrees of the direction) read between mask centroids, where GenEval reads box
    centres: a triangle's centroid sits a sixth of its size below its box centre."""
    offset = np.array(other.center) - np.array(anchor.center)
    dims = np.array([anchor.box[2] - anchor.box[0] + other.box[2] - other.box[0],
                     anchor.box[3] - anchor.box[1] + other.box[3] - other.box[1]], dtype=float)  # fmt: skip
    revised = np.maximum(np.abs(offset) - POSITION_SHRINK * dims, 0.0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return False
    dx, dy = revised / np.linalg.norm(offset)
    return bool({"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}[relation])


def score_detections(spec: PromptSpec, detections: list[Detection]) -> CheckResult:
    """Score detections against ``spec`` (see the module docstring for the formula)."""
    named_shapes = {obj.shape for obj in spec.include}
    extras = sum(1 for d in detections if d.shape not in named_shapes)
    earned, required, correct = 0.0, 0, extras == 0
    representatives: list[Detection | None] = []
    for obj in spec.include:
        found = [d for d in detections if d.shape == obj.shape]
        right_color = [d for d in found if obj.color is None or d.color == obj.color]
        earned += obj.count * min(len(right_color), obj.count) / max(obj.count, len(found))
        required += obj.count
        correct &= len(found) == obj.count and len(right_color) == obj.count
        representatives.append(right_color[0] if right_color else (found[0] if found else None))
    object_credit = earned / required
    relation_ok: bool | None = None
    relations = 0
    for obj_index, obj in enumerate(spec.include):
        if obj.position is None:
            continue
        relations += 1
        relation, anchor_index = obj.position
        anchor, other = representatives[anchor_index], representatives[obj_index]
        relation_ok = anchor is not None and other is not None and relation_holds(relation, anchor, other)
        earned += float(relation_ok)
        correct &= relation_ok
    score = earned / (required + extras + relations)
    return CheckResult(score, bool(correct), tuple(detections), relation_ok, object_credit, extras)


def check(image: np.ndarray | torch.Tensor | Image.Image, spec: PromptSpec) -> CheckResult:
    """Detect objects in ``image`` and score them against ``spec``."""
    return score_detections(spec, detect(image))
