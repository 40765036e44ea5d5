"""The ablation harness's overrides and its reading of runs (rl/ablation.py) on hand-written metrics files."""

import json
import math

import pytest

from rl.ablation import (
    VARIANTS,
    Budget,
    read_run,
    seed_summary,
    summary_table,
    variant_overrides,
    write_report,
    write_seed_report,
)
from rl.config_parse import parse_config
from rl.cost import OperationCosts


def write_run(directory, step_seconds, images_per_step, evals, final, calls_per_step=100.0):
    """A metrics.jsonl as the trainer writes it with log_every 1: base eval, steps, periodic evals, final eval."""
    directory.mkdir(parents=True)
    records = [{"step": 0, "base_eval/total/mean": evals[0], "time/base_eval_s": 9.0}]
    for step, seconds in enumerate(step_seconds, start=1):
        records.append(
            {
                "step": step,
                "time/step_s": seconds,
                "time/sample_s": seconds / 2,
                "time/train_s": seconds / 2,
                "train/images_denoised": step * images_per_step,
                "train/images_seen": step * 8,  # finished images; the reward calls add previews' (2 per step)
                "compute/reward_calls": step * 10,
                "compute/transformer_calls": step * calls_per_step,
                "compute/flux_equivalent": step * calls_per_step * 1.5,
                "reward/group_std": 0.2 + 0.01 * step,
            }
        )
        if step in evals:
            records.append({"step": step, "eval/total/mean": evals[step], "time/eval_s": 5.0})
    records.append({"step": len(step_seconds), "final_eval/total/mean": final})
    (directory / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_seed_curves_match_evaluations_by_step_and_end_at_each_seeds_final():
    """Seeds a compute budget stopped at different steps: points at the steps all have, then the mean of each
    seed's final (pairing by position averaged step 15 with 17 and dropped a seed's final)."""
    from rl.ablation import RunCurve, seed_curve

    def run(steps, reward):
        return RunCurve("v", steps, [float(s) for s in steps], [float(s) for s in steps], reward, 0.0, {},
                        [float(s) for s in steps], [float(s) for s in steps])  # fmt: skip

    curve = seed_curve(
        [run([0, 5, 10, 15, 20], [0.1, 0.2, 0.3, 0.35, 0.40]), run([0, 5, 10, 17], [0.1, 0.2, 0.3, 0.38])]
    )
    assert curve["steps"] == [0, 5, 10, 20]
    assert curve["reward_mean"] == pytest.approx([0.1, 0.2, 0.3, 0.39])  # the last point: the mean of the finals
    assert curve["seconds"][-1] == pytest.approx(18.5)
    same = seed_curve([run([0, 5, 10], [0.1, 0.2, 0.3]), run([0, 5, 10], [0.1, 0.4, 0.5])])
    assert same["steps"] == [0, 5, 10] and same["reward_mean"] == pytest.approx([0.1, 0.3, 0.4])


def test_curves_table_and_time_to_target(tmp_path):
    # unpruned: 4 steps of 10 s, 16 images each; evals 0.1 (base), 0.3 at step 2, final 0.5 at step 4
    write_run(tmp_path / "unpruned", [10, 10, 10, 10], 16, {0: 0.1, 2: 0.3}, 0.5)
    # pruned: 6 s steps, 9.6 images; reaches 0.5 at step 4 (24 s) and ends at 0.6 (36 s)
    write_run(tmp_path / "pruned", [6] * 6, 9.6, {0: 0.1, 2: 0.35, 4: 0.5}, 0.6)
    runs = [read_run("pruned", tmp_path / "pruned"), read_run("unpruned", tmp_path / "unpruned")]
    pruned = runs[0]
    assert pruned.steps == [0, 2, 4, 6] and pruned.seconds == [0, 12, 24, 36]
    assert pruned.images == pytest.approx([0, 19.2, 38.4, 57.6]) and pruned.reward == [0.1, 0.35, 0.5, 0.6]
    assert pruned.reward_calls == 60 and pruned.phase_seconds == {"sample": 18.0, "train": 18.0}
    rows, table = summary_table(runs)
    by_name = {row["variant"]: row for row in rows}
    # target = unpruned final 0.5, reached by pruned at 24 s; unpruned needs all 40 s -> 40 / 24 = 1.667x
    assert by_name["pruned"]["seconds_to_target"] == 24 and by_name["pruned"]["speedup_to_target"] == pytest.approx(
        40 / 24
    )
    assert by_name["unpruned"]["speedup_to_target"] == pytest.approx(1.0)
    assert "| pruned | 0.6000 |" in table and "s to 0.5000" in table
    report = write_report(runs, tmp_path, "python launch/ablate.py --test")
    assert (tmp_path / "reward_vs_wallclock.png").stat().st_size > 1000
    assert (tmp_path / "reward_vs_images.png").stat().st_size > 1000
    assert report["rows"][0]["final_reward"] == 0.6 and (tmp_path / "ablation.md").exists()


def test_time_to_target_counts_from_the_references_own_first_reach(tmp_path):
    """Unpruned reaches its final 0.5 at step 2 (20 s) already: a variant reaching 0.5 at 24 s is slower (20 / 24),
    and unpruned scores itself 1.00x, as the seeded summary measures."""
    write_run(tmp_path / "unpruned", [10, 10, 10, 10], 16, {0: 0.1, 2: 0.5}, 0.5)
    write_run(tmp_path / "pruned", [6] * 6, 9.6, {0: 0.1, 2: 0.35, 4: 0.5}, 0.6)
    rows, _ = summary_table([read_run("pruned", tmp_path / "pruned"), read_run("unpruned", tmp_path / "unpruned")])
    assert rows[0]["speedup_to_target"] == pytest.approx(20 / 24) and rows[1]["speedup_to_target"] == 1.0


def test_unfinished_runs_and_missed_targets(tmp_path):
    write_run(tmp_path / "unpruned", [10, 10], 16, {0: 0.1}, 0.5)
    write_run(tmp_path / "random", [5, 5], 8, {0: 0.1}, 0.2)
    rows, table = summary_table([read_run("unpruned", tmp_path / "unpruned"), read_run("random", tmp_path / "random")])
    assert rows[1]["seconds_to_target"] == math.inf and math.isnan(rows[1]["speedup_to_target"])  # null, not 0.00x
    assert "| not reached |" in table
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.jsonl").write_text('{"step": 0, "base_eval/total/mean": 0.1}\n')
    with pytest.raises(ValueError, match="did not finish"):
        read_run("broken", tmp_path / "broken")


def test_a_run_is_repriced_from_its_operation_counts(tmp_path):
    counts = {"transformer_calls": 100.0, "train_passes": 10.0, "decodes": 8.0, "reward_calls": 8.0}
    records = [
        {"step": 0, "base_eval/total/mean": 0.1},
        {
            "step": 1,
            "time/step_s": 3.0,
            "compute/flux_equivalent": 130.48,
            **{f"compute/{k}": v for k, v in counts.items()},
        },
        {"step": 1, "final_eval/total/mean": 0.2},
    ]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert read_run("run", tmp_path / "run").flux == [0.0, 130.48]  # as logged: 100 + 3 x 10 + 0.05 x 8 + 0.01 x 8
    vlm_judge = OperationCosts(reward_call=20.0)  # ablate.py --reward_call_cost 20
    assert read_run("run", tmp_path / "run", vlm_judge).flux == pytest.approx([0.0, 100 + 30 + 0.4 + 160])


def test_variant_overrides_parse_and_differ_only_in_pruning(tmp_path):
    base = ["--prune_policy", "topk", "--probe_path", "init", "--capture_step", "2"]
    configs = {
        v: parse_config([*base, *variant_overrides(v, tmp_path, Budget(minutes=10.0))])
        for v in ("pruned", "unpruned", "random")
    }
    assert configs["pruned"].pruning.prune_policy == "topk" and configs["unpruned"].pruning.prune_policy == "none"
    assert configs["random"].pruning.prune_policy == "random" and configs["random"].pruning.probe_path == ""
    assert {c.training.seed for c in configs.values()} == {0} and configs["random"].training.max_minutes == 10.0
    assert configs["unpruned"].logging.output_dir == str(tmp_path / "unpruned")
    # a pruned run training early steps on imputed advantages: the controls switch both off
    early = [*base, "--prune_advantage", "imputed", "--prune_train_early", "true"]
    for v in ("unpruned", "random"):
        assert not parse_config(
            [*early, *variant_overrides(v, tmp_path, Budget(minutes=10.0))]
        ).pruning.prune_train_early
    with pytest.raises(ValueError, match="budget"):
        variant_overrides("pruned", tmp_path, Budget())
    with pytest.raises(ValueError, match="unknown variant"):
        variant_overrides("fast", tmp_path, Budget(minutes=1.0))


def launch_ablate():
    """launch/ablate.py as a module (no run starts before its plan has parsed every config)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))
    import ablate

    return ablate


def test_the_default_variants_run_on_the_shipped_config_without_a_probe(tmp_path):
    ablate = launch_ablate()
    options, passthrough = ablate.parse(["--budget_steps", "1", "--out", str(tmp_path)])
    assert options.variants == "unpruned,keep_preview,keep_random"
    commands = ablate.plan(options, passthrough)  # each run's config parsed and validated: no error
    assert [path.name for path in commands] == ["unpruned", "keep_preview", "keep_random"]


def test_the_pruned_variant_without_a_predicting_policy_names_every_one(tmp_path):
    ablate = launch_ablate()
    options, passthrough = ablate.parse(["--budget_steps", "1", "--out", str(tmp_path), "--variants", "pruned"])
    with pytest.raises(ValueError) as refused:
        ablate.plan(options, passthrough)
    assert "pass --prune_policy threshold|maxvar|topk|variance with --probe_path" in str(refused.value)
    assert "default: unpruned,keep_preview,keep_random" in str(refused.value)


@pytest.mark.parametrize(
    "argv, line",
    [
        (["--budget_steps", "1", "--variants", "unpruned,unprunned"],
         "error: unknown variant 'unprunned' in --variants; did you mean 'unpruned'? choose from awm_adv_scale_1, "),
        (["--variants", "unpruned"], "error: give a budget: --budget_minutes (wall-clock), "),
        (["--budget_steps", "1", "--prompts_per_stp", "2"],
         "error: unknown config key 'prompts_per_stp' in the command line; did you mean 'prompts_per_step'?"),
    ],
)  # fmt: skip
def test_ablate_user_errors_are_one_line_and_exit_2(argv, line, tmp_path, capsys, monkeypatch):
    from rl.user_errors import run_cli

    monkeypatch.delenv("GRPO_DEBUG", raising=False)
    ablate = launch_ablate()
    assert run_cli(lambda: ablate.main([*argv, "--out", str(tmp_path / "ablate")])) == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1
    assert not (tmp_path / "ablate").exists()  # nothing ran


def test_ablate_from_the_command_line_prints_one_error_line_and_exits_2(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "launch" / "ablate.py"
    done = subprocess.run([sys.executable, str(script), "--budget_steps", "1", "--prompts_per_stp", "2", "--out",
                           str(tmp_path / "ablate")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GRPO_DEBUG": ""})  # fmt: skip
    assert done.returncode == 2 and done.stderr == (
        "error: unknown config key 'prompts_per_stp' in the command line; did you mean 'prompts_per_step'?\n"
    )


def test_a_target_reached_at_no_cost_has_no_speedup_and_the_json_stays_strict(tmp_path):
    """A tiny budget: every run's base evaluation already reaches the reference's final reward."""
    write_run(tmp_path / "unpruned", [10], 16, {0: 0.5}, 0.4)
    write_run(tmp_path / "keep_random", [5], 8, {0: 0.5}, 0.3)
    runs = [read_run("unpruned", tmp_path / "unpruned"), read_run("keep_random", tmp_path / "keep_random")]
    report = write_report(runs, tmp_path, "python launch/ablate.py --budget_steps 1")
    assert report["rows"][0]["speedup_to_target"] == 1.0 and math.isnan(report["rows"][1]["speedup_to_target"])
    table = (tmp_path / "ablation.md").read_text()
    assert "| 0 | 1.00x |" in table and "| 0 | n/a |" in table and "nan" not in table

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    written = json.loads((tmp_path / "ablation.json").read_text(), parse_constant=refuse)
    assert written["rows"][1]["speedup_to_target"] is None
    write_run(tmp_path / "u1", [10], 16, {0: 0.5}, 0.4)
    seeds = {"unpruned": [runs[0], read_run("unpruned", tmp_path / "u1")], "keep_random": [runs[1]]}
    write_seed_report(seeds, tmp_path, "python launch/ablate.py --seeds 0 1", {"seeds": [0, 1]})
    summary = (tmp_path / "summary.md").read_text()
    assert "| 1.00x | 1.00x | 1.00x |" in summary and "| n/a | n/a | n/a |" in summary and "nan" not in summary
    written = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert written["variants"]["keep_random"]["speedup_wallclock"] is None


def fixture_ablation(pipeline, tmp_path):
    """launch/ablate.py as a module, and the overrides that fit the tiny fixture (32 px, 4 steps, 2 x 4)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))
    import ablate

    pipeline.save_pretrained(tmp_path / "pipeline")
    return ablate, [
        "--pretrained", str(tmp_path / "pipeline"), "--max_sequence_length", "16", "--lora_rank", "4",
        "--lora_alpha", "8", "--height", "32", "--width", "32", "--num_steps", "4", "--prompts_per_step", "2",
        "--group_size", "4", "--train_batch_size", "4", "--progress_bar", "false", "--reward", "jpeg_compressibility",
        "--capture_step", "1", "--eval_every", "1", "--eval_prompts_count", "2", "--out", str(tmp_path / "ablate"),
    ]  # fmt: skip


