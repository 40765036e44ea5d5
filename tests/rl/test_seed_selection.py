"""Predictor-guided best-of-N (rl/seed_selection.py, launch/sample.py --best_of, bench/seed_selection.py)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from probe.probe import ProbeMismatchError
from rewards.compose import build_reward_set
from rewards.shapes import all_prompts
from rl.metrics_log import image_grid
from rl.predictors import PredictionCost
from rl.sampler import FluxSampler, encode_prompts
from rl.seed_selection import (
    SeedChoice,
    SeedSelector,
    best_of_n,
    choose,
    full_best_of_n_cost,
    keep_best,
    predictor_for,
    preview_grid,
    selection_cost,
)

SPECS = list(all_prompts("test"))[:2]


def test_keep_best_takes_the_highest_predictions_best_first_ties_to_the_earlier_seed():
    predicted = torch.tensor([0.2, 0.9, 0.5, 0.9, 0.1])
    assert keep_best(predicted, 1) == [1]
    assert keep_best(predicted, 3) == [1, 3, 2]  # 0.9 at seeds 1 and 3: the earlier first
    assert keep_best(predicted, 5) == [1, 3, 2, 0, 4]
    with pytest.raises(ValueError, match="keep=6"):
        keep_best(predicted, 6)


def test_choose_returns_the_survivor_with_the_best_score_ties_to_the_better_predicted():
    assert choose([4, 2, 7], torch.tensor([0.1, 0.8, 0.3])) == 2
    assert choose([4, 2, 7], torch.tensor([0.5, 0.5, 0.3])) == 4  # tie: 4 was predicted better (listed first)


def test_a_seed_without_a_prediction_or_a_reward_ranks_below_every_real_one():
    """A failed preview or reward is NaN, not the batch's lowest score: it never ties with (and beats) a real one."""
    assert keep_best(torch.tensor([math.nan, 1.0, 1.0, 0.0]), 3) == [1, 2, 3]
    assert choose([0, 1], torch.tensor([math.nan, 1.0])) == 1
    assert choose([0, 1], torch.tensor([math.nan, math.nan])) == 0  # every one failed: the better predicted
    choice = SeedChoice("p", [5, 6], torch.tensor([0.25, math.nan]), [0, 1], torch.tensor([0.5, math.nan]), 0,
                        torch.zeros(2, 3, 4, 4), PredictionCost())  # fmt: skip
    report = choice.to_dict()
    assert (report["predicted"], report["kept_rewards"]) == ([0.25, None], [0.5, None])  # strict JSON: no NaN


def test_selection_cost_counts_the_capture_the_predictor_and_the_survivors():
    # T = 10, k = 3, N = 8, K = 2, a lookahead (2 calls, 1 decode, 1 reward call per rollout):
    # calls 8*3 + 8*2 + 2*(10-3) = 54; decodes 8 + 2 = 10; reward calls 8 + 2 = 10
    cost = selection_cost(10, 3, 8, 2, PredictionCost(2, 1, 1), scored=True)
    assert (cost.transformer_calls, cost.decodes, cost.reward_calls) == (54, 10, 10)
    # a probe (free) at k = 4 without a reward: 32 + 6 = 38 calls, one decode, no reward call
    cost = selection_cost(10, 4, 8, 1, PredictionCost(), scored=False)
    assert (cost.transformer_calls, cost.decodes, cost.reward_calls) == (38, 1, 0)
    full = full_best_of_n_cost(10, 8)
    assert (full.transformer_calls, full.decodes, full.reward_calls) == (80, 8, 8)


