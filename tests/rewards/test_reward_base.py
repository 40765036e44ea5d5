"""The reward interface: registry, loading by name or dotted path, output validation, helpers."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch

from rewards.base import (
    REGISTRY,
    MissingExtraError,
    RewardImportError,
    RewardOutputError,
    check_scores,
    load_reward,
    register,
    require,
    resolve_dtype,
    to_pil,
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's module on sys.path with a class, a factory and a plain function reward."""
    (tmp_path / "my_scoring.py").write_text(
        textwrap.dedent(
            """
            import torch

            class Brightness:
                def __init__(self, scale=1.0):
                    self.scale = scale

                def __call__(self, images, prompts, metadata):
                    return {"score": self.scale * images.mean(dim=(1, 2, 3))}

            def make_brightness(scale=1.0):
                return Brightness(scale)

            def redness(images, prompts, metadata):
                return {"red": images[:, 0].mean(dim=(1, 2))}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_scoring"
    sys.modules.pop("my_scoring", None)


def test_builtins_are_registered():
    load_reward("shapes")
    expected = {"shapes", "jpeg_compressibility", "jpeg_incompressibility", "clipscore", "pickscore", "aesthetic"}
    assert expected | {"imagereward", "hpsv2", "ocr", "remote"} <= set(REGISTRY)


def test_register_twice_is_an_error():
    with pytest.raises(ValueError, match="registered twice"):
        register("shapes")(object)


def test_dotted_path_class_factory_and_function(user_module, images):
    brightness = load_reward(f"{user_module}:Brightness", scale=2.0)
    assert torch.allclose(brightness(images, [""] * 6, [{}] * 6)["score"], 2 * images.mean(dim=(1, 2, 3)))
    factory = load_reward(f"{user_module}:make_brightness", scale=3.0)
    assert factory.scale == 3.0
    function = load_reward(f"{user_module}:redness")
    assert function(images, [""] * 6, [{}] * 6)["red"].shape == (6,)


def test_dotted_path_errors_say_what_is_wrong(user_module):
    with pytest.raises(ValueError, match=r"does not accept the arguments \['bogus'\].*Its signature"):
        load_reward(f"{user_module}:Brightness", bogus=1)
    with pytest.raises(ValueError, match="plain function .* takes no constructor arguments"):
        load_reward(f"{user_module}:redness", scale=1)
    with pytest.raises(ValueError, match="has no attribute 'Missing'"):
        load_reward(f"{user_module}:Missing")
    with pytest.raises(RewardImportError, match="cannot import module 'no_such_module_xyz'.*PYTHONPATH"):
        load_reward("no_such_module_xyz:Reward")
    with pytest.raises(ValueError, match="must look like 'package.module:Callable'"):
        load_reward(":Reward")
    with pytest.raises(ValueError, match="unknown reward 'pikscore'; built-ins: .*'pickscore'"):
        load_reward("pikscore")


def test_check_scores_accepts_tensors_arrays_lists():
    scores = check_scores("r", {"a": torch.ones(3, dtype=torch.float64), "b": np.zeros(3), "c": [1, 2, 3]}, 3)
    assert list(scores) == ["a", "b", "c"]
    assert all(v.dtype == torch.float32 and v.shape == (3,) for v in scores.values())


@pytest.mark.parametrize(
    ("output", "match"),
    [
        (torch.ones(3), "returned Tensor"),
        ({}, "returned dict"),
        ({"score": torch.ones(3, 1)}, r"shape \(3, 1\) for a batch of 3"),
        ({"score": torch.ones(2)}, r"shape \(2,\) for a batch of 3"),
        ({"score": ["a", "b", "c"]}, "not numeric"),
        ({1: torch.ones(3)}, "non-string key"),
    ],
)
def test_check_scores_names_the_reward_and_the_fix(output, match):
    with pytest.raises(RewardOutputError, match=match) as error:
        check_scores("my_reward", output, 3)
    assert "my_reward" in str(error.value) and "must return a dict" in str(error.value)


def test_to_pil_rounds_to_8_bits(images):
    pil = to_pil(images)
    assert len(pil) == 6 and pil[0].size == (40, 48) and pil[0].mode == "RGB"
    back = torch.from_numpy(np.stack([np.asarray(p) for p in pil])).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(back, images)


def test_resolve_dtype():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        resolve_dtype("half", torch.device("cpu"))


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "fake_extra_pkg", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'flux-probe-grpo\[fancy\]'"):
        require("fake_extra_pkg", extra="fancy", what="fancy")


def test_require_tells_a_broken_install_from_a_missing_one(tmp_path, monkeypatch):
    (tmp_path / "broken_extra_pkg.py").write_text("from transformers.modeling_utils import no_such_helper\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtraError, match="installed but fails to import .*no_such_helper.*own environment"):
        require("broken_extra_pkg", extra="fancy", what="fancy", broken_hint="Use its own environment.")


def test_the_shapes_reward_names_missing_metadata(images):
    # a .jsonl prompt file without the shapes world's tags: the reward says what it needs instead of scoring 0
    with pytest.raises(ValueError, match="the shapes reward needs shapes-world metadata"):
        load_reward("shapes")(images[:2], ["a red square", "a circle"], [{}, {}])
