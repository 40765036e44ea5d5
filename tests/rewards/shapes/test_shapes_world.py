"""The shapes world: grammar coverage, renderer correctness and the checker's accuracy.

The shapes world's two headline numbers are asserted here: mean score >= 0.98 on 500 rendered
correct images, <= 0.2 on 500 mismatched prompt/image pairs. Shape and per-category accuracy are computed
and printed (``pytest -s``) as well as asserted.
"""

import collections

import numpy as np
import pytest
import torch

from rewards.base import load_reward
from rewards.shapes import (
    CATEGORIES,
    COLORS,
    SHAPES,
    Detection,
    ObjectSpec,
    PromptSpec,
    all_prompts,
    check,
    detect,
    parse_category_weights,
    render,
    sample_prompts,
)
from rewards.shapes.checker import score_detections
from rewards.shapes.grammar import TEST_PROMPTS_PER_CATEGORY, vocabulary


@pytest.fixture(scope="module")
def rendered():
    specs = sample_prompts("all", 500, np.random.default_rng(0))
    images = [render(spec, 64, seed) for seed, spec in enumerate(specs)]
    return specs, images


def test_grammar_covers_geneval_categories_and_splits_are_disjoint():
    specs = all_prompts()
    assert {s.tag for s in specs} == set(CATEGORIES)
    train, test = all_prompts("train"), all_prompts("test")
    assert len(test) == 256 == sum(TEST_PROMPTS_PER_CATEGORY.values())
    assert not {s.prompt for s in train} & {s.prompt for s in test}
    assert len(train) + len(test) == len(specs) == len({s.prompt for s in specs})
    assert collections.Counter(s.tag for s in test) == TEST_PROMPTS_PER_CATEGORY
    counts = {obj.count for s in specs for obj in s.include}
    assert counts == {1, 2, 3, 4}
    relations = {obj.position[0] for s in specs for obj in s.include if obj.position}
    assert relations == {"left of", "right of", "above", "below"}
    assert set(vocabulary()) >= set(SHAPES) | set(COLORS) | {"two", "three", "four", "left", "above", "below"}