def test_a_funnels_cost_charges_each_stage_only_for_the_seeds_alive_there():
    # 8 seeds to step 3, previews (1 decode + 1 reward call each), keep 3; those 3 on to step 5, previews, keep 1;
    # it finishes: calls 8*3 + 3*2 + 1*5 = 35; decodes and reward calls 8 + 3 + 1 = 12 each
    preview = PredictionCost(0, 1, 1)
    cost = selection_cost(10, [3, 5], 8, [3, 1], [preview, preview], scored=True)
    assert (cost.transformer_calls, cost.decodes, cost.reward_calls) == (35, 12, 12)
    # one stage given as lists is the one-stage cost
    assert selection_cost(10, [3], 8, [2], [preview], True) == selection_cost(10, 3, 8, 2, preview, True)


def _sampler(pipeline, batch_size: int = 1, noise_level: float = 0.0) -> FluxSampler:
    return FluxSampler(pipeline, 4, noise_level, 3.5, 32, 32, batch_size=batch_size)


def test_survivors_are_the_predicted_best_and_bit_identical_to_sampling_those_seeds_alone(tiny_flux_pipeline):
    # one rollout per transformer call: a rollout's arithmetic then cannot depend on its batch-mates (batched
    # CPU kernels differ in the last bits, ~1e-5 in pixels: rl/seed_selection.py)
    sampler = _sampler(tiny_flux_pipeline)
    embeds = encode_prompts(tiny_flux_pipeline, [s.prompt for s in SPECS], 16)
    reward = build_reward_set("shapes")
    selector = SeedSelector(sampler, predictor_for("preview", sampler, 2), 2, reward)
    seeds = [3, 11, 5, 8]
    choices = selector.select(embeds, seeds, keep=2, metadata=[s.to_dict() for s in SPECS], previews=True)
    for p, choice in enumerate(choices):
        assert choice.kept == keep_best(choice.predicted, 2)
        assert choice.chosen == choose(choice.kept, choice.kept_rewards)
        assert choice.previews.shape == (4, 3, 32, 32)
        for j, index in enumerate(choice.kept):
            alone = sampler.advance(sampler.start(torch.tensor([p]), torch.tensor([seeds[index]])), embeds, 4)
            assert torch.equal(sampler.decode(alone.latents)[0], choice.images[j])
        assert choice.cost == selection_cost(4, 2, 4, 2, PredictionCost(0, 1, 1), scored=True)
        assert json.loads(json.dumps(choice.to_dict()))["chosen_seed"] == seeds[choice.chosen]


def test_best_of_n_in_one_call_is_the_selector_built_by_hand(tiny_flux_pipeline):
    metadata = [s.to_dict() for s in SPECS]
    choices = best_of_n(
        tiny_flux_pipeline, [s.prompt for s in SPECS], 4, [3, 1], [1, 2], "preview", "shapes", num_steps=4,
        height=32, width=32, max_sequence_length=16, metadata=metadata, batch_size=1,
    )  # fmt: skip
    sampler = _sampler(tiny_flux_pipeline)
    predictors = [predictor_for("preview", sampler, k) for k in (1, 2)]
    selector = SeedSelector(sampler, predictors, [1, 2], build_reward_set("shapes"))
    embeds = encode_prompts(tiny_flux_pipeline, [s.prompt for s in SPECS], 16)
    for ours, by_hand in zip(choices, selector.select(embeds, [0, 1, 2, 3], [3, 1], metadata), strict=True):
        assert (ours.kept, ours.chosen, ours.cost) == (by_hand.kept, by_hand.chosen, by_hand.cost)
        assert torch.equal(ours.images, by_hand.images) and torch.equal(ours.predicted, by_hand.predicted)


