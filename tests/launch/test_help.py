"""``--help`` on every entry script in launch/ and bench/: exit 0, each option with its type and default.

The scripts run in this process (runpy, as ``python script --help`` would) so the heavy imports load once and
the whole file takes seconds.
"""

import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(
    path
    for folder in ("launch", "bench")
    for path in (ROOT / folder).glob("*.py")
    if 'if __name__ == "__main__":' in path.read_text()
)
# A few lines each script's help must hold: option names with their type, sections, valid values, the default.
EXPECTED = {
    "launch/grpo_flux.py": [
        "model: The base model and its LoRA.",
        "sampling: ",
        "pruning: ",
        "--learning_rate float  (default: 0.0005)",  # configs/tiny_shapes.yaml's: what the bare line runs
        "--height int  (default: 64)",
        "one of: awm, flow_grpo",
        "--save_lora bool  (default: true; true or false)",
        "without --config it runs the shipped default, configs/tiny_shapes.yaml",
    ],
    "launch/ablate.py": ["--variants str", "--budget_minutes float", "run-config override"],
    "launch/config_docs.py": ["--check", "--out str"],
    "launch/eval_shapes.py": ["--pipeline str", "(default: assets/tiny-flux-shapes)", "--seeds int"],
    "launch/plot.py": ["--metric str", "--out Path"],
    "launch/probe_collect.py": ["--num_prompts int  (default: 400)", "--capture_steps list[int]"],
    "launch/probe_train.py": [
        "--capture_step int | None",
        "(default: the data's only one",
        "--overwrite bool",
        "--lr float",
    ],
    "launch/reward_server.py": ["--reward str", "(required)", "--port int"],
    "launch/sample.py": ["--pretrained str", "--dtype {fp32,bf16}", "(default: fp32)", "--best_of int", "--keep int"],
    "launch/train_tiny_flux.py": ["--vae_steps int", "(default: 1200)"],
    "bench/fault_sweep.py": ["--only str", "--results str"],
    "bench/server_faults.py": ["python bench/fault_sweep.py --only server_"],
    "bench/funnel_search.py": ["--raw str [str ...]", "(required)", "--max_stages int"],
    "bench/gpu_flux_dev.py": ["--resolution int", "--tiny"],
    "bench/gpu_full_loop.py": ["--smoke", "--modes", "--steps"],
    "bench/memory_per_rank.py": ["--skip_measure", "--port int"],
    "bench/predictor_quality.py": ["--probe str", "--threads int"],
    "bench/probe_quality.py": ["--run_config str", "--fit_steps int"],
    "bench/reward_overlap.py": ["--seconds_per_image float  (default: 0.05)", "--smoke bool", "--rewards list[str]"],
    "bench/rollout_speed.py": ["--keep_fraction float  (default: 0.5)", "--memory bool"],
    "bench/seed_selection.py": ["--best_of int [int ...]", "--probe_path str", "--smoke"],
    "bench/sampling_speed.py": ["--threads int [int ...]", "(default: [1, 2])"],
}


def test_every_entry_script_is_covered():
    assert {str(path.relative_to(ROOT)) for path in SCRIPTS} == set(EXPECTED)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_help_exits_0_and_documents_the_options(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts put the checkout on it
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps to the terminal, breaking paths at their hyphens
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {script.name}")
    words = " ".join(text.lower().split())
    for expected in EXPECTED[str(script.relative_to(ROOT))]:
        assert " ".join(expected.lower().split()) in words, f"{expected!r} missing from {script.name} --help"
