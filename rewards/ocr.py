"""OCR accuracy for text rendering, as in flow_grpo: does the image show the prompt's quoted text?

The target is the text between double quotes in the prompt (``a sign that says "open 24 hours"``; straight
or curly quotes; several quoted parts are joined), or ``metadata["ocr_text"]`` when given. Target and
recognised text are compared lowercased with spaces removed:
``score = 1 - min(levenshtein(recognised, target), len(target)) / len(target)``, and 1 when the target
appears inside the recognised text. ``exact`` is 1 where it does.

The default engine is RapidOCR (PaddleOCR's models run by onnxruntime; the PP-OCR weights ship inside the
``rapidocr`` wheel, so it works offline): ``pip install 'flux-probe-grpo[ocr]'``. Any other engine plugs in
as a callable ``engine(pil_image) -> str`` or a dotted path to a factory returning one.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from rewards.base import import_object, register, require, to_pil

_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”')


def target_text(prompt: str, metadata: dict | None = None) -> str:
    """The text an image for ``prompt`` should show.

    Raises:
        ValueError: when the prompt quotes nothing and the metadata has no ``ocr_text``.
    """
    if metadata and metadata.get("ocr_text"):
        return str(metadata["ocr_text"])
    parts = [a or b for a, b in _QUOTED.findall(prompt)]
    if not parts:
        raise ValueError(
            f"prompt {prompt!r} has no quoted target text; the OCR reward needs prompts like "
            "'a sign that says \"hello\"' or metadata['ocr_text']"
        )
    return " ".join(parts)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _normalise(text: str) -> str:
    return "".join(text.split()).lower()


def ocr_accuracy(recognised: str, target: str) -> float:
    """flow_grpo's score: 1 if the target is contained, else 1 - edit distance / target length (floored at 0)."""
    recognised, target = _normalise(recognised), _normalise(target)
    if not target:
        raise ValueError("the OCR target text is empty")
    if target in recognised:
        return 1.0
    return 1.0 - min(levenshtein(recognised, target), len(target)) / len(target)


class RapidOcrEngine:
    """RapidOCR (``rapidocr`` >= 3): the recognised lines of an image joined by spaces.

    Args:
        params: RapidOCR's own options, e.g. ``{"Det.model_path": ..., "Rec.model_path": ...}`` for local
            weights or ``{"EngineConfig.onnxruntime.use_cuda": true}`` on a GPU.
        min_confidence: lines recognised with a lower confidence are ignored.
    """

    def __init__(self, params: dict | None = None, min_confidence: float = 0.0) -> None:
        rapidocr = require("rapidocr", extra="ocr", what="ocr")
        self.engine = rapidocr.RapidOCR(params=params or None)
        self.min_confidence = min_confidence

    def __call__(self, image: Image.Image) -> str:
        result = self.engine(np.asarray(image.convert("RGB")))
        texts, scores = result.txts or (), result.scores or ()
        return " ".join(text for text, score in zip(texts, scores) if score >= self.min_confidence)


@register("ocr")
class OcrReward:
    """``score``: OCR accuracy of the quoted text (see the module docstring) in [0, 1]; ``exact``: 0/1.

    Args:
        engine: ``"rapidocr"`` (default), a dotted path ``pkg.mod:factory`` to a factory returning
            ``engine(pil_image) -> str``, or such a callable itself.
        params: RapidOCR options (see :class:`RapidOcrEngine`), or keyword arguments of a dotted-path factory.
        min_confidence: RapidOCR only: ignore lines below this confidence.
    """

    def __init__(
        self, engine: str | Callable[[Image.Image], str] = "rapidocr", params: dict | None = None, min_confidence=0.0
    ) -> None:
        if engine == "rapidocr":
            self.engine = RapidOcrEngine(params, min_confidence)
        elif isinstance(engine, str):
            self.engine = import_object(engine, "OCR engine")(**(params or {}))
        else:
            self.engine = engine

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        targets = [target_text(prompt, meta) for prompt, meta in zip(prompts, metadata)]
        scores = [ocr_accuracy(self.engine(image), target) for image, target in zip(to_pil(images), targets)]
        score = torch.tensor(scores, dtype=torch.float32)
        return {"score": score, "exact": (score == 1).float()}