def test_a_funnel_ranks_only_the_survivors_of_the_stage_before_and_finishes_them_exactly(tiny_flux_pipeline):
    sampler = _sampler(tiny_flux_pipeline)
    embeds = encode_prompts(tiny_flux_pipeline, [s.prompt for s in SPECS], 16)
    reward, metadata = build_reward_set("shapes"), [s.to_dict() for s in SPECS]
    previews = [predictor_for("preview", sampler, 1), predictor_for("preview", sampler, 3)]
    seeds = [3, 11, 5, 8, 2]
    funnel = SeedSelector(sampler, previews, [1, 3], reward).select(embeds, seeds, [3, 2], metadata)
    # keeping every seed at the first stage is the single prune at the second: same survivors, same images
    wide = SeedSelector(sampler, previews, [1, 3], reward).select(embeds, seeds, [5, 2], metadata)
    single = SeedSelector(sampler, predictor_for("preview", sampler, 3), 3, reward).select(embeds, seeds, 2, metadata)
    for p, (choice, everyone, once) in enumerate(zip(funnel, wide, single)):
        first = keep_best(choice.predicted, 3)
        later = choice.later_predicted[0]
        assert torch.isnan(later[[i for i in range(5) if i not in first]]).all()  # stopped at stage 1
        assert choice.kept == keep_best(torch.where(later.isnan(), -math.inf, later), 2)  # among stage 1's three
        assert set(choice.kept) <= set(first)
        assert choice.cost == selection_cost(4, [1, 3], 5, [3, 2], [PredictionCost(0, 1, 1)] * 2, scored=True)
        assert everyone.kept == once.kept and torch.equal(everyone.images, once.images)
        assert torch.equal(everyone.later_predicted[0], once.predicted)
        for j, index in enumerate(choice.kept):  # each survivor: the image its seed gives alone
            alone = sampler.advance(sampler.start(torch.tensor([p]), torch.tensor([seeds[index]])), embeds, 4)
            assert torch.equal(sampler.decode(alone.latents)[0], choice.images[j])
        report = json.loads(json.dumps(choice.to_dict()))
        assert sum(value is None for value in report["later_predicted"][0]) == 2


def test_a_funnel_must_narrow_as_it_goes(tiny_flux_pipeline):
    sampler = _sampler(tiny_flux_pipeline)
    reward = build_reward_set("shapes")
    preview = predictor_for("preview", sampler, 2)
    with pytest.raises(ValueError, match="must increase"):
        SeedSelector(sampler, [preview, preview], [3, 2], reward)
    with pytest.raises(ValueError, match="one per stage"):
        SeedSelector(sampler, [preview], [1, 2], reward)
    selector = SeedSelector(sampler, [preview, preview], [1, 2], reward)
    embeds = encode_prompts(tiny_flux_pipeline, [SPECS[0].prompt], 16)
    with pytest.raises(ValueError, match="must decrease"):
        selector.select(embeds, [0, 1, 2, 3], [2, 2])
    with pytest.raises(ValueError, match="one per capture step"):
        selector.select(embeds, [0, 1, 2, 3], 2)


def test_the_reward_oracle_keeping_one_is_full_best_of_n(tiny_flux_pipeline):
    sampler = _sampler(tiny_flux_pipeline, batch_size=8)
    embeds = encode_prompts(tiny_flux_pipeline, [s.prompt for s in SPECS], 16)
    reward = build_reward_set("shapes")
    metadata = [s.to_dict() for s in SPECS]
    oracle = SeedSelector(sampler, predictor_for("reward", sampler, 2), 2, reward).select(
        embeds, [0, 1, 2], 1, metadata
    )
    everything = SeedSelector(sampler, predictor_for("lookahead", sampler, 2), 2, reward).select(
        embeds, [0, 1, 2], 3, metadata
    )
    for best, full in zip(oracle, everything):
        assert float(best.kept_rewards[0]) == pytest.approx(float(full.kept_rewards.max()))
        assert best.cost.transformer_calls == 12  # every seed finished: N T, nothing more
        assert best.cost.reward_calls == 3  # the finished seeds' rewards are not asked for twice