@pytest.mark.slow
def test_ablate_runs_three_variants_end_to_end(tiny_flux_pipeline, tmp_path):
    """launch/ablate.py on the fixture: three real training runs of 2 steps each, then the report (~1-2 min)."""
    ablate, common = fixture_ablation(tiny_flux_pipeline, tmp_path)
    args = [*common, "--prune_policy", "topk", "--probe_path", "init", "--probe_refresh_every", "1",
            "--budget_minutes", "5", "--max_steps", "2", "--variants", "pruned,unpruned,random"]  # fmt: skip
    report = ablate.main(args)
    rows = {row["variant"]: row for row in report["rows"]}
    assert set(rows) == {"pruned", "unpruned", "random"} and all(row["steps"] == 2 for row in rows.values())
    # unpruned: 2 steps x 8 rollouts, all denoised and scored; pruned / random: 8 x 1/4 + 4 x 3/4 = 5 per step
    assert rows["unpruned"]["images_denoised"] == 16 and rows["unpruned"]["reward_calls"] == 16
    assert rows["pruned"]["images_denoised"] == 10 and rows["random"]["reward_calls"] == 8
    assert (tmp_path / "ablate" / "reward_vs_images.png").exists()


def test_seed_summary_means_bands_and_speedups_on_every_axis(tmp_path):
    # unpruned, 2 seeds: finals 0.50 / 0.54 (target 0.52), 4 steps of 10 s and 100 calls, evals at 2 and 4
    runs = {"unpruned": [], "fast": []}
    for seed, (mid, final) in enumerate([(0.40, 0.50), (0.44, 0.54)]):
        write_run(tmp_path / f"u{seed}", [10] * 4, 16, {0: 0.1, 2: mid}, final)
        runs["unpruned"].append(read_run("unpruned", tmp_path / f"u{seed}"))
    # fast: 5 s and 50 calls a step; seed-mean 0.53 at step 2 already (0.52 and 0.54), ends 0.55 +- 0.01414
    for seed, (mid, final) in enumerate([(0.52, 0.54), (0.54, 0.56)]):
        write_run(tmp_path / f"f{seed}", [5] * 4, 8, {0: 0.1, 2: mid}, final, calls_per_step=50.0)
        runs["fast"].append(read_run("fast", tmp_path / f"f{seed}"))
    summary = seed_summary(runs)
    fast = summary["variants"]["fast"]
    assert summary["target_reward"] == pytest.approx(0.52)
    assert fast["final_reward_mean"] == pytest.approx(0.55) and fast["final_reward_std"] == pytest.approx(
        0.02**0.5 / 10
    )
    assert fast["seeds"] == 2 and fast["to_target_wallclock"] == 10 and fast["to_target_calls"] == 100
    # unpruned reaches its own mean final (0.52) only at its end: 40 s, 400 calls -> 4x on each axis
    assert fast["speedup_wallclock"] == pytest.approx(4.0) and fast["speedup_calls"] == pytest.approx(4.0)
    assert fast["speedup_flux_compute"] == pytest.approx(4.0)
    assert summary["variants"]["unpruned"]["speedup_wallclock"] == pytest.approx(1.0)
    # the seeds resampled: fast reaches a resampled target at 10 s (4x) or, against the 0.54 of (u1, u1), only at
    # its end, 20 s, unless it drew (f1, f1) (2x, 3 draws in 16); unpruned against itself misses 0.54 with (u0, u0)
    assert fast["speedup_wallclock_interval"] == [2.0, 4.0] == fast["speedup_flux_compute_interval"]
    assert summary["variants"]["unpruned"]["speedup_calls_interval"] == [0.0, 1.0]
    assert fast["selection"]["reward/group_std"] == pytest.approx(0.225)
    assert fast["curve"]["reward_std"][0] == 0.0 and fast["curve"]["steps"] == [0, 2, 4]
    report = write_seed_report(runs, tmp_path, "python launch/ablate.py --seeds 0 1", {"seeds": [0, 1]})
    assert (tmp_path / "reward_vs_cost.png").stat().st_size > 1000 and report["variants"]["fast"]["seeds"] == 2
    table = (tmp_path / "summary.md").read_text()
    assert "| fast | 2 | 0.5500 +- 0.0141 |" in table and "| 4.00x (2.00-4.00) |" in table
    with pytest.raises(ValueError, match="baseline variant 'unpruned' has no finished run"):
        seed_summary({"fast": runs["fast"]})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_parses_under_the_default_config(tmp_path, variant):
    probe = "assets/probe/tiny-flux-shapes-window-step4.pt"
    args = ["--config", "configs/tiny_shapes.yaml", "--probe_path", probe, "--prune_policy", "topk"]
    config = parse_config([*args, "--capture_step", "4", *variant_overrides(variant, tmp_path, Budget(steps=8))])
    assert config.training.max_steps == 8
    if variant.startswith("expand") or variant == "pods":  # 2 G started, half kept
        assert config.started_group_size == 16 and config.pruning.prune_keep_fraction == 0.5
    if variant.startswith("awm_"):  # the reference's AWM options are measured unpruned, under AWM
        assert config.pruning.prune_policy == "none" and config.training.policy_objective == "awm"


