"""The LoRA read and written whole when the transformer is sharded (FSDP2, DeepSpeed ZeRO-3; docs/design.md section 8).

Under FSDP2 each parameter is a ``DTensor`` holding this process's slice of dimension 0; under ZeRO-3 a parameter
is empty outside a gather and its slice lives in ``ds_tensor``. The EMA, the diffusers export and the evaluation
with EMA weights need the whole LoRA, so they go through :class:`LoraWeights`, which gathers with the library's
own helpers (``DTensor.full_tensor``, ``deepspeed.zero.GatheredParameters``) and writes whole values back into
the slices. Without sharding it reads the parameters themselves: no copy, no collective.

Reading or writing a sharded LoRA is a collective call: every process makes it, in the same order.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def sharding_of(parameters: list[torch.nn.Parameter]) -> str:
    """``"fsdp"`` (DTensor slices), ``"zero3"`` (DeepSpeed partitions) or ``"none"`` (whole on every process)."""
    if any(isinstance(p, DTensor) for p in parameters):
        return "fsdp"
    if any(hasattr(p, "ds_id") and hasattr(p, "ds_tensor") for p in parameters):
        return "zero3"
    return "none"


class LoraWeights:
    """Whole-tensor access to the (possibly sharded) LoRA parameters, in their order.

    Args:
        parameters: the trainable parameters as the prepared model holds them (after ``accelerator.prepare``).
        names: their names in the unwrapped model (the diffusers export keys them by name).
        deepspeed_masters: DeepSpeed trains in bf16 or fp16: the module holds a rounded copy of each parameter and
            the optimizer the fp32 value, which :meth:`read` returns (the EMA and the export are fp32 as under
            DDP).
    """

    def __init__(self, parameters: list[torch.nn.Parameter], names: list[str], deepspeed_masters: bool = False) -> None:
        if len(parameters) != len(names):
            raise ValueError(f"{len(parameters)} parameters but {len(names)} names")
        self.parameters = list(parameters)
        self.names = list(names)
        self.sharding = sharding_of(self.parameters)
        self.deepspeed_masters = deepspeed_masters

    @torch.no_grad()
    def read(self) -> list[torch.Tensor]:
        """Every parameter whole (a collective when sharded). Unsharded: the live tensors, not copies."""
        if self.deepspeed_masters:
            from deepspeed.utils import safe_get_full_fp32_param

            masters = [safe_get_full_fp32_param(p) for p in self.parameters]  # gathered under ZeRO-3: collective
            if all(master is not None for master in masters):
                return [master.detach().clone() for master in masters]
        if self.sharding == "fsdp":
            return [p.detach().full_tensor() for p in self.parameters]
        if self.sharding == "zero3":
            import deepspeed

            with deepspeed.zero.GatheredParameters(self.parameters):
                return [p.detach().clone() for p in self.parameters]
        return [p.detach() for p in self.parameters]

    @torch.no_grad()
    def write(self, values: list[torch.Tensor]) -> None:
        """Set every parameter to the whole ``values`` (the same on every process; a collective when sharded)."""
        if self.sharding == "fsdp":
            for param, value in zip(self.parameters, values):
                value = value.to(param.device, param.dtype)
                # src_data_rank=None: every process holds the whole value and keeps its own slice, no scatter
                part = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
                param.to_local().copy_(part.to_local())
        elif self.sharding == "zero3":
            import deepspeed

            # every process writes the same values; on leaving the block rank 0's are partitioned again
            with deepspeed.zero.GatheredParameters(self.parameters, modifier_rank=0):
                for param, value in zip(self.parameters, values):
                    param.data.copy_(value.to(param.device, param.dtype))
        else:
            for param, value in zip(self.parameters, values):
                param.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole LoRA by parameter name, fp32 on the CPU (a collective when sharded)."""
        return {name: value.float().cpu().contiguous() for name, value in zip(self.names, self.read())}