def test_a_longer_preview_reads_what_the_lookahead_from_the_step_before_reads_one_call_cheaper(tiny_flux_pipeline):
    # preview@3 in 2 Euler steps starts with call 3's own velocity: the lookahead from step 2 makes that call again
    sampler = _sampler(tiny_flux_pipeline, batch_size=8)
    embeds = encode_prompts(tiny_flux_pipeline, [s.prompt for s in SPECS], 16)
    reward, metadata, seeds = build_reward_set("shapes"), [s.to_dict() for s in SPECS], [0, 1, 2, 3]
    preview = predictor_for("preview", sampler, 3, preview_steps=2)
    lookahead = predictor_for("lookahead", sampler, 2, lookahead_steps=2)
    assert preview.indices == lookahead.indices == [2, 3, 4]
    by_preview = SeedSelector(sampler, preview, 3, reward).select(embeds, seeds, 2, metadata)
    by_lookahead = SeedSelector(sampler, lookahead, 2, reward).select(embeds, seeds, 2, metadata)
    for a, b in zip(by_preview, by_lookahead):
        assert torch.allclose(a.predicted, b.predicted, atol=1e-5) and a.kept == b.kept
        assert torch.allclose(a.images, b.images, atol=1e-5)
    # 4 seeds x (3 calls + 1 more for the preview) + 2 x 1 = 18; the lookahead: 4 x (2 + 2) + 2 x 2 = 20
    assert by_preview[0].cost.transformer_calls == 18 and by_lookahead[0].cost.transformer_calls == 20
    # one Euler step is the plain x0 preview, at no transformer call: 4 x 3 + 2 x 1
    plain = predictor_for("preview", sampler, 3, preview_steps=1)
    assert plain.indices == []
    assert SeedSelector(sampler, plain, 3, reward).select(embeds, seeds, 2, metadata)[0].cost.transformer_calls == 14


def test_refuses_what_cannot_work(tiny_flux_pipeline):
    stochastic = _sampler(tiny_flux_pipeline, noise_level=0.7)
    with pytest.raises(ValueError, match="noise_level 0"):
        SeedSelector(stochastic, predictor_for("preview", stochastic, 2), 2, build_reward_set("shapes"))
    sampler = _sampler(tiny_flux_pipeline)
    with pytest.raises(ValueError, match="--predictor probe"):
        SeedSelector(sampler, predictor_for("lookahead", sampler, 2), 2, reward=None)


def test_a_probe_trained_under_the_trainers_sde_sampler_is_refused_for_deterministic_inference():
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained("assets/tiny-flux-shapes")
    sampler = FluxSampler(pipeline, 10, 0.0, 3.5, 64, 64)
    with pytest.raises(ProbeMismatchError, match="noise_level"):
        predictor_for("probe", sampler, 4, probe_path="assets/probe/tiny-flux-shapes-window-step4.pt", precision="bf16")


def test_a_probe_under_another_sampler_or_dtype_is_refused_naming_every_difference():
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained("assets/tiny-flux-shapes")
    probe = "assets/probe/tiny-flux-shapes-ode-step4.pt"  # trained on fp32 rollouts, 10 steps, guidance 3.5
    other = FluxSampler(pipeline, 8, 0.0, 2.0, 64, 64)
    with pytest.raises(ProbeMismatchError, match=r"num_steps: 10 -> 8;.*guidance_scale: 3.5 -> 2.0"):
        predictor_for("probe", other, 4, probe_path=probe)  # the step count alone was named before
    predictor_for("probe", FluxSampler(pipeline, 10, 0.0, 3.5, 64, 64), 4, probe_path=probe)  # its own: loads
    pipeline.transformer.to(torch.bfloat16)  # the precision is read from the pipeline (it was taken as fp32)
    with pytest.raises(ProbeMismatchError, match=r"precision: 'no' -> 'bf16'"):
        predictor_for("probe", FluxSampler(pipeline, 10, 0.0, 3.5, 64, 64), 4, probe_path=probe)


