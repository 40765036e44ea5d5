"""The Accelerator of a run: DDP, DeepSpeed ZeRO-2/3, FSDP2 and multi-node through one code path (docs/design.md section 8).

What the launch (``accelerate launch --config_file configs/accelerate/<x>.yaml``) leaves open is filled from
the run config here, so a shipped accelerate config never repeats run settings: DeepSpeed's micro-batch size is
``train_batch_size``, its accumulation window the trainer's (one optimizer step per ``gradient_accumulation_steps``
micro-batches, each over all trained steps) and its gradient clipping ``max_grad_norm``. Without a GPU every
process runs on the CPU over gloo: DeepSpeed would otherwise pick a backend the CPU build lacks, and accelerate
selects its FSDP plugin only for GPU processes (an FSDP launch on CPU processes is given the plugin here; torch's
FSDP2 shards over gloo as over NCCL).

A collective waits at most ``distributed_timeout_s`` for the other processes; a process (node) that died or
hangs then stops the others with one message (:func:`peers_lost_as_error`) instead of a wait without end.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, parse_flag_from_env
from torch.distributed.constants import default_pg_timeout


def build_accelerator(
    mixed_precision: str, gradient_accumulation_steps: int, timeout_s: float = default_pg_timeout.total_seconds()
) -> Accelerator:
    """An Accelerator for the launch's distributed setup, on the CPU (gloo) when no GPU is visible.

    Args:
        mixed_precision: ``"no"`` or ``"bf16"``.
        gradient_accumulation_steps: backward passes per optimizer step (DeepSpeed's window is set to it).
        timeout_s: longest wait of a collective for the other processes (``distributed_timeout_s``).
    """
    no_gpu = not torch.cuda.is_available()
    # accelerate ignores a DeepSpeed launch under cpu=True (it runs plain MULTI_CPU); DeepSpeed's own CPU
    # accelerator then places the processes, and a gloo process group connects them
    cpu = no_gpu and not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # processes started by accelerate launch / torchrun
    timeout = datetime.timedelta(seconds=timeout_s)
    # backend None on a GPU: accelerate's (or DeepSpeed's) own choice, NCCL
    group = InitProcessGroupKwargs(backend="gloo" if no_gpu else None, timeout=timeout)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        kwargs_handlers=[group] if launched > 1 else None,
    )
    if accelerator.gradient_accumulation_steps != gradient_accumulation_steps:
        # accelerate lets the launch's config win (a DeepSpeed config written by `accelerate config` holds 1), and the
        # loss would then be scaled for one window while the optimizer steps every backward pass
        raise ValueError(
            f"the accelerate config sets gradient_accumulation_steps={accelerator.gradient_accumulation_steps}, but "
            f"the run needs {gradient_accumulation_steps} (gradient_accumulation_steps x trained steps per rollout): "
            "remove gradient_accumulation_steps from the accelerate / DeepSpeed config"
        )
    if cpu and launched > 1 and parse_flag_from_env("ACCELERATE_USE_FSDP"):
        # the launch's fsdp_config reaches the plugin through the environment, as on a GPU
        plugin = FullyShardedDataParallelPlugin()
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate's own selection does
    return accelerator


class PeerFailedError(RuntimeError):
    """Another process of the run failed a step (its own message says why); this one stopped with it."""


class PeerLostExit(SystemExit):
    """Another process of the run died or hung; this one exits saying so (no collective may follow: it would fail
    or wait out the timeout again)."""


# what gloo and NCCL say when the process at the other end of a collective is gone or silent
PEER_FAILURES = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Broken pipe",
                 "pair closure")  # fmt: skip
# where a collective raises: torch.distributed's own calls, and DDP's gradient all-reduce inside the backward
COLLECTIVE_CODE = ("torch/distributed/", "torch/autograd/", "torch/nn/parallel/", "deepspeed/")


def is_lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another process died or did not answer.

    The words alone do not tell: a reward server's "Read timed out" says them too, and is a reward failure to
    agree on. So a reward's error never is one, and another error must have passed through code that runs
    collectives (torch.distributed, the backward's all-reduce hooks, DeepSpeed).
    """
    from rewards.base import RewardError  # the reward package is the trainer's, not this module's, dependency

    if isinstance(error, torch.distributed.DistError):
        return True
    if isinstance(error, RewardError) or not isinstance(error, RuntimeError):
        return False
    if not any(s in str(error) for s in PEER_FAILURES):
        return False
    files = [frame.filename.replace(os.sep, "/") for frame in traceback.extract_tb(error.__traceback__)]
    return any(code in name for name in files for code in COLLECTIVE_CODE)


@contextlib.contextmanager
def peers_lost_as_error(accelerator: Accelerator, timeout_s: float, output_dir: str | Path) -> Iterator[None]:
    """Inside the block a collective that fails because another process died or hung ends this one with a
    message saying so and how to continue, instead of the backend's traceback.

    Raises:
        PeerLostExit: a collective's peer closed its connection or did not answer within ``timeout_s``.
    """
    try:
        yield
    except RuntimeError as error:  # torch's DistError subclasses it; gloo raises it plainly
        if accelerator.num_processes == 1 or not is_lost_peer(error):
            raise
        raise PeerLostExit(
            f"process {accelerator.process_index} of {accelerator.num_processes}: another process of the run died "
            f"or did not answer a collective within distributed_timeout_s={timeout_s:g} s "
            f"({str(error).splitlines()[0][:200]}). Look at the other nodes' logs; to continue, relaunch every node "
            f"with --resume_from latest (checkpoints in {Path(output_dir) / 'checkpoints'})."
        ) from error


def configure_deepspeed(accelerator: Accelerator, micro_batch_size: int, max_grad_norm: float) -> None:
    """Fill DeepSpeed's batch, accumulation and clipping values from the run config (no-op without DeepSpeed).

    Call before ``accelerator.prepare``: without a dataloader accelerate cannot infer the micro-batch size.

    Raises:
        ValueError: when the DeepSpeed config pins a value that contradicts the run config (names both).
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in wanted.items():
        current = ds.get(key, "auto")
        if current != "auto" and current != value:
            raise ValueError(
                f"the DeepSpeed config sets {key}={current!r} but the run config implies {value!r} "
                "(train_batch_size, gradient_accumulation_steps x trained steps, max_grad_norm): remove the key "
                "from the DeepSpeed / accelerate config"
            )
        ds[key] = value
    ds["train_batch_size"] = micro_batch_size * accelerator.gradient_accumulation_steps * accelerator.num_processes
    if accelerator.device.type == "cpu":
        # Overlapped reduction orders itself with CUDA streams; on CPU processes it raced: ~1 run in 4 of the
        # 2-process ZeRO-2 test ended ~one learning rate away from DDP while both ranks agreed.
        zero = ds.setdefault("zero_optimization", {})
        zero["overlap_comm"] = False
        zero["contiguous_gradients"] = False


@contextlib.contextmanager
def whole_model_loading(accelerator: Accelerator) -> Iterator[None]:
    """Inside the block ``from_pretrained`` loads models whole on every process, also under ZeRO-3.

    accelerate's DeepSpeed plugin tells transformers that ZeRO-3 is on, so the frozen text encoders would be
    partitioned through ``zero.Init`` while loading (collectives the diffusers components do not make: the
    processes deadlock or abort). Only the prepared transformer is DeepSpeed's to partition.
    """
    if not is_deepspeed(accelerator):
        yield
        return
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def shards_parameters(accelerator: Accelerator) -> bool:
    """Whether the transformer's parameters are split over the processes (FSDP, DeepSpeed ZeRO-3).

    Then every forward is a collective (each process gathers the others' slices), so every process must run as
    many transformer forwards as every other: :func:`forwards_behind` holds the run to that.
    """
    if is_fsdp(accelerator):
        return True
    if not is_deepspeed(accelerator):
        return False
    return accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3


def reward_wait_limit(reward_timeout_s: float, distributed_timeout_s: float, num_processes: int) -> float:
    """The longest wait for a reward batch: ``reward_timeout_s`` (0: none), and with several processes at most half
    of ``distributed_timeout_s``. The others wait for a hung reward's process in a collective and would give up at
    ``distributed_timeout_s`` anyway; stopping it sooner lets every process checkpoint and stop together."""
    if num_processes == 1:
        return reward_timeout_s
    cap = distributed_timeout_s / 2
    return min(reward_timeout_s, cap) if reward_timeout_s else cap


EvenForwards = Callable[[int], contextlib.AbstractContextManager]  # a phase of that many transformer calls


def unsharded_forwards(forwards: int) -> contextlib.AbstractContextManager:
    """The :data:`EvenForwards` of a run whose forwards are no collectives (one process, DDP, inference): none."""
    return contextlib.nullcontext()


def forwards_behind(accelerator: Accelerator, forwards: int) -> tuple[int, int]:
    """How many transformer forwards this process is short of the busiest before a phase of ``forwards`` of
    its own, and all processes together (a collective; ``(0, 0)`` unless parameters are sharded).

    Under FSDP and ZeRO-3 every forward is a collective, so a process planning fewer runs throwaway forwards
    after its own (``GRPOTrainer.even_forwards``). Processes plan different numbers wherever their work differs:
    a group fewer where ``prompts_per_step`` does not divide, a prompt fewer in an evaluation, pruning's
    prediction-dependent survivors (the ``threshold`` policy, groups ``prune_min_spread`` skips). The count must
    be agreed before the phase: a process out of work cannot ask the others in the middle, since they are inside
    forwards that wait for it.
    """
    if accelerator.num_processes == 1 or not shards_parameters(accelerator):
        return 0, 0
    planned = accelerator.gather(torch.tensor([forwards], device=accelerator.device))
    most = int(planned.max())
    return most - forwards, int((most - planned).sum())
