"""Every shipped config loads and validates; unknown keys and broken cross-field constraints fail by name."""

import dataclasses
import logging
from pathlib import Path

import pytest
import yaml

from rl.config import RunConfig
from rl.config_parse import known_keys, load_yaml, parse_config, with_default_config

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.relative_to(ROOT).parts)
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").rglob("*.yaml"))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_run_config_validates(path):
    text = path.read_text()
    header = text.split("\n\n")[0]
    assert header.startswith("#") and "Launch:" in header and "Needs:" in header and "Override:" in header
    config = parse_config(["--config", str(path)])
    assert isinstance(config, RunConfig)
    assert set(yaml.safe_load(text)) <= set(known_keys())


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_accelerate_configs_are_yaml_mappings(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_the_default_config_is_the_tiny_model():
    assert (ROOT / "configs" / "tiny_shapes.yaml") in RUN_CONFIGS
    assert "launch/grpo_flux.py --config configs/tiny_shapes.yaml" in (ROOT / "Makefile").read_text()


def test_the_bare_launch_line_runs_the_default_config(launch_script, caplog):
    tiny = parse_config(["--config", str(ROOT / "configs" / "tiny_shapes.yaml")])
    launcher = launch_script("grpo_flux")
    with caplog.at_level(logging.INFO):
        bare = launcher.run_config([])
    assert bare.flat() == tiny.flat()
    first = caplog.records[0].getMessage()
    assert first.startswith("no --config given") and "configs/tiny_shapes.yaml" in first
    overridden = launcher.run_config(["--max_steps", "3", "--height", "32", "--width", "32"])
    assert overridden.flat() == {**tiny.flat(), "max_steps": 3, "height": 32, "width": 32}
    assert launcher.run_config(["--config", str(ROOT / "configs" / "flux_dev_pickscore.yaml")]).sampling.height == 512


SHAPE_KEYS = ("height", "width", "max_sequence_length", "lora_rank", "lora_alpha")


def test_the_defaults_fit_the_default_model_and_flux_dev_sizes_live_in_its_configs():
    """A config that names no size renders the default (tiny, 64 px) model at its own size; the FLUX.1-dev
    configs set FLUX.1-dev's sizes themselves, so no default carries them."""
    defaults, tiny = RunConfig().flat(), parse_config(["--config", str(ROOT / "configs" / "tiny_shapes.yaml")]).flat()
    assert defaults["pretrained"] == tiny["pretrained"]
    assert {key: defaults[key] for key in SHAPE_KEYS} == {key: tiny[key] for key in SHAPE_KEYS}
    for path in sorted((ROOT / "configs").glob("flux_dev_*.yaml")):
        written = yaml.safe_load(path.read_text())
        assert {key: written[key] for key in SHAPE_KEYS} == {
            "height": 512, "width": 512, "max_sequence_length": 512, "lora_rank": 64, "lora_alpha": 128
        }, path.name  # fmt: skip


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_misspelt_yaml_key_fails_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"'lerning_rate'.*did you mean 'learning_rate'"):
        parse_config(["--config", _write(tmp_path, "lerning_rate: 1.0e-4\n")])


def test_two_config_files_are_refused_naming_the_option(tmp_path):
    config = _write(tmp_path, "max_steps: 2\n")
    with pytest.raises(ValueError, match="--config is given more than once"):  # was the parser's "not used" list
        parse_config(["--config", config, "--config", config])


def test_misspelt_cli_key_fails_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"'grup_size'.*command line.*did you mean 'group_size'"):
        parse_config(["--grup_size", "4"])
    with pytest.raises(ValueError, match="'learning_rat'"):  # no silent argparse prefix matching
        parse_config(["--learning_rat", "1e-3"])


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = _write(tmp_path, "group_size: 4\nreward: shapes: jpeg_compressibility\n")
    with pytest.raises(ValueError, match=r"run\.yaml, line 2: mapping values are not allowed here; fix the YAML"):
        parse_config(["--config", path])


def test_a_duplicate_yaml_key_is_an_error_naming_it(tmp_path):
    path = _write(tmp_path, "group_size: 4\nlearning_rate: 1.0e-4\n\ngroup_size: 8\n")  # PyYAML would take 8
    with pytest.raises(ValueError, match=r"run\.yaml, line 4: key 'group_size' is given twice \(first on line 1\)"):
        parse_config(["--config", path])
    merged = _write(tmp_path, "base: &b {x: 1}\nother:\n  <<: *b\n  x: 2\n")  # overriding a merge key is no duplicate
    assert load_yaml(Path(merged)) == {"base": {"x": 1}, "other": {"x": 2}}


def test_a_negative_number_on_the_command_line_is_a_value():
    # argparse took "-1e-4" for an option ("expected one argument"); as a value it reaches the range check
    with pytest.raises(ValueError, match=r"learning_rate must be > 0, got -0\.0001"):
        parse_config(["--learning_rate", "-1e-4"])
    assert parse_config(["--seed", "-3", "--learning_rate", "2e-4"]).flat()["seed"] == -3
    weights = ["--reward", "shapes,jpeg_compressibility", "--reward_weights", "-1e-3", "1"]  # in a list too
    assert parse_config(weights).reward.reward_weights == [-1e-3, 1.0]