def test_sample_cli_best_of_writes_the_chosen_images_the_preview_grid_and_the_predictions(
    tiny_flux_pipeline, tmp_path, run_launch_script, capsys
):
    tiny_flux_pipeline.save_pretrained(tmp_path / "model")
    run_launch_script(
        "sample", "--pretrained", str(tmp_path / "model"), "--prompt", SPECS[0].prompt, "--prompt", SPECS[1].prompt,
        "--height", "32", "--width", "32", "--num_steps", "4", "--best_of", "4", "--keep", "2",
        "--predictor", "lookahead", "--capture_step", "2", "--reward", "shapes", "--out", str(tmp_path / "out"),
        "--batch_size", "1",
    )  # fmt: skip
    report = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert report["display_decodes_per_prompt"] == 4  # the preview grid's, outside the selection's cost
    # at batch 1 the written image is exactly the chosen seed sampled alone
    sampler = _sampler(tiny_flux_pipeline)
    embeds = encode_prompts(tiny_flux_pipeline, [SPECS[0].prompt], 16)
    chosen = torch.tensor([report["prompts"][0]["chosen_seed"]])
    alone = sampler.advance(sampler.start(torch.tensor([0]), chosen), embeds, 4)
    written = np.asarray(Image.open(tmp_path / "out" / "000_best.png"))
    assert np.array_equal(written, image_grid(sampler.decode(alone.latents), 1))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "000_best.png", "001_best.png", "previews.png", "selection.json"
    ]  # fmt: skip
    # calls 4*2 + 4*2 (lookahead) + 2*2 = 20 of full best-of-4's 16: at T = 4 a lookahead costs more than it saves
    assert report["cost_per_prompt"] == {"transformer_calls": 20.0, "decodes": 6.0, "reward_calls": 6.0}
    assert report["full_best_of_n_cost_per_prompt"]["transformer_calls"] == 16
    for prompt in report["prompts"]:
        ranked = sorted(range(4), key=lambda i: (-prompt["predicted"][i], i))[:2]
        assert prompt["kept_seeds"] == ranked and prompt["chosen_seed"] in ranked
        assert prompt["kept_rewards"] is not None  # the shapes metadata was found for the shapes-world texts
    assert "best of 4 (kept 2) for 2 prompts" in capsys.readouterr().out


