"""Groups never split, at any scale: 5 prompts per step on 1, 2 and 3 CPU processes (docs/design.md section 8).

5 divides by neither 2 nor 3, so the processes own 3 + 2 and 2 + 2 + 1 prompt groups. Every group lives on one
process, every prompt of the step is trained once (no prompt added to even the shares out, none dropped), and
the logged metrics are global sums over global counts: a mean of per-process means would differ between the
uneven shares. Prompt skipping is on, so step 2's draw depends on step 1's groups gathered from every process.
"""

import pytest
import torch
from launching import CPU_2PROC, finish, launch, ranks, run_args, trained

from rl.metrics_log import read_metrics

PROMPTS, GROUP, TRAINED_STEPS = 5, 2, 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_flux_config):
    """The same 2-step run on 1, 2 and 3 processes, side by side; ``{processes: dump folder}``."""
    from rewards.shapes import vocabulary
    from rl.tiny_flux import build_tiny_flux_pipeline

    root = tmp_path_factory.mktemp("uneven")
    # 6 prompts, 3 of even length (flat under the test reward): step 2 draws some of step 1's flat ones again
    (root / "prompts.txt").write_text(
        "a red circle\na blue square\ntwo red stars\na cat\none big red circle\na green ring\n"
    )
    build_tiny_flux_pipeline(vocabulary(), tiny_flux_config, seed=0).save_pretrained(root / "pipeline")
    dumps = {processes: root / f"p{processes}" for processes in (1, 2, 3)}
    started = []
    for processes, dump in dumps.items():
        args = run_args(root / "pipeline", dump / "run") + [
            "--prompts_per_step", str(PROMPTS), "--group_size", str(GROUP), "--sample_batch_size", "10",
            "--train_batch_size", "2", "--num_steps", "3", "--train_window_size", str(TRAINED_STEPS),
            "--final_eval_num_prompts", "2", "--final_eval_images_per_prompt", "1",
            "--prompt_skip_after", "1", "--prompt_skip_explore", "0",  # step 2's draw reads step 1's groups
            "--prompts", str(root / "prompts.txt"), "--reward", "launching:half_flat_reward",
        ]  # fmt: skip
        launcher = ("--config_file", CPU_2PROC, "--num_processes", str(processes)) if processes > 1 else ()
        started.append(launch(dump, args, *launcher))
    for process in started:
        finish(process)
    return dumps


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_every_group_lives_on_one_process_and_is_trained_once(runs, processes):
    records = trained(runs[processes])
    assert len(records) == processes
    for step in range(2):
        shares = [rank[step]["prompt_groups"] for rank in records]
        assert sorted(sum(shares, [])) == list(range(PROMPTS))  # each prompt on exactly one process, none added
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        # every process drew the same prompts: the skipping history is global, not a process's own
        assert all(rank[step]["step_texts"] == records[0][step]["step_texts"] for rank in records)
        for rank in records:
            record = rank[step]
            # all G rollouts of a group on the process that owns its prompt
            assert sorted(record["rollout_groups"]) == sorted(g for g in record["prompt_groups"] for _ in range(GROUP))
            # each rollout entered the loss once per trained step (one inner epoch), filler rows never
            assert record["trained"] == [TRAINED_STEPS] * len(record["rollout_groups"])
    lora = ranks(runs[processes])
    assert all(torch.equal(a, b) for other in lora[1:] for a, b in zip(lora[0], other))


def test_metrics_are_global_sums_over_global_counts(runs):
    logged = {
        processes: [r for r in read_metrics(dump / "run" / "metrics.jsonl") if "reward/total/mean" in r]
        for processes, dump in runs.items()
    }
    for records in logged.values():
        assert [r["train/images_seen"] for r in records] == [PROMPTS * GROUP, 2 * PROMPTS * GROUP]
        # step 1's flat prompts, known on every process, were skipped when step 2 drew them
        assert records[0]["prompts/flat_groups"] > 0 and records[1]["prompts/skipped"] > 0
    # step 1 samples the same 10 rollouts at every scale (prompts and noise are functions of the global index)
    # before any update, so its reduced metrics agree although 3 + 2 and 2 + 2 + 1 groups were scored apart
    one = logged[1][0]
    for processes in (2, 3):
        keys = ("reward/total/mean", "reward/total/std", "reward/group_std", "adv/abs_mean", "adv/zero_frac",
                "prompts/flat_groups")  # fmt: skip
        for key in keys:
            assert logged[processes][0][key] == pytest.approx(one[key], abs=1e-6), (processes, key)