def test_ablate_with_seeds_runs_in_parallel_and_resumes(tiny_flux_pipeline, tmp_path):
    """launch/ablate.py --seeds on the fixture: 2 variants x 2 seeds of 2 steps, two at a time, then a rerun that
    keeps the finished runs; the summary has every key of rl.ablation.seed_summary per variant."""
    import json

    ablate, common = fixture_ablation(tiny_flux_pipeline, tmp_path)
    args = [*common, "--budget_steps", "2", "--seeds", "0", "1", "--jobs", "2", "--threads", "1",
            "--variants", "unpruned,pods"]  # fmt: skip
    summary = ablate.main(args)
    for name in ("unpruned", "pods"):
        entry = summary["variants"][name]
        assert entry["seeds"] == 2 and len(entry["final_rewards"]) == 2
        assert {"final_reward_mean", "final_reward_std", "speedup_wallclock", "speedup_calls",
                "speedup_flux_compute"} <= set(entry)  # fmt: skip
    # PODS finishes twice the rollouts: 2 prompts x 8 x 4 calls per step, against 2 x 4 x 4 unpruned
    assert summary["variants"]["pods"]["total_calls"] == 2 * summary["variants"]["unpruned"]["total_calls"]
    assert json.loads((tmp_path / "ablate" / "summary.json").read_text())["seeds"] == [0, 1]
    assert (tmp_path / "ablate" / "reward_vs_cost.png").stat().st_size > 1000
    log = (tmp_path / "ablate" / "seed0" / "pods" / "metrics.jsonl").stat().st_mtime
    ablate.main(args)  # everything finished before: nothing runs again
    assert (tmp_path / "ablate" / "seed0" / "pods" / "metrics.jsonl").stat().st_mtime == log
    # a run killed after its last checkpoint, in its final evaluation, resumes from it (it was deleted and run
    # again from step 0)
    killed = tmp_path / "ablate" / "seed1" / "unpruned"
    (killed / "summary.json").unlink()
    lines = (killed / "metrics.jsonl").read_text().splitlines(keepends=True)
    (killed / "metrics.jsonl").write_text("".join(line for line in lines if "final_eval/" not in line))
    ablate.main(args)
    assert "resumed from" in (tmp_path / "ablate" / "seed1" / "unpruned.log").read_text()
    assert (tmp_path / "ablate" / "seed1" / "unpruned" / "summary.json").is_file()
    # another config into the same folders would mix two ablations into one summary: refused before any run
    with pytest.raises(ValueError, match=r"4 run folder\(s\) hold a run of another config: .*seed0/unpruned "
                                         r"\(learning_rate: 0\.0005 -> 0\.5\)"):  # fmt: skip
        ablate.main([*args, "--learning_rate", "0.5"])
    ablate.main([*args, "--progress_bar", "true", "--report_only"])  # neutral keys and reading back: no error
    out = ["--out", str(tmp_path / "ablate"), "--seeds", "0", "1", "--variants", "unpruned,pods", "--report_only"]
    assert ablate.main(out)["variants"]["pods"]["seeds"] == 2  # the documented re-read needs no budget


