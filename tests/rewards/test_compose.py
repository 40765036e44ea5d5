"""The weighted multi-reward: sum and logged components, off-thread scoring, the failure policy."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from rewards.base import RewardError, RewardOutputError, RewardTimeoutError
from rewards.compose import RewardSet, build_reward_set, group_index, parse_reward_spec

PROMPTS = ["a red circle"] * 3 + ["a blue square"] * 3
METADATA = [{}] * 6


class Constant:
    def __init__(self, values, extra=False):
        self.values = torch.tensor(values, dtype=torch.float32)
        self.extra = extra
        self.calls = 0

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        scores = {"score": self.values[: len(images)]}
        if self.extra:
            scores["double"] = 2 * scores["score"]
        return scores


class FailsOn:
    """Raises when the batch holds ``bad_prompt``, else scores brightness."""

    def __init__(self, bad_prompt):
        self.bad_prompt = bad_prompt

    def __call__(self, images, prompts, metadata):
        if self.bad_prompt in prompts:
            raise ValueError("model exploded")
        return {"score": images.mean(dim=(1, 2, 3))}


class NanOn:
    def __init__(self, index):
        self.index = index

    def __call__(self, images, prompts, metadata):
        score = images.mean(dim=(1, 2, 3)).clone()
        score[self.index] = math.nan
        return {"score": score}


def test_weighted_sum_and_components(images):
    first = Constant([1, 2, 3, 4, 5, 6], extra=True)
    second = Constant([10, 0, 10, 0, 10, 0])
    rewards = RewardSet([("first", first, 1.0), ("second", second, -0.5)])
    result = rewards(images, PROMPTS, METADATA)
    assert torch.allclose(result.total, torch.tensor([-4.0, 2, -2, 4, 0, 6]))
    assert list(result.components) == ["first/score", "first/double", "second/score"]
    assert torch.equal(result.components["first/double"], 2 * first.values)
    assert result.valid.all() and result.dropped_groups == 0 and result.failures == []


def test_build_reward_set_parses_names_weights_and_kwargs(images):
    rewards = build_reward_set(
        "jpeg_incompressibility, small=jpeg_compressibility",
        weights="1,2",
        kwargs='{"small": {"quality": 50}}',
    )
    assert rewards.names == ["jpeg_incompressibility", "small"]
    assert rewards.components[1][1].quality == 50 and rewards.components[1][2] == 2.0
    result = rewards(images, PROMPTS, METADATA)
    expected = result.components["jpeg_incompressibility/score"] - 2 * result.components["small/size_kb"]
    assert torch.allclose(result.total, expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": [1.0, 2.0]}, "reward_weights has 2 values for 1 rewards"),
        ({"weights": [math.inf]}, "must be finite"),
        ({"kwargs": {"shape": {}}}, r"reward_kwargs names \['shape'\]"),
        ({"kwargs": "{not json"}, "reward_kwargs is not valid JSON"),
        ({"kwargs": {"shapes": 3}}, "must map each reward to a dict"),
        ({"failure_policy": "ignore"}, "reward_failure_policy must be one of"),
    ],
)
def test_build_reward_set_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_reward_set("shapes", **kwargs)


def test_parse_reward_spec():
    assert parse_reward_spec(" a , b=pkg.mod:R ") == [("a", "a"), ("b", "pkg.mod:R")]
    with pytest.raises(ValueError, match="appears twice.*name each one"):
        parse_reward_spec("remote,remote")
    with pytest.raises(ValueError, match="names no reward"):
        parse_reward_spec(" , ")


def test_group_index_defaults_to_prompts():
    assert group_index(PROMPTS, None).tolist() == [0, 0, 0, 1, 1, 1]
    assert group_index(PROMPTS, torch.tensor([7, 7, 3, 3, 9, 9])).tolist() == [1, 1, 0, 0, 2, 2]


def test_submit_scores_off_the_calling_thread(images):
    release = threading.Event()
    seen_threads = []

    def gated(images, prompts, metadata):
        seen_threads.append(threading.current_thread().name)
        release.wait(5)
        return {"score": images.mean(dim=(1, 2, 3))}

    rewards = RewardSet([("gated", gated, 1.0)], max_workers=2)
    future = rewards.submit(images, PROMPTS, METADATA)
    images.zero_()  # the caller reuses its buffer: the submitted copy must not change
    assert not future.done()  # the trainer keeps sampling meanwhile
    release.set()
    result = future.result(timeout=5)
    assert seen_threads[0].startswith("reward") and result.total.min() > 0
    rewards.close()


def test_raise_policy_names_reward_error_and_prompt(images):
    rewards = RewardSet([("fragile", FailsOn("a red circle"), 1.0)])
    with pytest.raises(RewardError, match="reward 'fragile' raised ValueError: model exploded") as error:
        rewards(images, PROMPTS, METADATA)
    assert "'a red circle'" in str(error.value) and "drop_group" in str(error.value)


def test_raise_policy_on_nan(images):
    rewards = RewardSet([("nanny", NanOn(4), 1.0)])
    with pytest.raises(RewardError, match=r"reward 'nanny' returned 1 non-finite 'score'.*prompt 'a blue square'"):
        rewards(images, PROMPTS, METADATA)


def test_drop_group_on_exception_keeps_the_other_groups(images):
    good = Constant([1, 2, 3, 4, 5, 6])
    rewards = RewardSet([("good", good, 1.0), ("fragile", FailsOn("a red circle"), 1.0)], failure_policy="drop_group")
    result = rewards(images, PROMPTS, METADATA)
    assert result.valid.tolist() == [False] * 3 + [True] * 3
    assert result.dropped_groups == 1 and "model exploded" in result.failures[0]
    assert torch.isnan(result.total[:3]).all()
    brightness = images.mean(dim=(1, 2, 3))
    assert torch.allclose(result.total[3:], good.values[3:] + brightness[3:])
    assert torch.isnan(result.components["fragile/score"][:3]).all()


def test_drop_group_on_nan_uses_group_ids(images):
    rewards = RewardSet([("nanny", NanOn(1), 1.0)], failure_policy="drop_group")
    result = rewards(images, PROMPTS, METADATA, group_ids=torch.tensor([0, 0, 1, 1, 2, 2]))
    assert result.valid.tolist() == [False, False, True, True, True, True]
    assert result.dropped_groups == 1 and "non-finite" in result.failures[0]
    assert torch.isfinite(result.total[2:]).all() and torch.isnan(result.total[:2]).all()


def test_an_image_with_nan_pixels_is_a_failure_not_a_score(images):
    """A diverged policy decodes NaN; a reward would score it as a finite (black) image and hide that."""
    broken = images.clone()
    broken[4, 0, 0, 0] = math.nan
    with pytest.raises(RewardError, match=r"1 of 6 images hold non-finite pixels.*'a blue square'.*diverged"):
        RewardSet([("bright", FailsOn("never"), 1.0)])(broken, PROMPTS, METADATA)
    result = RewardSet([("bright", FailsOn("never"), 1.0)], failure_policy="drop_group")(broken, PROMPTS, METADATA)
    assert result.valid.tolist() == [True] * 3 + [False] * 3 and result.dropped_groups == 1
    assert torch.isnan(result.total[3:]).all() and "non-finite pixels" in result.failures[0]
    assert torch.allclose(result.total[:3], images[:3].mean(dim=(1, 2, 3)))


def test_malformed_output_always_raises(images):
    rewards = RewardSet(
        [("sloppy", lambda i, p, m: {"score": torch.ones(len(i), 1)}, 1.0)], failure_policy="drop_group"
    )
    with pytest.raises(RewardOutputError, match="reward 'sloppy': score 'score' has shape"):
        rewards(images, PROMPTS, METADATA)


def test_drop_group_stops_after_repeated_total_failure(images):
    rewards = RewardSet([("dead", FailsOn(""), 1.0)], failure_policy="drop_group", max_failed_batches=2)
    prompts = [""] * 6
    result = rewards(images, prompts, METADATA)
    assert not result.valid.any() and result.dropped_groups == 1
    with pytest.raises(RewardError, match=r"failed on every group of 2 batches in a row.*model exploded"):
        rewards(images, prompts, METADATA)


def test_empty_batch(images):
    result = RewardSet([("c", Constant([]), 1.0)])(images[:0], [], [])
    assert result.total.shape == result.valid.shape == (0,) and result.components == {}


def test_input_checks(images):
    rewards = RewardSet([("c", Constant([1] * 6), 1.0)])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        rewards(images[:, :1], PROMPTS, METADATA)
    with pytest.raises(ValueError, match="6 images but 5 prompts"):
        rewards(images, PROMPTS[:5], METADATA)


def test_a_component_is_never_called_concurrently(images):
    def slow(images, prompts, metadata):
        time.sleep(0.3)
        return {"score": torch.zeros(len(images))}

    rewards = RewardSet([("slow", slow, 1.0)], max_workers=2)
    start = time.perf_counter()
    futures = [rewards.submit(images, PROMPTS, METADATA) for _ in range(2)]
    assert all(f.result(timeout=5).valid.all() for f in futures)
    # One lock per component: the same reward is never called concurrently, so two batches take ~0.6 s.
    assert time.perf_counter() - start >= 0.55
    rewards.close()


def test_thread_safe_rewards_run_concurrently(images):
    class Slow:
        thread_safe = True

        def __call__(self, images, prompts, metadata):
            time.sleep(0.3)
            return {"score": torch.zeros(len(images))}

    rewards = RewardSet([("slow", Slow(), 1.0)], max_workers=2)
    start = time.perf_counter()
    futures = [rewards.submit(images, PROMPTS, METADATA) for _ in range(2)]
    assert all(f.result(timeout=5).valid.all() for f in futures)
    assert time.perf_counter() - start < 0.55
    rewards.close()


def test_a_reward_that_hangs_stops_within_its_timeout_and_does_not_hold_up_close(images):
    release = threading.Event()

    def hangs(images, prompts, metadata):
        release.wait(30)  # a deadlocked judge (released at the end, so the test leaves no thread behind)
        return {"score": images.mean(dim=(1, 2, 3))}

    rewards = RewardSet([("judge", hangs, 1.0)], timeout_s=0.3)
    first, queued = rewards.submit(images, PROMPTS, METADATA), rewards.submit(images, PROMPTS, METADATA)
    started = time.perf_counter()
    with pytest.raises(RewardTimeoutError, match=r"reward 'judge' gave no answer within reward_timeout_s=0\.3 s"):
        rewards.wait(first)
    with pytest.raises(RewardTimeoutError, match="queued behind it"):  # at once, not after another 0.3 s
        rewards.wait(queued)
    rewards.close()  # does not wait for the hung thread
    assert 0.3 <= time.perf_counter() - started < 2.0
    direct = RewardSet([("judge", hangs, 1.0)], timeout_s=0.3)
    with pytest.raises(RewardTimeoutError, match="reward_timeout_s=0.3 s"):  # a direct call (the evaluation's)
        direct(images, PROMPTS, METADATA)
    direct.close()
    assert time.perf_counter() - started < 3.0
    release.set()


def test_a_bounded_call_scores_as_the_caller_would_in_its_autocast(images):
    seen = []

    def projected(images, prompts, metadata):  # a model reward: a matmul, which autocast runs in bf16
        seen.append(torch.is_autocast_enabled("cpu"))
        return {"score": (images.flatten(1) @ torch.linspace(0, 1, images[0].numel())).float()}

    with torch.autocast("cpu", dtype=torch.bfloat16):
        here = RewardSet([("model", projected, 1.0)], timeout_s=0)(images, PROMPTS, METADATA)
        worker = RewardSet([("model", projected, 1.0)], timeout_s=5)
        there = worker(images, PROMPTS, METADATA)
    worker.close()
    assert seen == [True, True] and torch.equal(here.total, there.total)


def test_without_a_timeout_a_slow_reward_is_waited_for(images):
    def slow(images, prompts, metadata):
        time.sleep(0.3)
        return {"score": images.mean(dim=(1, 2, 3))}

    rewards = RewardSet([("slow", slow, 1.0)], timeout_s=0)
    assert rewards.wait(rewards.submit(images, PROMPTS, METADATA)).valid.all()
    rewards.close()
    bounded = RewardSet([("slow", slow, 1.0)], timeout_s=5)
    assert bounded(images, PROMPTS, METADATA).valid.all()
    bounded.close()
