"""Flow-GRPO LoRA training of a FLUX model: parse the config, build the trainer, set up, train, clean up.

    python launch/grpo_flux.py                                                   # = make train: the tiny model (CPU)
    accelerate launch launch/grpo_flux.py --config configs/flux_dev_pickscore.yaml
    python launch/grpo_flux.py --learning_rate 3e-4 --max_steps 20               # overrides of the default config

Without --config it runs the shipped default, configs/tiny_shapes.yaml (the tiny model and the shapes world);
FLUX.1-dev runs from its configs (configs/flux_dev_*.yaml). --KEY VALUE overrides the YAML.

A user error (a config key or value, a missing or damaged file, a probe for another model or sampler, a used
output_dir, a full disk at a checkpoint) prints one line naming it and the fix and exits 2; set GRPO_DEBUG=1 for
the traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rewards.base import RewardError, RewardImportError, RewardTimeoutError
from rewards.remote import RemoteRewardError
from rl.checkpoint import CheckpointWriteError
from rl.config import RunConfig
from rl.config_parse import DEFAULT_RUN_CONFIG, parse_config, with_default_config
from rl.distributed import PeerFailedError, PeerLostExit, peers_lost_as_error
from rl.stop_signals import TerminateAsInterrupt
from rl.trainer import GRPOTrainer
from rl.trainer_update import NonFiniteGradientError

logger = logging.getLogger("grpo_flux")


def run_config(argv: list[str] | None = None) -> RunConfig:
    """The run's config: ``--config`` and overrides, or without ``--config`` the shipped default plus overrides.

    The dataclass defaults fit the shipped tiny model's sizes but not its tuned recipe (objective, learning rate,
    steps); the bare launch line runs what ``make train`` runs instead, and says so in its first log line.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in args and "--help" not in args and "-h" not in args:
        logger.info(
            "no --config given: running the shipped default %s (the tiny model and shapes world); pass "
            "--config configs/<...>.yaml for FLUX.1-dev",
            DEFAULT_RUN_CONFIG,
        )
    return parse_config(with_default_config(args), description=__doc__)


def main(argv: list[str] | None = None) -> GRPOTrainer:
    """Run one training; returns the (cleaned-up) trainer: ``trainer.summary`` holds base vs final scores."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = run_config(argv)
    trainer = GRPOTrainer(config)
    trainer.setup()
    peers_alive = True
    try:
        # a node that died or hangs: one message on the others, within distributed_timeout_s
        with peers_lost_as_error(trainer.accelerator, config.training.distributed_timeout_s, trainer.output_dir):
            trainer.train()
    except PeerLostExit:
        peers_alive = False
        raise
    finally:
        trainer.cleanup(peers_alive)
    if trainer.accelerator.is_main_process:  # the run's headline: held-out score before and after
        total = {k: trainer.summary.get(k, {}).get("total/mean") for k in ("base", "final", "delta")}
        print(json.dumps({"held_out_total": total, "output_dir": config.logging.output_dir}))
    return trainer


# what a user can fix from the message alone; anything else is a bug and keeps its traceback
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    PermissionError,
    CheckpointWriteError,
    # a reward that raised or returned NaN / a wrong shape (which reward, and the failure policy to set), or a
    # reward server that is down (its URL and how to start it: RemoteRewardError)
    RewardError,
    RewardImportError,  # a reward plugin off PYTHONPATH or a missing optional package: the module and the fix
    PeerFailedError,  # another process failed the step and says why; this one checkpointed with it
    NonFiniteGradientError,  # diverged: checkpointed (no bad update applied); the message names the fixes
)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def cli(argv: list[str] | None = None) -> int:
    """``main`` for the command line: user errors as one line and exit status 2 (``GRPO_DEBUG=1``: traceback)."""
    # SIGTERM raises as Ctrl-C does until the message is written (inside the loop StopSignals takes both over)
    with TerminateAsInterrupt() as outside:
        return run_and_report(argv, outside)


def run_and_report(argv: list[str] | None, outside: TerminateAsInterrupt) -> int:
    """:func:`main`, each way it can end as the exit status and, for the user's errors, one line."""
    try:
        main(argv)
    except USER_ERRORS as error:
        hung = isinstance(error, RewardTimeoutError)
        if os.environ.get("GRPO_DEBUG"):
            if not hung:
                raise
            traceback.print_exc()
        else:
            # a reward's own bug needs its traceback: say how to get it
            own_bug = isinstance(error, RewardError) and not isinstance(error, (RemoteRewardError, RewardTimeoutError))
            hint = " (GRPO_DEBUG=1 shows the reward's traceback)" if own_bug else ""
            # one write with its newline: print writes the text and the newline apart, so two processes failing
            # together (a checkpoint write failing on every rank) could run their lines into one on a shared stderr
            sys.stderr.write(f"error: {error}{hint}\n")
        if hung:
            # the hung reward's thread never returns, and the interpreter joins its pool's threads at exit
            sys.stdout.flush()
            sys.stderr.flush()
            logging.shutdown()
            os._exit(2)
        return 2
    except OSError as error:  # a full disk outside a checkpoint write (the log, the final LoRA): the user's to fix
        if error.errno not in DISK_FULL or os.environ.get("GRPO_DEBUG"):
            raise
        sys.stderr.write(
            f"error: the disk is full ({error}): free space on the output_dir's disk (or lower save_total_limit), "
            "then relaunch with --resume_from latest; checkpoints are written whole or not at all, so the newest is "
            "intact\n"
        )
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM outside the training loop (setup, an evaluation): no step open
        name = signal.Signals(outside.received).name if outside.received else "interrupted"
        sys.stderr.write(
            f"{name} outside the training loop (setup or an evaluation): the run folder keeps its newest "
            "checkpoint, if any; continue with --resume_from latest\n"
        )
        return 128 + (outside.received or signal.SIGINT)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