def test_sample_prompts_is_category_balanced_unless_weighted():
    def shares(weights):
        tags = collections.Counter(s.tag for s in sample_prompts("train", 6000, np.random.default_rng(0), weights))
        return {category: tags[category] / 6000 for category in CATEGORIES}

    assert all(abs(share - 1 / 6) < 0.02 for share in shares(None).values())
    # weights 4 (position) + 4 x 1 + 0 (single_object) = 8: position 1/2, the other four 1/8 each, none single
    weighted = shares({"position": 4.0, "single_object": 0.0})
    assert weighted["single_object"] == 0.0
    assert abs(weighted["position"] - 0.5) < 0.02
    assert all(abs(weighted[c] - 0.125) < 0.02 for c in ("two_object", "counting", "colors", "color_attr"))
    with pytest.raises(ValueError, match="circles"):
        sample_prompts("train", 1, np.random.default_rng(0), {"circles": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        sample_prompts("train", 1, np.random.default_rng(0), {"position": -1.0})


def test_category_weights_parse_from_text_with_named_errors():
    assert parse_category_weights("position=2.5 color_attr=2.5") == {"position": 2.5, "color_attr": 2.5}
    assert parse_category_weights("position=4, single_object=0") == {"position": 4.0, "single_object": 0.0}
    assert parse_category_weights("") == {}
    for text, message in [("position", "'position'"), ("position=many", "'position=many'"),
                          ("circles=2", "circles"), ("position=nan", "finite")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            parse_category_weights(text)


def test_metadata_round_trips_geneval_layout():
    spec = next(s for s in all_prompts() if s.prompt == "a red circle left of a blue square")
    data = spec.to_dict()
    assert data == {
        "tag": "position",
        "prompt": "a red circle left of a blue square",
        "include": [
            {"class": "circle", "count": 1, "color": "red"},
            {"class": "square", "count": 1, "color": "blue", "position": ["right of", 0]},
        ],
    }
    assert PromptSpec.from_dict(data) == spec
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        PromptSpec.from_dict({"tag": "colors", "prompt": "x", "include": [{"class": "hexagon", "count": 1}]})


def test_renderer_is_seeded_antialiased_and_varied():
    spec = all_prompts("test")[0]
    a, b, c = render(spec, 64, 1), render(spec, 64, 1), render(spec, 64, 2)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # anti-aliased: edge pixels take intermediate values, not only background and palette colours
    palette = {tuple(v) for v in COLORS.values()} | {(255, 255, 255)}
    assert sum(tuple(p) not in palette for p in a.reshape(-1, 3)) > 10


def test_checker_scores_correct_images_near_one(rendered):
    specs, images = rendered
    results = [check(image, spec) for image, spec in zip(images, specs)]
    mean_score = np.mean([r.score for r in results])
    by_category = collections.defaultdict(list)
    for spec, result in zip(specs, results):
        by_category[spec.tag].append(result.correct)
    accuracy = {tag: float(np.mean(v)) for tag, v in sorted(by_category.items())}
    print(f"correct images: mean score {mean_score:.4f}; strict accuracy per category {accuracy}")
    assert mean_score >= 0.98
    assert min(accuracy.values()) >= 0.95


def test_checker_scores_mismatched_pairs_low(rendered):
    specs, images = rendered
    scores = [check(images[(i + 1) % len(images)], spec).score for i, spec in enumerate(specs)]
    print(f"mismatched pairs: mean score {np.mean(scores):.4f}")
    assert np.mean(scores) <= 0.2


def test_shape_and_colour_classification_accuracy():
    rng = np.random.default_rng(3)
    confusion = collections.Counter()
    colours_right = 0
    trials = 0
    for shape in SHAPES:
        for color in COLORS:
            for _ in range(4):
                spec = PromptSpec(f"a {color} {shape}", "colors", (ObjectSpec(shape, 1, color),))
                found = detect(render(spec, 64, rng))
                trials += 1
                confusion[(shape, found[0].shape if found else None)] += 1
                colours_right += bool(found) and found[0].color == color
    shape_accuracy = sum(n for (true, pred), n in confusion.items() if true == pred) / trials
    print(f"shape accuracy {shape_accuracy:.3f}, colour accuracy {colours_right / trials:.3f}")
    assert shape_accuracy >= 0.97 and colours_right / trials >= 0.99


def test_partial_credit_for_counts_colours_extras_and_relations():
    spec = next(s for s in all_prompts() if s.prompt == "three red circles")
    two_red = next(s for s in all_prompts() if s.prompt == "two red circles")
    # two of three circles: credit 2/3
    assert check(render(two_red, 64, 0), spec).score == pytest.approx(2 / 3)
    assert not check(render(two_red, 64, 0), spec).correct
    # the right layout, the wrong relation: objects earn 2 of 3 facts
    left = next(s for s in all_prompts() if s.prompt == "a red circle left of a blue square")
    right = next(s for s in all_prompts() if s.prompt == "a red circle right of a blue square")
    result = check(render(right, 64, 0), left)
    assert result.relation_ok is False and result.score == pytest.approx(2 / 3)
    # a blank image earns nothing; float CHW tensors are accepted
    assert check(torch.ones(3, 64, 64), spec).score == 0.0


def test_score_parts_add_up_to_the_score_and_the_reward_returns_them():
    spec = next(s for s in all_prompts() if s.prompt == "two red circles")

    def detection(shape: str, color: str) -> Detection:
        return Detection(shape, color, center=(10.0, 10.0), box=(5, 5, 15, 15), area=80, confidence=0.9)

    # one red circle, one blue circle, one square: credit 2 * 1/2 of 2 objects, one extra
    result = score_detections(
        spec, [detection("circle", "red"), detection("circle", "blue"), detection("square", "red")]
    )
    assert result.object_credit == pytest.approx(0.5) and result.extras == 1
    assert result.score == pytest.approx((2 * result.object_credit) / (2 + 1)) and result.relation_ok is None
    # the wrong relation costs the relation only: every object is there
    left = next(s for s in all_prompts() if s.prompt == "a red circle left of a blue square")
    right = next(s for s in all_prompts() if s.prompt == "a red circle right of a blue square")
    scores = load_reward("shapes")(
        torch.stack([torch.from_numpy(render(right, 64, 0).copy()).permute(2, 0, 1).float() / 255] * 2),
        [left.prompt, spec.prompt],
        [left.to_dict(), spec.to_dict()],
    )
    assert set(scores) == {"score", "correct", "objects", "extras", "relation"}
    assert scores["objects"][0] == 1.0 and scores["relation"][0] == 0.0 and scores["extras"][0] == 0.0
    assert scores["score"][0] == pytest.approx(2 / 3)
    # a prompt without a relation reads 0 there, never NaN; one of two red circles, the square an extra
    assert scores["relation"][1] == 0.0 and scores["objects"][1] == 0.5 and scores["extras"][1] == 1.0
