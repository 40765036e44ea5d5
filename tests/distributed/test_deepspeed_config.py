"""DeepSpeed values are filled from the run config; contradictions fail naming them; a sharded run's processes
agree how many transformer forwards each phase takes."""

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from rl.distributed import configure_deepspeed, forwards_behind, reward_wait_limit, shards_parameters


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


def test_zero3_shards_parameters():
    assert shards_parameters(fake_accelerator({"zero_optimization": {"stage": 3}}))
    assert not shards_parameters(fake_accelerator({"zero_optimization": {"stage": 2}}))


class ZeRO3Pair:
    """A ZeRO-3 accelerator of two processes whose gather adds the other process's planned forwards."""

    def __init__(self, other: int) -> None:
        self.inner = fake_accelerator({"zero_optimization": {"stage": 3}})
        self.other = other

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, torch.tensor([self.other])])


def test_a_sharded_process_planning_fewer_forwards_learns_how_many_to_add():
    assert forwards_behind(ZeRO3Pair(other=7), 3) == (4, 4)  # this process adds 4, the other none
    assert forwards_behind(ZeRO3Pair(other=2), 6) == (0, 4)  # the other adds 4
    plain = ZeRO3Pair(other=7)
    plain.inner = fake_accelerator({"zero_optimization": {"stage": 2}})  # ZeRO-2: forwards are not collectives
    assert forwards_behind(plain, 3) == (0, 0)


def test_a_reward_wait_ends_before_the_other_processes_give_up():
    assert reward_wait_limit(900, 1800, num_processes=2) == 900
    assert reward_wait_limit(3600, 1800, num_processes=1) == 3600  # no other process waits
    assert reward_wait_limit(3600, 1800, num_processes=2) == 900
    assert reward_wait_limit(0, 20, num_processes=2) == 10  # "no limit" cannot outlast the others' patience
    assert reward_wait_limit(0, 20, num_processes=1) == 0
