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


DEEPSPEED_BF16 = """
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from deepspeed.utils import safe_get_full_fp32_param
from rl.lora import LoraEMA
from rl.sharded_lora import LoraWeights
torch.manual_seed(0)
model = torch.nn.Linear(8, 8)
config = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
          "zero_optimization": {"stage": 2, "overlap_comm": False}}
deepspeed.init_distributed(dist_backend="gloo")
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=config)
for _ in range(3):
    loss = engine(torch.randn(1, 8, dtype=torch.bfloat16)).float().pow(2).sum()
    engine.backward(loss)
    engine.step()
params = list(engine.module.parameters())
master = [safe_get_full_fp32_param(p) for p in params]
weights = LoraWeights(params, ["weight", "bias"], deepspeed_masters=True)
read = weights.read()
assert params[0].dtype == torch.bfloat16 and all(r.dtype == torch.float32 for r in read)
assert all(torch.equal(r, m) for r, m in zip(read, master))
assert (params[0].float() - master[0]).abs().max() > 0  # the module's copy is rounded: what was read before
ema = LoraEMA(weights, 0.9)
assert all(torch.equal(s, m) for s, m in zip(ema.averaged_state_dict().values(), master))
print("ok")
"""


def test_under_deepspeed_bf16_the_lora_is_read_from_the_fp32_values_not_the_rounded_module_copy(tmp_path):
    """DeepSpeed in bf16 keeps a bf16 copy in the module and the fp32 values in its optimizer: the EMA and the
    export read the fp32 ones (they read the module's copy, rounded to bf16, unlike DDP)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ds_bf16.py"
    script.write_text(DEEPSPEED_BF16)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(port)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-2000:]