def test_a_seeded_ablation_without_its_baseline_stops_before_any_run(tiny_flux_pipeline, tmp_path):
    ablate, common = fixture_ablation(tiny_flux_pipeline, tmp_path)
    args = [*common, "--budget_steps", "2", "--seeds", "0", "--variants", "keep_oracle"]
    with pytest.raises(ValueError, match="--variants must include unpruned"):
        ablate.main(args)
    assert not (tmp_path / "ablate").exists()  # nothing ran


def test_budget_and_pricing_mistakes_are_named_before_any_run(tiny_flux_pipeline, tmp_path, capsys):
    """A compute budget spent at the default prices cannot be reported at others in the same command; a decaying
    learning-rate schedule under a non-step budget is constant in effect, and said so."""
    ablate, common = fixture_ablation(tiny_flux_pipeline, tmp_path)
    args = [*common, "--seeds", "0", "--variants", "unpruned", "--budget_flux_compute", "100"]
    with pytest.raises(ValueError, match="--reward_call_cost 20.0 re-prices the report, but the runs spend"):
        ablate.main([*args, "--reward_call_cost", "20"])
    ablate.plan(*ablate.parse([*args, "--lr_schedule", "cosine"]))
    assert "lr_schedule cosine decays over max_steps=100000" in capsys.readouterr().out
    ablate.plan(*ablate.parse([*args, "--lr_schedule", "constant"]))
    assert "lr_schedule" not in capsys.readouterr().out
    assert not (tmp_path / "ablate").exists()  # nothing ran
