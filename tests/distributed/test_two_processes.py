"""Two CPU processes over gloo under ``accelerate launch``: DDP, DeepSpeed ZeRO-2 and ZeRO-3, FSDP2 (docs/design.md sections 8, 10).

Each run is the real entry script (through tests/distributed/worker.py, which dumps every rank's LoRA).
"""

import json
import time

import pytest
import torch
import yaml
from diffusers import FluxPipeline
from launching import CPU_2PROC, ROOT, finish, launch, ranks, run_args, trained
from safetensors.torch import load_file

from rl.metrics_log import read_metrics


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, tiny_flux_config):
    """The same config on 2 DDP processes and on 1 process, run side by side (the fixture's sizes, built once)."""
    from rewards.shapes import vocabulary
    from rl.tiny_flux import build_tiny_flux_pipeline

    root = tmp_path_factory.mktemp("dist")
    build_tiny_flux_pipeline(vocabulary(), tiny_flux_config, seed=0).save_pretrained(root / "pipeline")
    ddp_args = [*run_args(root / "pipeline", root / "ddp" / "run"), "--save_lora", "true"]
    two = launch(root / "ddp", ddp_args, "--config_file", CPU_2PROC)
    one = launch(root / "single", run_args(root / "pipeline", root / "single" / "run"))
    finish(two)
    finish(one)
    return root


def test_ddp_ranks_hold_identical_lora_and_metrics_are_global(ddp_runs):
    rank0, rank1 = ranks(ddp_runs / "ddp")
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1))
    assert any(p.abs().max() > 0 for p in rank0[1::2])  # lora_B left its zero init: it trained
    two = [r for r in read_metrics(ddp_runs / "ddp" / "run" / "metrics.jsonl") if "reward/total/mean" in r]
    one = [r for r in read_metrics(ddp_runs / "single" / "run" / "metrics.jsonl") if "reward/total/mean" in r]
    assert [r["train/images_seen"] for r in two] == [8, 16] == [r["train/images_seen"] for r in one]
    # step 1 samples the same 8 rollouts (prompts and noise are functions of the global index) before any
    # update: the rewards reduced over two processes (sums and counts) equal the single process's
    for key in ("reward/total/mean", "reward/total/std", "reward/group_std"):  # (AWM, the default: no ratio)
        assert two[0][key] == pytest.approx(one[0][key], abs=1e-6), key
    # the final evaluation (3 prompts: 2 on rank 0, 1 on rank 1) is the global mean over all 6 images
    final = [r for r in read_metrics(ddp_runs / "ddp" / "run" / "metrics.jsonl") if "final_eval/total/mean" in r]
    assert len(final) == 1


def test_deepspeed_zero2_on_two_cpu_processes(ddp_runs, tmp_path):
    config = str(ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml")
    run = launch(
        tmp_path / "ds",
        run_args(ddp_runs / "pipeline", tmp_path / "ds" / "run"),
        *("--config_file", config, "--num_processes", "2", "--mixed_precision", "no"),
    )
    finish(run)
    rank0, rank1 = ranks(tmp_path / "ds")
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1))
    # ZeRO-2 shards AdamW's state and the gradients, not the math: the same weights as DDP within float noise
    ddp = ranks(ddp_runs / "ddp")[0]
    assert max((a - b).abs().max() for a, b in zip(rank0, ddp)) <= 1e-6
    records = [r for r in read_metrics(tmp_path / "ds" / "run" / "metrics.jsonl") if "reward/total/mean" in r]
    assert [r["train/optimizer_steps"] for r in records] == [1, 2]  # 4 rollouts per process, micro-batch 4
    assert all(r["train/grad_norm"] > 0 for r in records)  # DeepSpeed's own clipping reports the norm


FSDP = ("--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2")
FSDP_CPU = (*FSDP, "--mixed_precision", "no")
# probe pruning from a fresh probe, keep 2 of 4 by the max-variance rule
PROBE_PRUNING = ("--prune_policy", "variance", "--predictor", "probe", "--probe_path", "init", "--capture_step", "2",
                 "--prune_keep_fraction", "0.5", "--prune_explore", "0")  # fmt: skip


