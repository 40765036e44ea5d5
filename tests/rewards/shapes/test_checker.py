"""The shapes checker cannot be gamed by a flat image: objects must lie on a background."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from rewards.shapes import COLORS, all_prompts, check, detect

RESOLUTION = 64
WHITE = (255, 255, 255)


@pytest.mark.parametrize("color", list(COLORS))
def test_a_canvas_flooded_with_one_colour_is_not_an_object(color):
    prompts = {s.prompt: s for s in all_prompts()}
    other = next(c for c in COLORS if c != color)
    flat = np.full((RESOLUTION, RESOLUTION, 3), COLORS[color], dtype=np.uint8)
    assert detect(flat) == []
    for prompt in ("a square", f"a {color} square", "a circle", f"two {color} squares",
                   f"a {color} square and a {other} circle", f"a {color} square left of a {other} circle"):  # fmt: skip
        result = check(flat, prompts[prompt])
        assert result.score == 0.0 and not result.correct, prompt


def _canvas(paint) -> np.ndarray:
    image = Image.new("RGB", (RESOLUTION, RESOLUTION), WHITE)
    paint(ImageDraw.Draw(image))
    return np.asarray(image)


def test_frames_bands_and_fills_are_background_but_objects_on_any_background_count():
    red, blue = COLORS["red"], COLORS["blue"]
    last = RESOLUTION - 1
    not_objects = {
        "frame": lambda d: d.rectangle([0, 0, last, last], outline=red, width=4),
        "band along the top": lambda d: d.rectangle([0, 0, last, 10], fill=red),
        "fill with a white hole": lambda d: (
            d.rectangle([0, 0, last, last], fill=red),
            d.rectangle([24, 24, 40, 40], fill=WHITE),
        ),  # fmt: skip
        "square over half the canvas, off the border": lambda d: d.rectangle([8, 8, 54, 54], fill=red),
    }
    for name, paint in not_objects.items():
        assert detect(_canvas(paint)) == [], name
    blue_square = next(s for s in all_prompts() if s.prompt == "a blue square")
    on_red = _canvas(lambda d: (d.rectangle([0, 0, last, last], fill=red), d.rectangle([20, 20, 40, 40], fill=blue)))
    assert check(on_red, blue_square).correct
    clipped_by_the_edge = _canvas(lambda d: d.rectangle([-6, 20, 14, 40], fill=blue))
    assert check(clipped_by_the_edge, blue_square).correct
