"""The README's "Plug in your own reward" example, run end to end through launch/grpo_flux.py.

The test takes the example module and the launch line verbatim from README.md (the first ``python`` and
``bash`` blocks of the rewards section), writes the module to a temporary folder, launches the trainer from
there (so the module is found next to where the run starts, as a user's would be) on the tiny fixture
pipeline with overrides that shrink the run to one GRPO step, and checks that the custom reward was trained
on and logged.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# One GRPO step of one prompt x 2 rollouts x 2 denoising steps on the 32x32 fixture pipeline; a one-image eval.
TINY_OVERRIDES = {
    "max_steps": 1,
    "prompts_per_step": 1,
    "group_size": 2,
    "num_steps": 2,
    "train_window_size": 1,  # the config trains steps [0, 3); 2 steps leave only step 0 trainable
    "height": 32,
    "width": 32,
    "max_sequence_length": 16,
    "sample_batch_size": 2,
    "train_batch_size": 2,
    "lora_rank": 4,
    "lora_alpha": 8,
    "eval_before_training": "false",
    "eval_every": 0,
    "eval_num_prompts": 1,
    "eval_images_per_prompt": 1,
    "final_eval_num_prompts": 1,
    "wandb_mode": "disabled",
    "progress_bar": "false",
    "save_lora": "false",
}


def rewards_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("<!-- section:rewards -->")[1].split("<!-- /section:rewards -->")[0]


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", rewards_section(), flags=re.S)


def test_example_is_short_and_self_describing():
    code = code_blocks("python")[0]
    assert code.startswith("# mymodule.py\n")
    assert len([line for line in code.splitlines() if line.strip()]) <= 16
    assert "--reward mymodule:MyReward --output_dir" in code_blocks("bash")[0]


def test_readme_example_trains_end_to_end(tmp_path, tiny_flux_pipeline):
    code = code_blocks("python")[0]
    module = code.splitlines()[0].removeprefix("# ")
    (tmp_path / module).write_text(code)
    tiny_flux_pipeline.save_pretrained(tmp_path / "pipeline")

    launch = shlex.split(code_blocks("bash")[0])
    assert launch[:2] == ["python", "launch/grpo_flux.py"], launch
    command = [sys.executable, str(ROOT / launch[1])] + [
        str(ROOT / a) if a.endswith(".yaml") else a for a in launch[2:]
    ]
    overrides = {**TINY_OVERRIDES, "pretrained": tmp_path / "pipeline", "output_dir": tmp_path / "run"}
    command += [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]

    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = next(step for step in steps if "train/optimizer_steps" in step)
    assert trained["train/optimizer_steps"] >= 1
    redness = trained["reward/mymodule:MyReward/redness/mean"]
    assert trained["reward/total/mean"] == redness  # the first key is the trained score
    assert "reward/mymodule:MyReward/brightness/mean" in trained  # further keys are logged