def zero3_launch(folder) -> tuple[str, ...]:
    """ZeRO-3 on 2 processes with every parameter partitioned: DeepSpeed keeps parameters under 100k elements whole
    by default, which on the tiny model would be all of them."""
    folder.mkdir(parents=True)
    ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        ds[key] = "auto"
    (folder / "ds.json").write_text(json.dumps(ds))
    config = {
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {"deepspeed_config_file": str(folder / "ds.json"), "zero3_init_flag": False},
        "num_machines": 1,
        "num_processes": 2,
        "machine_rank": 0,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    (folder / "accelerate.yaml").write_text(yaml.safe_dump(config))
    return ("--config_file", str(folder / "accelerate.yaml"))


@pytest.mark.parametrize("sharding", ["fsdp", "zero3"])
def test_sharded_trains_as_ddp_exports_and_resumes_exactly(ddp_runs, tmp_path, sharding):
    """FSDP2 and ZeRO-3 shard the base and the LoRA; the LoRA is gathered for the EMA, the export and the
    checkpoint; the evaluation pads uneven shares (every forward is a collective)."""
    launcher = FSDP_CPU if sharding == "fsdp" else zero3_launch(tmp_path / "config")
    run = tmp_path / "sharded" / "run"
    args = [*run_args(ddp_runs / "pipeline", run), "--save_lora", "true", "--save_every", "1"]
    finish(launch(tmp_path / "sharded", args, *launcher))
    rank0, rank1 = ranks(tmp_path / "sharded")
    ddp = ranks(ddp_runs / "ddp")[0]
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1))
    assert max((a - b).abs().max() for a, b in zip(rank0, ddp)) <= 1e-5
    # the diffusers export (the EMA's weights) equals DDP's and loads into a fresh pipeline
    exported = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    reference = load_file(ddp_runs / "ddp" / "run" / "lora" / "pytorch_lora_weights.safetensors")
    assert exported.keys() == reference.keys()
    assert max((exported[k] - reference[k]).abs().max() for k in exported) <= 1e-5
    pipeline = FluxPipeline.from_pretrained(ddp_runs / "pipeline")
    pipeline.load_lora_weights(run / "lora")
    loaded = {k.replace(".default_0", ""): v for k, v in pipeline.transformer.state_dict().items() if "lora_" in k}
    assert all(torch.equal(loaded[k.removeprefix("transformer.")], v) for k, v in exported.items())
    # the final evaluation (3 prompts over 2 processes: rank 1 runs throwaway forwards for the third) equals DDP's
    final = [r for r in read_metrics(run / "metrics.jsonl") if "final_eval/total/mean" in r]
    ddp_final = [r for r in read_metrics(ddp_runs / "ddp" / "run" / "metrics.jsonl") if "final_eval/total/mean" in r]
    assert final[0]["final_eval/total/mean"] == pytest.approx(ddp_final[0]["final_eval/total/mean"], abs=1e-6)
    # each process stores half of the base and of the LoRA (rl/memory.py, logged per step)
    sharded, whole = (next(r for r in read_metrics(folder / "metrics.jsonl") if "memory/frozen_mib" in r)
                      for folder in (run, ddp_runs / "ddp" / "run"))  # fmt: skip
    for key in ("memory/frozen_mib", "memory/lora_mib"):
        assert 0.45 * whole[key] <= sharded[key] <= 0.55 * whole[key], key
    # a checkpoint holds the LoRA, not the sharded base; resuming from step 1 (a branch into a folder of its own:
    # the run's folder holds step 2) ends where the whole run ended
    step1 = run / "checkpoints" / "step-00000001"
    if sharding == "fsdp":  # the LoRA is 25 KB in fp32, the base 400 KB (DeepSpeed excludes it as under ZeRO-2)
        assert (step1 / "model.safetensors").stat().st_size < 100_000
    base = sum(f.stat().st_size for f in (ddp_runs / "pipeline" / "transformer").glob("*.safetensors"))
    assert sum(f.stat().st_size for f in step1.rglob("*") if f.is_file()) < base  # LoRA, optimizer, state: no base
    resumed = [*run_args(ddp_runs / "pipeline", tmp_path / "branch"), "--resume_from", str(step1)]
    finish(launch(tmp_path / "resumed", resumed, *launcher))
    assert all(torch.equal(a, b) for a, b in zip(ranks(tmp_path / "resumed")[0], rank0))


