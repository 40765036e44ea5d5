"""Shared fixtures: a tiny random FLUX pipeline built offline in about a second, as diffusers' tests do."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from rewards.shapes import vocabulary
from rl.tiny_flux import TinyFluxConfig, build_tiny_flux_pipeline

# Smaller than the shipped model (8x8 image tokens, 1 double + 2 single blocks) so unit tests stay fast;
# same architecture and loading code.
FIXTURE_CONFIG = TinyFluxConfig(
    resolution=32,
    text_length=16,
    num_double_blocks=1,
    num_single_blocks=2,
    num_heads=2,
    head_dim=16,
    axes_dims_rope=(4, 6, 6),
    text_dim=16,
    text_layers=1,
    vae_channels=(8, 16),
    vae_groups=4,
)


LAUNCH = Path(__file__).resolve().parents[1] / "launch"


@pytest.fixture
def launch_script(monkeypatch):
    """``launch_script(name)`` imports ``launch/<name>.py`` as a module (the entry scripts are no package)."""

    def load(name: str) -> types.ModuleType:
        spec = importlib.util.spec_from_file_location(name, LAUNCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up while being created
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def run_launch_script(launch_script, monkeypatch):
    """``run_launch_script(name, *argv)`` runs ``launch/<name>.py``'s ``main()`` as the command line would."""

    def run(name: str, *argv: str) -> None:
        monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
        launch_script(name).main()

    return run


@pytest.fixture
def tiny_flux_pipeline():
    """A fresh randomly initialised FluxPipeline (fp32, CPU); identical on every call (seeded)."""
    return build_tiny_flux_pipeline(vocabulary(), FIXTURE_CONFIG, seed=0)


@pytest.fixture(scope="session")
def tiny_flux_config() -> TinyFluxConfig:
    """The sizes of ``tiny_flux_pipeline`` (to build variants of it)."""
    return FIXTURE_CONFIG


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each trainer builds its own Accelerator; accelerate's process-wide state must not leak between tests."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
