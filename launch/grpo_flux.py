"""Flow-GRPO LoRA training of a FLUX model: parse the config, build the trainer, set up, train, clean up.

    python launch/grpo_flux.py --config configs/tiny_shapes.yaml                 # the shipped tiny model (CPU)
    accelerate launch launch/grpo_flux.py --config configs/flux_dev_pickscore.yaml
    python launch/grpo_flux.py --config configs/tiny_shapes.yaml --learning_rate 3e-4 --max_steps 20

Every option is documented in rl/config.py; ``--key value`` overrides the YAML.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rl.config import parse_config
from rl.trainer import GRPOTrainer


def main(argv: list[str] | None = None) -> GRPOTrainer:
    """Run one training; returns the (cleaned-up) trainer: ``trainer.summary`` holds base vs final scores."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = parse_config(argv)
    trainer = GRPOTrainer(config)
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    if trainer.accelerator.is_main_process:  # the run's headline: held-out score before and after
        total = {k: trainer.summary.get(k, {}).get("total/mean") for k in ("base", "final", "delta")}
        print(json.dumps({"held_out_total": total, "output_dir": config.logging.output_dir}))
    return trainer


if __name__ == "__main__":
    main()