@pytest.mark.parametrize("sharding", ["fsdp", "zero3"])
def test_sharded_reads_the_lora_whole_for_the_kl_reference_and_the_probe_as_ddp_does(ddp_runs, tmp_path, sharding):
    """The two reads of the sharded model the plain case leaves out: the adapter-off reference forward of the KL
    term and the probe's attention capture on the gathered forward (probe pruning, keep 2 of 4). Both runs side
    by side, the same config; FSDP2 and ZeRO-3 end where DDP ends."""
    extra = ("--kl_beta", "0.01", *PROBE_PRUNING)
    runs = {}
    sharded = FSDP_CPU if sharding == "fsdp" else zero3_launch(tmp_path / "config")
    for name, launcher in (("ddp", ("--config_file", CPU_2PROC)), (sharding, sharded)):
        args = [*run_args(ddp_runs / "pipeline", tmp_path / name / "run"), *extra]
        runs[name] = launch(tmp_path / name, args, *launcher)  # each on a free port
    for process in runs.values():
        finish(process)
    ddp, shards = ranks(tmp_path / "ddp")[0], ranks(tmp_path / sharding)[0]
    assert max((a - b).abs().max() for a, b in zip(shards, ddp)) <= 1e-5
    for name in runs:
        records = [r for r in read_metrics(tmp_path / name / "run" / "metrics.jsonl") if "policy/kl_ref" in r]
        assert len(records) == 2 and all(r["policy/kl_ref"] >= 0 for r in records)
        assert all(r["prune/survivor_frac"] == 0.5 for r in records)


