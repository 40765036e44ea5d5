"""Run the real entry script in an ``accelerate launch`` process, then dump what this rank trained.

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml tests/distributed/worker.py DUMP_DIR -- ARGS

With ``FAIL_CHECKPOINT_RANK=i`` rank i's checkpoint writes fail as on a full disk (``FAIL_DEEPSPEED_SAVE_RANK=i``:
its writes inside DeepSpeed's own collective save; ``FAIL_REWARD_RANK=i``: its reward fails in the second GRPO step),
and the script runs as on the command line (``grpo_flux.cli``:
user errors as one line, the exit status).

``DUMP_DIR/rank<i>.pt`` gets the live LoRA parameters (a list of whole tensors, the trainer's order) of rank i;
``DUMP_DIR/rank<i>.json`` per GRPO step the group ids of rank i's prompts and of its rollouts, and how many
(trained step, inner epoch) samples of each rollout entered a loss with a non-zero weight.
"""

import errno
import json
import os
import sys
from concurrent.futures import Future
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

torch.set_num_threads(1)  # ranks on two shared cores: more threads per rank only oversubscribe

import grpo_flux  # noqa: E402

from rewards.base import RewardError  # noqa: E402
from rl.trainer import GRPOTrainer  # noqa: E402

steps: list[dict] = []


def recording_optimise(optimise):
    def wrapped(self, batch, scored, advantages):
        steps.append(
            {
                "step": self.state.step,
                "prompt_groups": batch.group_ids.tolist(),
                "step_texts": batch.step_texts,
                "rollout_groups": scored.group_ids.tolist(),
                "trained": [0] * len(scored.group_ids),
            }
        )
        return optimise(self, batch, scored, advantages)

    return wrapped


def recording_policy_loss(policy_loss):
    def wrapped(self, embeds, rollouts, rows, step, advantages, weights):
        for row, weight in zip(rows.tolist(), weights.tolist()):
            steps[-1]["trained"][row] += weight > 0
        return policy_loss(self, embeds, rollouts, rows, step, advantages, weights)

    return wrapped


def dumping_cleanup(cleanup, dump: Path):
    """Dump this rank's LoRA before the run ends its process group: read whole on every rank, also when FSDP or
    ZeRO-3 holds slices (a collective: every rank reads, so not after another rank was lost)."""

    def wrapped(self, peers_alive: bool = True):
        if peers_alive:
            lora = [value.cpu().clone() for value in self.lora.read()]
            torch.save(lora, dump / f"rank{self.accelerator.process_index}.pt")
        return cleanup(self, peers_alive)

    return wrapped


def failing_export(export_lora, rank: int):
    def wrapped(self, directory):
        if self.accelerator.process_index == rank:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return export_lora(self, directory)

    return wrapped


def failing_second_step(submit_images):
    """The reward pool's answer in the second GRPO step: the error a reward that stops the run raises."""

    def wrapped(self, batch, prompt_index, images):
        if self.state.step != 1:
            return submit_images(self, batch, prompt_index, images)
        failed = Future()
        failed.set_exception(RewardError("reward 'flaky' raised ValueError: the judge is down (prompt 'p')"))
        return failed

    return wrapped


def failing_trainer_state(save):
    """torch.save, except that the main process's trainer_state.pt finds the disk full."""

    def wrapped(obj, path, *args, **kwargs):
        if str(path).endswith("trainer_state.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(obj, path, *args, **kwargs)

    return wrapped


def failing_deepspeed_save(self, state_dict, path):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


if __name__ == "__main__":
    dump, separator, *args = sys.argv[1:]
    assert separator == "--", "usage: worker.py DUMP_DIR -- ARGS"
    if "FAIL_TRAINER_STATE" in os.environ:
        torch.save = failing_trainer_state(torch.save)
        raise SystemExit(grpo_flux.cli(args))
    if "FAIL_CHECKPOINT_RANK" in os.environ:
        GRPOTrainer.export_lora = failing_export(GRPOTrainer.export_lora, int(os.environ["FAIL_CHECKPOINT_RANK"]))
        raise SystemExit(grpo_flux.cli(args))
    rank = os.environ.get("RANK", "0")
    if os.environ.get("FAIL_DEEPSPEED_SAVE_RANK") == rank:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        TorchCheckpointEngine.save = failing_deepspeed_save
    if os.environ.get("FAIL_REWARD_RANK") == rank:
        GRPOTrainer.submit_images = failing_second_step(GRPOTrainer.submit_images)
    if "FAIL_DEEPSPEED_SAVE_RANK" in os.environ or "FAIL_REWARD_RANK" in os.environ:
        raise SystemExit(grpo_flux.cli(args))
    GRPOTrainer.optimise = recording_optimise(GRPOTrainer.optimise)
    GRPOTrainer.policy_loss = recording_policy_loss(GRPOTrainer.policy_loss)
    GRPOTrainer.cleanup = dumping_cleanup(GRPOTrainer.cleanup, Path(dump))
    trainer = grpo_flux.main(args)
    (Path(dump) / f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(steps))
