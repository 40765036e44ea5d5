"""OCR accuracy: target parsing, flow_grpo's score, pluggable engines, and RapidOCR when installed."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from rewards.base import MissingExtraError, load_reward
from rewards.ocr import levenshtein, ocr_accuracy, target_text


def test_target_text():
    assert target_text('a sign that says "Open 24 Hours"') == "Open 24 Hours"
    assert target_text("a mug reading “coffee” and “tea”") == "coffee tea"
    assert target_text("no quotes", {"ocr_text": "hello"}) == "hello"
    with pytest.raises(ValueError, match="prompt 'a red circle' has no quoted target text"):
        target_text("a red circle", {})


def test_levenshtein_and_accuracy():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert ocr_accuracy("OPEN 24 hours", "open 24 hours") == 1.0  # case and spaces ignored
    assert ocr_accuracy("big sale: open24hours now", "open 24 hours") == 1.0  # contained
    assert ocr_accuracy("opem", "open") == pytest.approx(0.75)
    assert ocr_accuracy("", "open") == 0.0
    assert ocr_accuracy("a completely different long text", "open") == 0.0  # distance capped at the length


def test_reward_with_a_custom_engine(images):
    readings = iter(["hello", "helo", "", "HELLO WORLD"])
    reward = load_reward("ocr", engine=lambda image: next(readings))
    prompts = ['a sign that says "hello"'] * 4
    scores = reward(images[:4], prompts, [{}] * 4)
    assert scores["score"].tolist() == pytest.approx([1.0, 0.8, 0.0, 1.0])
    assert scores["exact"].tolist() == [1.0, 0.0, 0.0, 1.0]


def fixed_engine(text="hello"):
    return lambda image: text


def test_engine_by_dotted_path(images):
    reward = load_reward("ocr", engine=f"{__name__}:fixed_engine", params={"text": "hullo"})
    assert reward(images[:1], ['"hello"'], [{}])["score"].item() == pytest.approx(0.8)


def test_missing_engine_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidocr", None)
    with pytest.raises(MissingExtraError, match=r"the ocr reward needs .*'rapidocr'.*flux-probe-grpo\[ocr\]"):
        load_reward("ocr")


def render_text(text: str) -> torch.Tensor:
    image = Image.new("RGB", (256, 96), "white")
    ImageDraw.Draw(image).text((24, 24), text, fill="black", font=ImageFont.load_default(size=40))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def test_rapidocr_reads_rendered_text():
    pytest.importorskip("rapidocr", reason="optional extra 'ocr' not installed")
    reward = load_reward("ocr")
    images = torch.stack([render_text("HELLO"), render_text("WORLD"), torch.ones(3, 96, 256)])
    scores = reward(images, ['a sign that says "hello"'] * 3, [{}] * 3)["score"]
    assert scores[0] >= 0.8 and scores[1] <= 0.4 and scores[2] == 0.0
