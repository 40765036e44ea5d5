"""Run the real entry script in an ``accelerate launch`` process, then dump this rank's LoRA weights.

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml tests/distributed/worker.py DUMP_DIR -- ARGS

``DUMP_DIR/rank<i>.pt`` gets the live LoRA parameters (a list of tensors, the trainer's order) of rank i.
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

torch.set_num_threads(1)  # two ranks on two shared cores: more threads per rank only oversubscribe

import grpo_flux  # noqa: E402

if __name__ == "__main__":
    dump, separator, *args = sys.argv[1:]
    assert separator == "--", "usage: worker.py DUMP_DIR -- ARGS"
    trainer = grpo_flux.main(args)
    rank = trainer.accelerator.process_index
    torch.save([p.detach().cpu().clone() for p in trainer.lora_params], Path(dump) / f"rank{rank}.pt")