def test_a_write_failing_inside_deepspeeds_collective_save_stops_both_at_once(ddp_runs, tmp_path):
    """ZeRO-2: rank 1's optimizer shard cannot be written inside DeepSpeed's save_checkpoint, which ends in a
    barrier. The failure is held until the save is through, so both processes exit with one line each long before
    distributed_timeout_s (600 s), and no partial checkpoint is left."""
    run = tmp_path / "run"
    args = [*run_args(ddp_runs / "pipeline", run), "--save_every", "1", "--distributed_timeout_s", "600"]
    config = str(ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml")
    launcher = ("--config_file", config, "--num_processes", "2", "--mixed_precision", "no")
    started = time.time()
    process = launch(tmp_path / "dump", args, *launcher, env={"FAIL_DEEPSPEED_SAVE_RANK": "1"})
    output, _ = process.communicate(timeout=600)
    assert process.returncode != 0 and time.time() - started < 300, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: could not write checkpoint")]
    assert len(errors) == 2, output[-3000:]
    assert any("the disk is full" in line for line in errors) and any("process 1 failed" in line for line in errors)
    assert not list((run / "checkpoints").glob("*"))


PREVIEW_PRUNED = ("--prune_policy", "variance", "--predictor", "preview", "--capture_step", "2",
                  "--prune_keep_fraction", "0.5", "--prune_explore", "0", "--probe_path", "")  # fmt: skip


@pytest.mark.parametrize("pruning", [(), PREVIEW_PRUNED], ids=["unpruned", "preview_pruned"])
def test_a_reward_failing_on_one_process_checkpoints_on_both_then_both_stop(ddp_runs, tmp_path, pruning):
    """Rank 1's reward fails in step 2 (pruned: already in the predictor's preview): both processes checkpoint
    step 1 together, rank 1 prints the reward's error and rank 0 which process failed, both within seconds; the
    same command then resumes from step 1."""
    run = tmp_path / "run"
    args = [*run_args(ddp_runs / "pipeline", run), "--distributed_timeout_s", "600", *pruning]
    started = time.time()
    process = launch(tmp_path / "dump", args, "--config_file", CPU_2PROC, env={"FAIL_REWARD_RANK": "1"})
    output, _ = process.communicate(timeout=600)
    assert process.returncode != 0 and time.time() - started < 300, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, output[-3000:]
    assert any("the judge is down" in line for line in errors)
    assert any("step 2 failed on another process" in line and "continue with the same command" in line
               for line in errors)  # fmt: skip
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001"]
    finish(launch(tmp_path / "resumed", args, "--config_file", CPU_2PROC))
    steps = [r["train/step"] for r in read_metrics(run / "metrics.jsonl") if "train/step" in r]
    assert steps == [1, 2]


LOOKAHEAD_PRUNING = ("--prune_policy", "variance", "--predictor", "lookahead", "--lookahead_steps", "2",
                     "--capture_step", "2", "--prune_keep_fraction", "0.5", "--probe_path", "")  # fmt: skip


@pytest.mark.parametrize(
    ("sharding", "pruning"), [("fsdp", ()), ("zero3", LOOKAHEAD_PRUNING)], ids=["fsdp", "zero3-lookahead"]
)
def test_sharded_runs_uneven_groups_with_idle_forwards_and_trains_as_ddp(ddp_runs, tmp_path, sharding, pruning):
    """3 prompts on 2 processes: rank 0 samples (predicts, finishes) two groups, rank 1 one. Under FSDP and ZeRO-3
    every forward is a collective, so before each phase of transformer calls (sampling, the lookahead's Euler
    steps, finishing, the final evaluation's 2 + 1 prompts) they agree on the most, and rank 1 runs throwaway
    forwards after its own. Every group lives on one process and is trained once, and the LoRA equals DDP's."""
    runs = {}
    sharded = FSDP_CPU if sharding == "fsdp" else zero3_launch(tmp_path / "config")
    for name, launcher in (("sharded", sharded), ("ddp", ("--config_file", CPU_2PROC))):
        args = [*run_args(ddp_runs / "pipeline", tmp_path / name / "run"), "--prompts_per_step", "3", *pruning]
        runs[name] = launch(tmp_path / name, [*args, "--sample_batch_size", "4"], *launcher)
    for process in runs.values():
        finish(process)
    sharded_steps, ddp = trained(tmp_path / "sharded"), trained(tmp_path / "ddp")
    for own, plain in zip(sharded_steps, ddp):  # the same groups and rollouts, each trained as often
        for key in ("prompt_groups", "rollout_groups", "trained"):
            assert [step[key] for step in own] == [step[key] for step in plain], key
    assert [[step["prompt_groups"] for step in rank] for rank in ddp] == [[[0, 1]] * 2, [[2]] * 2]
    assert max((a - b).abs().max() for a, b in zip(ranks(tmp_path / "sharded")[0], ranks(tmp_path / "ddp")[0])) <= 1e-6
    logged = [r for r in read_metrics(tmp_path / "sharded" / "run" / "metrics.jsonl") if "reward/total/mean" in r]
    plain = [r for r in read_metrics(tmp_path / "ddp" / "run" / "metrics.jsonl") if "reward/total/mean" in r]
    # 4 rollouts per call: rank 1 makes 1 call per denoising step to rank 0's 2, so it is 4 short unpruned; pruned,
    # 2 short to the capture step (2 of 4) and 2 in the lookahead's 2 Euler steps, level finishing 2 survivors each
    assert [r["sample/padding_forwards"] for r in logged] == [4, 4]
    keys = ["train/images_seen", "compute/transformer_calls", "reward/total/mean", "reward/group_std"]
    keys += ["prune/survivor_frac", "predict/transformer_calls"] if pruning else []
    for key in keys:
        assert [r[key] for r in logged] == pytest.approx([r[key] for r in plain], abs=1e-5), key
    final = [r for run in ("sharded", "ddp") for r in read_metrics(tmp_path / run / "run" / "metrics.jsonl")
             if "final_eval/total/mean" in r]  # fmt: skip
    assert final[0]["final_eval/total/mean"] == pytest.approx(final[1]["final_eval/total/mean"], abs=1e-6)


# 4 prompts, 2 groups per process: keep each rollout the fresh probe predicts above -0.05 (at least 2 per group),
# skip a process's groups predicted flat (std < 0.01) but its widest; 2 rollouts per transformer call
UNEVEN_PRUNING = ("--prompts_per_step", "4", "--prune_policy", "threshold", "--prune_threshold", "-0.05",
                  "--prune_min_spread", "0.01", "--predictor", "probe", "--probe_path", "init", "--capture_step", "2",
                  "--prune_explore", "0", "--sample_batch_size", "2")  # fmt: skip


@pytest.mark.parametrize("sharding", ["fsdp", "zero3"])
def test_sharded_evens_out_prediction_dependent_work_and_trains_as_ddp(ddp_runs, tmp_path, sharding):
    """The threshold policy and group skipping leave the processes different numbers of survivors to finish: under
    FSDP and ZeRO-3 every forward is a collective, so the processes agree on the most any makes before each
    sampling phase and one with fewer runs throwaway forwards after its own. It trains as DDP does."""
    runs = {}
    sharded = FSDP_CPU if sharding == "fsdp" else zero3_launch(tmp_path / "config")
    for name, launcher in (("sharded", sharded), ("ddp", ("--config_file", CPU_2PROC))):
        args = [*run_args(ddp_runs / "pipeline", tmp_path / name / "run"), *UNEVEN_PRUNING]
        runs[name] = launch(tmp_path / name, args, *launcher)
    for process in runs.values():
        finish(process)
    sharded_steps, ddp = trained(tmp_path / "sharded"), trained(tmp_path / "ddp")
    for own, plain in zip(sharded_steps, ddp):  # the same survivors, each trained as often
        assert [step["rollout_groups"] for step in own] == [step["rollout_groups"] for step in plain]
        assert [step["trained"] for step in own] == [step["trained"] for step in plain]
    # step 1: rank 0 skipped a group, rank 1 kept 2 and 3 of its groups' 4: 1 and 3 calls per denoising step
    sizes = [torch.unique(torch.tensor(rank[0]["rollout_groups"]), return_counts=True)[1].tolist() for rank in ddp]
    assert sorted(map(sorted, sizes)) == [[2], [2, 3]], sizes
    assert max((a - b).abs().max() for a, b in zip(ranks(tmp_path / "sharded")[0], ranks(tmp_path / "ddp")[0])) <= 1e-6
    logged = [r for r in read_metrics(tmp_path / "sharded" / "run" / "metrics.jsonl") if "reward/total/mean" in r]
    plain = [r for r in read_metrics(tmp_path / "ddp" / "run" / "metrics.jsonl") if "reward/total/mean" in r]
    assert logged[0]["sample/padding_forwards"] >= 2 * 2  # 2 calls short on each of the 2 steps after step 2
    assert not any("sample/padding_forwards" in r for r in plain)
    for key in ("compute/transformer_calls", "reward/total/mean", "prune/survivor_frac", "prune/skipped_groups"):
        assert [r[key] for r in logged] == pytest.approx([r[key] for r in plain], abs=1e-5), key


@pytest.mark.parametrize("where", ["ddp-export-rank1", "fsdp-state-rank0"])
def test_a_checkpoint_write_failing_on_one_process_stops_both_at_once(ddp_runs, tmp_path, where):
    """A disk fills during a checkpoint, on one process: both exit with one line each within a minute, not after
    distributed_timeout_s (600 s here) waiting for the other, and no partial checkpoint is left. DDP: rank 1's
    LoRA export; FSDP2: rank 0's trainer_state.pt, written before the export gathers the sharded LoRA (a
    collective the failed process must not skip while the other waits in it)."""
    run = tmp_path / "run"
    args = [*run_args(ddp_runs / "pipeline", run), "--save_every", "1", "--distributed_timeout_s", "600"]
    failing = 0 if where.startswith("fsdp") else 1
    launcher = FSDP_CPU if where.startswith("fsdp") else ("--config_file", CPU_2PROC)
    env = {"FAIL_TRAINER_STATE": "1"} if where.startswith("fsdp") else {"FAIL_CHECKPOINT_RANK": "1"}
    started = time.time()
    process = launch(tmp_path / "dump", args, *launcher, env=env)
    output, _ = process.communicate(timeout=600)
    assert process.returncode != 0 and time.time() - started < 300, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: could not write checkpoint")]
    # one line each, no traceback of ours (accelerate's launcher prints its own for a failed child)
    assert len(errors) == 2 and "rl/checkpoint.py" not in output, output[-3000:]
    assert any("the disk is full" in line for line in errors)  # the failed process: its own failure
    assert any(f"process {failing} failed" in line for line in errors)  # the other: which, and that it was not written
    assert not list((run / "checkpoints").glob("*"))
