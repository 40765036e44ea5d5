"""DeepSpeed values are filled from the run config; contradictions and ZeRO-3 fail naming the reason."""

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from rl.distributed import configure_deepspeed


def fake_accelerator(ds_config: dict, accumulation: int = 6, processes: int = 2):
    plugin = SimpleNamespace(deepspeed_config=ds_config)
    return SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        state=SimpleNamespace(deepspeed_plugin=plugin),
        gradient_accumulation_steps=accumulation,
        num_processes=processes,
        device=torch.device("cpu"),
    )


def test_run_config_fills_deepspeed_values():
    ds = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    configure_deepspeed(fake_accelerator(ds), micro_batch_size=4, max_grad_norm=1.0)
    # accumulation 6 backward passes per optimizer step (e.g. 2 micro-batches x 3 trained steps); 4 x 6 x 2 = 48
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 6
    assert ds["gradient_clipping"] == 1.0 and ds["train_batch_size"] == 48
    assert ds["zero_optimization"]["overlap_comm"] is False  # CPU processes: no overlapped reduction


def test_contradicting_deepspeed_value_fails_naming_it():
    ds = {"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5}
    with pytest.raises(ValueError, match="gradient_clipping=0.5.*max_grad_norm"):
        configure_deepspeed(fake_accelerator(ds), micro_batch_size=4, max_grad_norm=1.0)


def test_zero3_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="ZeRO-3 is not supported yet.*deepspeed_zero2.yaml"):
        configure_deepspeed(fake_accelerator({"zero_optimization": {"stage": 3}}), 4, 1.0)
