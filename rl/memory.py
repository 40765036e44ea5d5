"""What one process holds: model state by kind (this process's slices when sharded) and its peak memory.

Logged every step as ``memory/*`` (the maximum over processes; docs/metrics.md) and read by
bench/memory_per_rank.py, which compares DDP, ZeRO-2, ZeRO-3 and FSDP and projects FLUX.1-dev from parameter counts.
"""

from __future__ import annotations

import resource
import sys

import torch
from torch.distributed.tensor import DTensor

MIB = 2**20


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this process stores for ``tensor``: its FSDP slice, its ZeRO-3 partition, or the whole tensor."""
    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    partition = getattr(tensor, "ds_tensor", None)  # ZeRO-3: the parameter itself is empty outside a gather
    if partition is not None:
        tensor = partition
    return tensor.numel() * tensor.element_size()


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors (AdamW's moments), under any wrapper (accelerate's, DeepSpeed's)."""
    seen, total = set(), 0  # wrappers may hand out their inner optimizer's state dict as their own
    while optimizer is not None:
        state = getattr(optimizer, "state", None)
        if isinstance(state, dict) and id(state) not in seen:
            seen.add(id(state))
            for entry in state.values():
                if isinstance(entry, dict):
                    total += sum(local_bytes(v) for v in entry.values() if isinstance(v, torch.Tensor) and v.dim())
        optimizer = getattr(optimizer, "optimizer", None)
    return total


def model_state_mib(model: torch.nn.Module, optimizer) -> dict[str, float]:
    """This process's frozen weights, trainable (LoRA) weights and optimizer state, in MiB."""
    frozen = sum(local_bytes(p) for p in model.parameters() if not p.requires_grad)
    trainable = sum(local_bytes(p) for p in model.parameters() if p.requires_grad)
    return {
        "memory/frozen_mib": frozen / MIB,
        "memory/lora_mib": trainable / MIB,
        "memory/optimizer_mib": optimizer_state_bytes(optimizer) / MIB,
    }


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far: allocated GPU memory on a GPU, the resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / MIB if sys.platform == "darwin" else peak / 1024