def test_sample_cli_runs_a_funnel(tiny_flux_pipeline, tmp_path, run_launch_script, capsys):
    tiny_flux_pipeline.save_pretrained(tmp_path / "model")
    run_launch_script(
        "sample", "--pretrained", str(tmp_path / "model"), "--prompt", SPECS[0].prompt, "--height", "32",
        "--width", "32", "--num_steps", "4", "--best_of", "4", "--keep", "3", "1", "--predictor", "preview",
        "--capture_step", "1", "3", "--reward", "shapes", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    report = json.loads((tmp_path / "out" / "selection.json").read_text())
    # calls 4*1 + 3*2 + 1*1 = 11; decodes 4 + 3 previews + 1 image
    assert report["cost_per_prompt"] == {"transformer_calls": 11.0, "decodes": 8.0, "reward_calls": 8.0}
    (prompt,) = report["prompts"]
    first = sorted(range(4), key=lambda i: (-prompt["predicted"][i], i))[:3]
    assert prompt["kept_seeds"] == [prompt["chosen_seed"]] and prompt["chosen_seed"] in first
    assert [i for i, value in enumerate(prompt["later_predicted"][0]) if value is not None] == sorted(first)
    assert "best of 4 (kept 3/1) for 1 prompts" in capsys.readouterr().out
    # the second stage's preview in 2 Euler steps: one more call for each of its 3 seeds
    run_launch_script(
        "sample", "--pretrained", str(tmp_path / "model"), "--prompt", SPECS[0].prompt, "--height", "32",
        "--width", "32", "--num_steps", "4", "--best_of", "4", "--keep", "3", "1", "--predictor", "preview",
        "--capture_step", "1", "3", "--preview_steps", "1", "2", "--reward", "shapes", "--out", str(tmp_path / "two"),
    )  # fmt: skip
    report = json.loads((tmp_path / "two" / "selection.json").read_text())
    assert report["cost_per_prompt"]["transformer_calls"] == 14.0
    for wrong in (["--preview_steps", "2", "--predictor", "lookahead"], ["--preview_steps", "1", "2", "3"]):
        with pytest.raises(SystemExit) as stopped:
            run_launch_script("sample", "--pretrained", str(tmp_path / "model"), "--prompt", "p", "--best_of", "4",
                              "--capture_step", "1", "3", "--keep", "3", "1", "--reward", "shapes", *wrong)  # fmt: skip
        assert stopped.value.code == 2 and "--preview_steps" in capsys.readouterr().err


def test_sample_cli_warns_of_a_size_far_from_the_models(tiny_flux_pipeline, tmp_path, run_launch_script, capsys):
    tiny_flux_pipeline.save_pretrained(tmp_path / "model")
    common = ["--pretrained", str(tmp_path / "model"), "--prompt", SPECS[0].prompt, "--num_steps", "1", "--seeds", "0"]
    run_launch_script("sample", *common, "--height", "32", "--width", "32", "--out", str(tmp_path / "native"))
    assert "warning" not in capsys.readouterr().err
    run_launch_script("sample", *common, "--height", "128", "--width", "128", "--out", str(tmp_path / "far"))
    assert "warning: height x width = 128 x 128 px is more than 2x off this pipeline's native 32 x 32" in (
        capsys.readouterr().err
    )


def test_the_benchs_funnel_keeps_what_the_selector_keeps():
    from bench.seed_selection import funnel_survivors, stage_keeps

    first, second = np.array([0.9, 0.1, 0.5, 0.5, 0.7]), np.array([0.0, 9.0, 0.2, 0.3, 0.1])
    # stage 1 keeps seeds 0, 4 and 2 (0.5 tied with seed 3: the earlier); stage 2 ranks only those: 2, then 4
    assert funnel_survivors([first, second], [3, 2]) == [2, 4]
    assert funnel_survivors([first], [2]) == keep_best(torch.as_tensor(first), 2) == [0, 4]
    assert stage_keeps(8, 1) == [[1], [2]] and stage_keeps(16, 1) == [[1], [2], [4]]
    assert stage_keeps(8, 2) == [[2, 1], [3, 1], [3, 2], [4, 1], [4, 2], [5, 1], [5, 2]]


def test_bench_smoke_reports_every_selection_with_its_compute(tmp_path):
    from bench.seed_selection import calls_to_reach, main, recorded_cost

    report = main(["--smoke", "--out", str(tmp_path / "seed_selection"), "--raw", str(tmp_path / "raw.npz")])
    result = report["models"]["base"]
    rows = result["rows"]
    assert {(r["predictor"], r["n"], tuple(r["stage_keeps"])) for r in rows} == {
        (p, 4, (k,)) for p in ("preview@3", "preview@4", "lookahead@2", "lookahead@3") for k in (1, 2)
    } | {("preview@3>preview@5", 4, (2, 1))}  # the funnel: 4 seeds to step 3, 2 of them to 5, 1 finished
    funnel = next(r for r in rows if ">" in r["predictor"])
    assert funnel["transformer_calls"] == 4 * 3 + 2 * 2 + 1 * 5 and funnel["decodes"] == 4 + 2 + 1
    full = result["full_best_of"]
    for row in rows:  # a selection cannot beat the best of all N seeds
        assert row["reward"] <= full[4] + 1e-9
        assert row["calls_vs_full"] == pytest.approx(row["transformer_calls"] / 40)
    assert full[1] <= full[2] <= full[4]
    assert (tmp_path / "seed_selection.png").stat().st_size > 0
    for row in rows:
        assert row["speedup_at_equal_reward"] == pytest.approx(
            calls_to_reach(result["expected_best_of"], row["reward"], 10) / row["transformer_calls"]
        )
    # read back from the raw file and priced without sampling: the same report
    again = main(["--smoke", "--from_raw", str(tmp_path / "raw.npz"), "--out", str(tmp_path / "again")])
    assert again["models"] == report["models"]
    with pytest.raises(ValueError, match="measured with {'num_steps': 10, 'reward': 'shapes'}, this report asks for"):
        main(["--smoke", "--from_raw", str(tmp_path / "raw.npz"), "--num_steps", "20", "--out", str(tmp_path / "x")])
    assert recorded_cost("probe@4", 10) == PredictionCost()  # the probe reads the capture step's own forward
    assert recorded_cost("lookahead@3", 10) == PredictionCost(2, 1, 1)  # two Euler steps, two calls
    assert recorded_cost("preview@3+3", 10) == PredictionCost(2, 1, 1)  # the first step reuses call 3's velocity
    with pytest.raises(ValueError, match="reward@10: a 'reward' prediction is not priced from a raw file"):
        recorded_cost("reward@10", 10)


def test_the_expected_best_of_m_and_the_calls_it_needs_for_a_reward():
    from bench.seed_selection import calls_to_reach, expected_best_of

    real = np.array([[0.1, 0.4, 0.2], [1.0, 0.0, 0.5]])
    curve = expected_best_of(real)
    # by hand: m = 1 the mean seed; m = 2 the mean best of the 3 pairs; m = 3 the best
    assert curve[1] == pytest.approx((0.7 / 3 + 1.5 / 3) / 2)
    assert curve[2] == pytest.approx(((0.4 + 0.2 + 0.4) / 3 + (1.0 + 0.5 + 1.0) / 3) / 2)
    assert curve[3] == pytest.approx((0.4 + 1.0) / 2)
    assert calls_to_reach(curve, curve[1] - 0.1, 10) == 10  # below one seed: one seed's calls
    assert calls_to_reach(curve, curve[2], 10) == pytest.approx(20)
    assert calls_to_reach(curve, (curve[2] + curve[3]) / 2, 10) == pytest.approx(25)
    assert math.isnan(calls_to_reach(curve, curve[3] + 0.01, 10))


def test_preview_grid_frames_survivors_green_and_the_chosen_seed_blue():
    previews = torch.full((4, 3, 8, 8), 0.5)
    choice = SeedChoice("a square", [0, 1, 2, 3], torch.zeros(4), kept=[2, 0], kept_rewards=None, chosen=0,
                        images=torch.zeros(2, 3, 8, 8), cost=PredictionCost(0, 0, 0), previews=previews)  # fmt: skip
    grid = preview_grid([choice, choice])
    assert grid.shape == (8, 3, 8, 8)  # prompt-major: both prompts' 4 seeds
    corner = grid[:, :, 0, 0]  # the border's colour; the inside is untouched
    assert torch.allclose(corner[0], torch.tensor([0.1, 0.3, 1.0]))  # chosen: blue
    assert torch.allclose(corner[2], torch.tensor([0.1, 0.8, 0.1]))  # kept: green
    assert torch.equal(corner[1], torch.full((3,), 0.5)) and torch.equal(corner[3], corner[1])  # pruned: none
    assert torch.equal(grid[:, :, 2:-2, 2:-2], previews.repeat(2, 1, 1, 1)[:, :, 2:-2, 2:-2])


def test_without_a_reward_the_best_predicted_survivor_is_returned_and_nothing_is_scored(tiny_flux_pipeline):
    sampler = _sampler(tiny_flux_pipeline, batch_size=4)
    embeds = encode_prompts(tiny_flux_pipeline, [s.prompt for s in SPECS], 24)
    torch.manual_seed(0)  # the random probe's weights
    selector = SeedSelector(
        sampler, predictor_for("probe", sampler, 2, probe_path="init", text_length=24), 2, reward=None
    )
    for choice in selector.select(embeds, [0, 1, 2, 3], keep=2):
        assert choice.kept == keep_best(choice.predicted, 2) and choice.chosen == choice.kept[0]
        assert choice.kept_rewards is None and choice.images.shape == (2, 3, 32, 32)
        # a probe costs nothing: 4 seeds x 2 steps + 2 survivors x 2 steps, 2 decodes, no reward call
        assert choice.cost == selection_cost(4, 2, 4, 2, PredictionCost(), scored=False)
        assert (choice.cost.transformer_calls, choice.cost.reward_calls) == (12, 0)


def test_sample_cli_ranks_by_the_shipped_probe_without_any_reward_call(tmp_path, run_launch_script):
    root = Path(__file__).resolve().parents[2]
    run_launch_script(
        "sample", "--pretrained", str(root / "assets" / "tiny-flux-shapes"), "--prompt", SPECS[0].prompt,
        "--best_of", "4", "--keep", "2", "--predictor", "probe", "--capture_step", "4",
        "--probe_path", str(root / "assets" / "probe" / "tiny-flux-shapes-ode-step4.pt"), "--out", str(tmp_path),
    )  # fmt: skip
    report = json.loads((tmp_path / "selection.json").read_text())
    # 4 seeds x 4 calls + 2 x 6; the probe reads the capture step's own forward; no reward: nothing scored
    assert report["cost_per_prompt"] == {"transformer_calls": 28.0, "decodes": 2.0, "reward_calls": 0.0}
    (prompt,) = report["prompts"]
    assert prompt["kept_rewards"] is None and len(prompt["predicted"]) == 4
    kept = sorted(range(4), key=lambda i: (-prompt["predicted"][i], i))[:2]
    assert prompt["kept_seeds"] == kept and prompt["chosen_seed"] == kept[0]  # by the prediction
    grid = np.asarray(Image.open(tmp_path / "previews.png"))
    assert grid.shape[1] > grid.shape[0]  # one row of the 4 seeds' previews


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--best_of", "4", "--keep", "6", "--reward", "shapes"], "--keep 6 must decrease within [1, --best_of 4]"),
        (["--best_of", "8", "--keep", "3", "2", "--capture_step", "3", "--reward", "shapes"], "--keep 3 2: give one per --capture_step (3)"),
        (["--best_of", "8"], "--predictor lookahead scores decoded previews with the real reward: give --reward"),
        (["--best_of", "-1"], "--best_of must be >= 2"),
        (["--best_of", "4", "--predictor", "probe"], "--predictor probe needs --probe_path"),
        (["--best_of", "4", "--capture_step", "12", "--reward", "shapes"], "--capture_step 12 must increase within [1, --num_steps - 1 = 9]"),
        (["--best_of", "4", "--seeds", "3", "--reward", "shapes"], "--best_of 4 samples seeds 0..3: leave out --seeds"),
        (["--keep", "2", "--predictor", "preview"], "--keep --predictor select among seeds: give --best_of N"),
        (["--lora", "no/such/lora"], "--lora no/such/lora does not exist"),
        (["--num_steps", "0"], "--num_steps must be >= 1, got 0"),
        (["--max_prompts", "-1"], "--max_prompts must be >= 0 (0: all), got -1"),
        (["--seeds", "3", "3"], "--seeds 3 3 repeats a seed"),
        (["--best_of", "4", "--reward", "shapes", "--lookahead_steps", "0"], "--lookahead_steps must be >= 1 (Euler steps to sigma 0), got 0"),
    ],
)  # fmt: skip
def test_sample_cli_misuse_is_one_line_before_the_model_loads(extra, message, run_launch_script, capsys, monkeypatch):
    """Each mistake ends in argparse's one usage error (exit 2) naming the option, before the pipeline loads (here
    a path that does not exist: loading it would fail differently)."""
    with pytest.raises(SystemExit) as exit_:
        run_launch_script("sample", "--pretrained", "no/such/model", "--prompt", "a red circle", "--out", "x", *extra)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