def test_cli_overrides_yaml_and_types_are_checked(tmp_path):
    path = _write(
        tmp_path, "learning_rate: 1.0e-4\ngroup_size: 4\nreward_weights: [1, 2]\nreward: shapes,jpeg_compressibility\n"
    )
    config = parse_config(["--config", path, "--group_size", "6"])
    assert config.sampling.group_size == 6 and config.training.learning_rate == 1e-4
    equals = parse_config(with_default_config([f"--config={path}", "--group_size=6"]))  # the = forms too
    assert equals.sampling.group_size == 6 and equals.training.learning_rate == 1e-4
    assert config.reward.reward_weights == [1.0, 2.0]
    with pytest.raises(ValueError, match="group_size: expected"):
        parse_config(["--config", _write(tmp_path, "group_size: 4.5\n")])
    with pytest.raises(ValueError, match="pretrained: expected"):
        parse_config(["--config", _write(tmp_path, "pretrained: 12\n")])


def test_a_value_of_the_wrong_type_on_the_command_line_is_one_line(capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_config(["--group_size", "eight"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err  # argparse printed its whole usage first (found by bench/fault_sweep.py)
    assert err.count("\n") == 1 and err.startswith("error: argument --group_size/--group-size: invalid int value")


def test_reward_kwargs_accepts_json_on_the_command_line():
    config = parse_config(["--reward", "remote", "--reward_kwargs", '{"remote": {"url": "http://h:1"}}'])
    assert config.reward.reward_kwargs == {"remote": {"url": "http://h:1"}}
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_config(["--reward_kwargs", "{url: x}"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--noise_level", "0"], "noise_level=0.*Set noise_level > 0.*or policy_objective: awm"),
        (["--policy_objective", "dpo"], "policy_objective='dpo' is not one of"),
        (["--awm_error_power", "0"], "awm_error_power must be > 0, got 0"),
        (
            ["--policy_objective", "awm", "--prune_policy", "random", "--prune_advantage", "imputed"]
            + ["--probe_path", "init", "--prune_train_early", "true"],
            "prune_train_early=true .*policy_objective='awm' trains on finished images",
        ),
        (["--group_size", "1"], "group_size=1.*Set group_size >= 2"),
        (
            ["--prune_policy", "variance", "--predictor", "preview", "--capture_step", "10"],
            r"capture_step=10 must lie in \[1, num_steps - 1 = 9\]",
        ),
        (["--num_steps", "1"], "num_steps >= 2"),
        (
            ["--train_steps", "window", "--num_steps", "4", "--train_window_start", "2", "--train_window_size", "2"],
            "last step is never trained",
        ),
        (["--sde_window_only", "true"], "sde_window_only=true needs train_steps='window'"),
        (["--reward", "shapes,jpeg_compressibility", "--reward_weights", "1"], "one weight per component"),
        (["--reward_kwargs", '{"pickscore": {}}'], "not reward components"),
        (["--train_steps", "sometimes"], "train_steps='sometimes' is not one of"),
        (["--reward_failure_policy", "ignore"], "reward_failure_policy='ignore'"),
        (["--ema_decay", "1.0"], "ema_decay"),
        (["--train_fraction", "0"], "train_fraction"),
        (["--mixed_precision", "fp16"], "mixed_precision='fp16'"),
        (["--lr_schedule", "step"], "lr_schedule='step' is not one of"),
        (["--lr_warmup_steps", "-1"], "lr_warmup_steps.*must be >= 0"),
        (["--final_eval_images_per_prompt", "-1"], "final_eval_images_per_prompt must be >= 0"),
        (["--prompt_category_weights", "squares=2"], "prompt_category_weights: .*squares"),
        (["--prompt_category_weights", "position"], "prompt_category_weights: .*expected category=weight"),
        (["--prompts", "p.txt", "--prompt_category_weights", "position=2"], "needs a shapes:\\* prompt source"),
    ],
)
def test_cross_field_and_value_checks(args, message):
    with pytest.raises(ValueError, match=message):
        parse_config(args)


def test_awm_trains_on_deterministic_rollouts():
    assert parse_config(["--policy_objective", "awm", "--noise_level", "0"]).sampling.noise_level == 0


def test_every_option_is_documented_once_and_keys_are_unique():
    keys = known_keys()  # raises if two sections share a key
    assert len(keys) > 40
    for cls in RunConfig.sections().values():
        for field in dataclasses.fields(cls):
            assert len(field.metadata.get("help", "")) > 15, f"{cls.__name__}.{field.name} is undocumented"


def test_flat_dump_round_trips(tmp_path):
    config = parse_config(["--config", str(ROOT / "configs" / "tiny_shapes.yaml")])
    dumped = _write(tmp_path, yaml.safe_dump(config.flat()))
    assert parse_config(["--config", dumped]).flat() == config.flat()


def test_ratio_clipping_warnings_only_for_an_objective_that_clips_a_ratio(caplog):
    shapes = ["--mixed_precision", "bf16", "--sample_batch_size", "16", "--train_batch_size", "8",
              "--clip_range", "0.2"]  # fmt: skip
    parse_config(with_default_config(["--policy_objective", "awm", *shapes]))  # AWM has no ratio to clip
    assert "clip_range" not in caplog.text and "bf16 kernels" not in caplog.text
    parse_config(with_default_config(["--policy_objective", "flow_grpo", *shapes]))
    assert "clip_range=0.2" in caplog.text and "bf16 kernels round" in caplog.text


@pytest.mark.parametrize(
    "args, message",
    [
        (["configs/tiny_shapes.yaml"], "'configs/tiny_shapes.yaml' on the command line is not an option: a config file is given as --config configs/tiny_shapes.yaml"),
        (["max_steps=1"], "'max_steps=1' on the command line: options are written --max_steps 1"),
        (["--max_minutes", "-1"], "max_minutes must be >= 0, got -1.0"),
        (["--save_total_limit", "-2"], "save_total_limit must be >= 0, got -2"),
        (["--save_every_minutes", "-5"], "save_every_minutes must be >= 0, got -5.0"),
        (["--adam_epsilon", "0"], "adam_epsilon must be > 0, got 0.0"),
        (["--adam_beta2", "1.5"], "adam_beta2 must lie in [0, 1), got 1.5"),
        (["--adam_weight_decay", "-1"], "adam_weight_decay must be >= 0, got -1.0"),
        (["--max_steps", "160", "--lr_warmup_steps", "1000"], "lr_warmup_steps=1000 >= max_steps=160"),
        (["--noise_level", "0", "--same_initial_noise", "true", "--policy_objective", "awm"], "nothing is trained"),
        (["--gradient_accumulation_steps", "200"], "but a step trains at most 128 (prompts_per_step x the rollouts"),
        (["--gradient_accumulation_steps", "40", "--prune_policy", "topk", "--prune_keep_fraction", "0.25",
          "--probe_path", "init", "--capture_step", "4"], "but a step trains at most 32 "),  # 16 prompts x 2 of 8
        (["--distributed_timeout_s", "0.001"], "a collective waiting less than 10 s fails"),
        (["--reward_timeout_s", "0.001"], "reward_timeout_s must be 0 (no limit) or at least 1 s"),
        (["--probe_path", "init", "--capture_step", "50"], "capture_step=50 must lie in [1, num_steps - 1 = 9]"),
        (["--prune_policy", "random", "--predictor", "reward", "--capture_step", "50"], "capture_step=50 must lie"),
    ],
)  # fmt: skip
def test_command_line_slips_are_named_with_the_fix(args, message):
    with pytest.raises(ValueError) as error:
        parse_config(args)
    assert message in str(error.value)


def test_a_bad_value_in_the_yaml_names_the_file_and_key_not_a_flag(tmp_path, capsys):
    path = _write(tmp_path, "max_steps: lots\n")
    with pytest.raises(SystemExit) as exit_:
        parse_config(["--config", path])
    assert exit_.value.code == 2
    assert f"error: config file {path}, key max_steps: invalid int value: 'lots'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the same key on the command line: the flag is what the user typed
        parse_config(["--config", path, "--max_steps", "many"])
    assert "argument --max_steps" in capsys.readouterr().err


def test_option_values_that_look_like_slips_are_values(tmp_path):
    """A value after its flag is never read as a stray word: a path ending in .yaml, a label=spec reward; a word
    after a --key=value option is no value of it."""
    config = parse_config(["--output_dir", str(tmp_path / "runs.yaml"), "--reward", "max_steps=shapes"])
    assert config.logging.output_dir.endswith("runs.yaml") and config.reward.reward == "max_steps=shapes"
    assert parse_config([f"--output_dir={tmp_path / 'a.yaml'}"]).logging.output_dir.endswith("a.yaml")
    with pytest.raises(ValueError, match="a config file is given as --config configs/x.yaml"):
        parse_config(["--max_steps=5", "configs/x.yaml"])


def test_an_options_dashed_alias_is_known():
    from rl.config_parse import check_flags

    check_flags(["--capture-steps", "3", "--num_prompts", "2"], ["capture_steps", "num_prompts"])
    with pytest.raises(ValueError, match="'capture-stps'.*did you mean 'capture_steps'"):
        check_flags(["--capture-stps", "3"], ["capture_steps"])


def test_an_accelerate_config_that_overrides_the_accumulation_window_is_refused():
    """accelerate lets the launch's gradient_accumulation_steps (a DeepSpeed config from `accelerate config` holds 1)
    win over the run's window: the optimizer would step every backward pass of a loss scaled for the window."""
    import os
    import subprocess
    import sys

    code = "from rl.distributed import build_accelerator; build_accelerator('no', 15)"
    env = {**os.environ, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0 and "sets gradient_accumulation_steps=1, but the run needs 15" in done.stderr
