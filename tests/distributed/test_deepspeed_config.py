"""DeepSpeed values are filled from the run config; contradictions fail naming them; sharded runs refuse prediction-dependent work."""

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from rl.distributed import check_even_work, configure_deepspeed, reward_wait_limit, shards_parameters


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


def test_zero3_shards_parameters_and_refuses_prediction_dependent_work():
    assert shards_parameters(fake_accelerator({"zero_optimization": {"stage": 3}}))
    assert not shards_parameters(fake_accelerator({"zero_optimization": {"stage": 2}}))
    check_even_work(prune_policy="variance")
    with pytest.raises(ValueError, match="'threshold'.*'variance'"):
        check_even_work(prune_policy="threshold")
    with pytest.raises(ValueError, match="prune_min_spread=0.05 skips.*set prune_min_spread 0"):
        check_even_work(prune_policy="variance", min_spread=0.05)


def test_a_reward_wait_ends_before_the_other_processes_give_up():
    assert reward_wait_limit(900, 1800, num_processes=2) == 900
    assert reward_wait_limit(3600, 1800, num_processes=1) == 3600  # no other process waits
    assert reward_wait_limit(3600, 1800, num_processes=2) == 900
    assert reward_wait_limit(0, 20, num_processes=2) == 10  # "no limit" cannot outlast the others' patience
    assert reward_wait_limit(0, 20, num_processes=1) == 0
