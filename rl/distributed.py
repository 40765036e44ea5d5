"""The Accelerator of a run: DDP, DeepSpeed ZeRO-2/3 and multi-node through one code path (docs/design.md section 8).

What the launch (``accelerate launch --config_file configs/accelerate/<x>.yaml``) leaves open is filled from
the run config here, so a shipped accelerate config never repeats run settings: DeepSpeed's micro-batch size is
``train_batch_size``, its accumulation window the trainer's (one optimizer step per ``gradient_accumulation_steps``
micro-batches, each over all trained steps) and its gradient clipping ``max_grad_norm``. Without a GPU every
process runs on the CPU over gloo: DeepSpeed would otherwise pick a backend the CPU build lacks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, parse_flag_from_env


def build_accelerator(mixed_precision: str, gradient_accumulation_steps: int) -> Accelerator:
    """An Accelerator for the launch's distributed setup, on the CPU (gloo) when no GPU is visible.

    Args:
        mixed_precision: ``"no"`` or ``"bf16"``.
        gradient_accumulation_steps: backward passes per optimizer step (DeepSpeed's window is set to it).
    """
    no_gpu = not torch.cuda.is_available()
    # accelerate ignores a DeepSpeed launch under cpu=True (it runs plain MULTI_CPU); DeepSpeed's own CPU
    # accelerator then places the processes, and a gloo process group connects them
    cpu = no_gpu and not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # processes started by accelerate launch / torchrun
    return Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if no_gpu and launched > 1 else None,
    )


def configure_deepspeed(accelerator: Accelerator, micro_batch_size: int, max_grad_norm: float) -> None:
    """Fill DeepSpeed's batch, accumulation and clipping values from the run config (no-op without DeepSpeed).

    Call before ``accelerator.prepare``: without a dataloader accelerate cannot infer the micro-batch size.

    Raises:
        ValueError: when the DeepSpeed config pins a value that contradicts the run config (names both).
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds.get("zero_optimization", {}).get("stage") == 3:
        # measured on 2 CPU processes: loading, sampling, backward and the optimizer step run, but ZeRO-3
        # partitions the LoRA weights themselves, which the EMA and the diffusers export read whole
        raise ValueError(
            "DeepSpeed ZeRO-3 is not supported yet: it partitions the LoRA weights, which the EMA and the "
            "diffusers LoRA export read whole. Use configs/accelerate/deepspeed_zero2.yaml (LoRA training "
            "shards the optimizer state and gradients, the only trained state) or deepspeed_zero2_offload.yaml."
        )
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
