"""Every command the README shows parses as written, and the short ones run with tiny overrides.

The commands are read from README.md itself (its bash blocks and inline ``python ...`` spans), so a renamed
option, config or script breaks this test instead of a newcomer's first try. Parsing is each script's own:
``parse_config`` for the trainer, ``launch/ablate.py``'s plan of every run, and every other script's argparse
(stopped right after parsing). The FLUX.1-dev lines parse but do not run here (no weights offline).
"""

import argparse
import json
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rl.config_help import ConfigParser
from rl.config_parse import parse_config

ROOT = Path(__file__).resolve().parents[2]
TINY_RUN = ["--max_steps", "1", "--prompts_per_step", "2", "--eval_every", "0", "--eval_before_training", "false",
            "--final_eval_num_prompts", "2", "--final_eval_images_per_prompt", "1", "--wandb_mode", "disabled",
            "--progress_bar", "false", "--save_every", "0", "--save_every_minutes", "0"]  # fmt: skip


def readme_commands() -> list[list[str]]:
    """The README's commands: lines of ```bash blocks (continuations joined) and inline `python ...` spans."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line.startswith(("python ", "accelerate launch ")):
                commands.append(shlex.split(line))
    for span in re.findall(r"`((?:python|accelerate launch) [^`]+)`", text):
        commands.append(shlex.split(span.replace("\n", " ")))
    return commands


def script_and_args(command: list[str]) -> tuple[str, list[str], list[str]]:
    """(script, its arguments, the launcher's arguments before it)."""
    at = next(i for i, word in enumerate(command) if word.endswith(".py"))
    return command[at], command[at + 1 :], command[:at]


class _Parsed(Exception):
    pass


def parse_only(script: str, args: list[str], monkeypatch) -> object:
    """Run ``script`` as ``python script args`` would, stopping when its argparse has parsed the line."""

    def stop(parser, argv=None, namespace=None):
        namespace, extra = original(parser, argv, namespace)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        raise _Parsed(namespace)

    def stop_config(parser, args=None, **kwargs):
        raise _Parsed(original_config(parser, args, **kwargs))  # the config sections, validated

    original, original_config = argparse.ArgumentParser.parse_known_args, ConfigParser.parse_args_and_config
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    monkeypatch.setattr(ConfigParser, "parse_args_and_config", stop_config)
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(_Parsed) as parsed:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    return parsed.value.args[0]


COMMANDS = readme_commands()


def test_the_readme_shows_the_commands_a_user_needs():
    scripts = {script_and_args(c)[0] for c in COMMANDS}
    assert {"launch/grpo_flux.py", "launch/ablate.py", "launch/sample.py", "launch/probe_collect.py"} <= scripts
    assert sum(c[0] == "accelerate" for c in COMMANDS) >= 6  # one GPU, DDP, ZeRO-2, FSDP, two nodes, CPU


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c)[:90] for c in COMMANDS])
def test_every_readme_command_parses_as_written(command, monkeypatch):
    script, args, launcher = script_and_args(command)
    assert (ROOT / script).is_file(), script
    if "--config_file" in launcher:  # accelerate's config: present and YAML
        accelerate_config = ROOT / launcher[launcher.index("--config_file") + 1]
        assert isinstance(yaml.safe_load(accelerate_config.read_text()), dict)
    if "--help" in args:
        return  # tests/launch/test_help.py
    monkeypatch.chdir(ROOT)
    if script == "launch/grpo_flux.py":
        parse_config(args)
    elif script == "launch/ablate.py":
        ablate = runpy.run_path(str(ROOT / script))
        options, passthrough = ablate["parse"](args)
        assert len(ablate["plan"](options, passthrough)) == len(options.seeds) * len(options.variants.split(","))
    else:
        parse_only(script, args, monkeypatch)


def _run(command: list[str], cwd: Path) -> str:
    done = subprocess.run([sys.executable, *command[1:]], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def _readme(script: str, *, containing: str = "") -> list[str]:
    return next(c for c in COMMANDS if script_and_args(c)[0] == script and containing in " ".join(c))


def test_the_short_readme_commands_run_with_tiny_overrides(tmp_path):
    """The pruned training line (1 step, its LoRA kept), sampling and best-of-N with that LoRA, the plot."""
    run = tmp_path / "run"
    train = _readme("launch/grpo_flux.py", containing="--prune_expand")
    _run([*train, *TINY_RUN, "--output_dir", str(run)], ROOT)
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()

    sample = _readme("launch/sample.py")
    assert sample[sample.index("--lora") + 1] == "runs/tiny_shapes/lora"  # make train's LoRA; here the run's
    sample = [str(run / "lora") if word == "runs/tiny_shapes/lora" else word for word in sample]
    sample = [str(tmp_path / "samples") if word == "samples/" else word for word in sample]
    _run(sample, ROOT)
    assert len(list((tmp_path / "samples").glob("000_*.png"))) == 4  # --seeds 0 1 2 3
    addition = "--best_of 8 --predictor preview --capture_step 3 5 --keep 3 2 --reward shapes"
    assert addition in " ".join((ROOT / "README.md").read_text().split())  # the README's funnel, as written there
    seeds = sample.index("--seeds")  # replaced by the selection's seeds 0..N-1
    _run([*sample[:seeds], *sample[seeds + 5 : -2], "--out", str(tmp_path / "best"), *addition.split()], ROOT)
    report = json.loads((tmp_path / "best" / "selection.json").read_text())
    assert report["best_of"] == 8 and all(len(p["kept_seeds"]) == 2 for p in report["prompts"])

    plot = _readme("launch/plot.py")
    metrics = str(run / "metrics.jsonl")
    _run([plot[0], plot[1], metrics, metrics, "--out", str(tmp_path / "curves.png")], ROOT)
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_a_readme_training_line_that_changes_the_run_writes_to_its_own_folder(monkeypatch):
    """The shipped configs resume whatever their output_dir holds, so a README line that trains something other
    than its config's run (another reward, pruning, ...) names its own output_dir: after `make train` it would
    otherwise be refused as a changed resume."""
    monkeypatch.chdir(ROOT)
    folders = []
    for command in COMMANDS:
        script, args, _ = script_and_args(command)
        if script != "launch/grpo_flux.py" or "--help" in args:
            continue
        config = parse_config(args)
        shipped = parse_config(args[: args.index("--config") + 2]) if "--config" in args else parse_config([])
        if config.flat() != shipped.flat():
            assert "--output_dir" in args, " ".join(command)
            folders.append(config.logging.output_dir)
    assert len(folders) == len(set(folders)) >= 3
