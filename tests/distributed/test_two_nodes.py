"""Two nodes, actually launched: ``accelerate launch`` twice on this machine as machine_rank 0 and 1 (one CPU
process each, 127.0.0.1, gloo, configs/accelerate/cpu_2node.yaml) sharing one output_dir (docs/design.md section 8).

They train together, checkpoint and resume together with the same command; a node that is killed or hangs makes
the other exit with a message naming distributed_timeout_s within that time, instead of waiting forever.
"""

import contextlib
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from launching import ROOT, finish, free_port, launch, ranks, run_args

from rl.metrics_log import read_metrics

NODES = str(ROOT / "configs" / "accelerate" / "cpu_2node.yaml")
TIMEOUT_S = 20  # distributed_timeout_s of these runs: what a hung node costs the other


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_flux_config) -> Path:
    from rewards.shapes import vocabulary
    from rl.tiny_flux import build_tiny_flux_pipeline

    path = tmp_path_factory.mktemp("nodes") / "pipeline"
    build_tiny_flux_pipeline(vocabulary(), tiny_flux_config, seed=0).save_pretrained(path)
    return path


def start_nodes(dump: Path, pipeline: Path, output_dir: Path, *extra: str) -> list[subprocess.Popen]:
    """Node 0 and node 1 of one run (the same command but --machine_rank), each dumping into ``dump/node<i>``."""
    # a constant learning rate: a resume that raises max_steps keeps the schedule of the steps already run
    extra = ("--save_every", "1", "--lr_schedule", "constant", "--distributed_timeout_s", str(TIMEOUT_S), *extra)
    args = run_args(pipeline, output_dir) + list(extra)
    port = free_port()
    return [
        launch(dump / f"node{rank}", args, "--config_file", NODES, "--machine_rank", str(rank), port=port)
        for rank in (0, 1)
    ]


def lora(dump: Path) -> list[torch.Tensor]:
    """The LoRA both nodes hold (asserted equal: one model, trained together)."""
    node0, node1 = ranks(dump / "node0")[0], ranks(dump / "node1")[0]
    assert all(torch.equal(a, b) for a, b in zip(node0, node1))
    return node0


def test_two_nodes_train_checkpoint_and_resume_together(pipeline, tmp_path):
    run = tmp_path / "run"
    # beside the first two steps, an uninterrupted three-step run of the same config to compare the resumed one with
    straight = start_nodes(tmp_path / "straight", pipeline, tmp_path / "straight" / "run", "--max_steps", "3")
    for attempt, steps in (("first", 2), ("resumed", 3)):  # one command for both: resume_from latest
        nodes = start_nodes(tmp_path / attempt, pipeline, run, "--max_steps", str(steps), "--resume_from", "latest")
        outputs = [finish(node) for node in nodes]
        assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == f"step-{steps:08d}"
    assert "resumed from" in outputs[0] and "at step 2" in outputs[0]
    for node in straight:
        finish(node)
    assert all(torch.equal(a, b) for a, b in zip(lora(tmp_path / "resumed"), lora(tmp_path / "straight")))
    records = [r for r in read_metrics(run / "metrics.jsonl") if "reward/total/mean" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["train/images_seen"] for r in records] == [8, 16, 24]  # 2 prompts x 4 rollouts over both nodes


def node_tree(process: subprocess.Popen) -> list[psutil.Process]:
    """A node: its launcher and the workers torchrun starts in sessions of their own."""
    launcher = psutil.Process(process.pid)
    return [launcher, *launcher.children(recursive=True)]


def kill_node(process: subprocess.Popen) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        for part in node_tree(process):
            with contextlib.suppress(psutil.NoSuchProcess):
                part.kill()


def test_a_killed_or_hung_node_stops_the_other_within_the_timeout(pipeline, tmp_path):
    # killed: its connections close at once; hung (SIGSTOP): only the collective timeout ends the other's wait
    hows = ("killed", "hung")
    runs = {how: start_nodes(tmp_path / how, pipeline, tmp_path / how / "run", "--max_steps", "1000") for how in hows}
    try:
        for how, (node0, node1) in runs.items():
            log = tmp_path / how / "run" / "metrics.jsonl"
            deadline = time.monotonic() + 300
            while not (log.is_file() and "reward/total/mean" in log.read_text()):  # training together
                assert time.monotonic() < deadline and node0.poll() is None, how
                time.sleep(0.5)
            if how == "killed":
                kill_node(node1)
            else:
                for part in node_tree(node1):
                    part.suspend()
            started = time.monotonic()
            output, _ = node0.communicate(timeout=TIMEOUT_S + 60)
            elapsed = time.monotonic() - started
            assert node0.returncode != 0, output[-3000:]
            assert f"distributed_timeout_s={TIMEOUT_S} s" in output and "--resume_from latest" in output, output[-3000:]
            # one timeout, not two (no barrier at teardown after a lost peer), and the message is the last word
            assert elapsed < TIMEOUT_S + 15, (how, elapsed)
            # (the launcher's own ChildFailedError traceback follows it)
            assert "Traceback" not in output.split("another process of the run died")[0], output[-3000:]
    finally:
        for nodes in runs.values():
            for node in nodes:
                kill_node(node)
