"""The shapes world: a GenEval-like prompt grammar, a renderer of correct images and a checker of any image."""

from rewards.shapes.checker import CheckResult, Detection, check, detect
from rewards.shapes.grammar import (
    CATEGORIES,
    COLORS,
    SHAPES,
    ObjectSpec,
    PromptSpec,
    all_prompts,
    category_probabilities,
    parse_category_weights,
    sample_prompts,
    vocabulary,
)
from rewards.shapes.render import render

__all__ = [
    "CATEGORIES", "COLORS", "SHAPES", "CheckResult", "Detection", "ObjectSpec", "PromptSpec",
    "all_prompts", "category_probabilities", "check", "detect", "parse_category_weights", "render",
    "sample_prompts", "vocabulary",
]  # fmt: skip
