"""LoRA on the FLUX transformer: setup, the adapter-disabled reference, an EMA of the weights, diffusers export.

docs/design.md section 10: diffusers models have ``disable_adapters()`` / ``enable_adapters()`` but no
``disable_adapter()`` context manager (:func:`disable_adapter` is one); a LoRA must be saved with its adapter
metadata (``lora_alpha``), or ``FluxPipeline.load_lora_weights`` assumes alpha = r and silently changes the
outputs (:func:`save_lora` writes it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import FluxPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from rl.sharded_lora import LoraWeights

INIT_LORA_WEIGHTS = {"true": True, "false": False, "gaussian": "gaussian"}


def add_lora(
    transformer: torch.nn.Module, rank: int, alpha: float, target_modules: list[str], init: str = "true"
) -> list[torch.nn.Parameter]:
    """Freeze ``transformer`` and add a trainable LoRA adapter (named ``default``); return its parameters.

    Args:
        transformer: a diffusers model with peft support (``FluxTransformer2DModel``).
        rank, alpha: LoRA rank r and alpha (the update is scaled by alpha / r).
        target_modules: module-name suffixes to adapt.
        init: ``"true"`` (B = 0: starts as the base model), ``"gaussian"`` or ``"false"`` (random A and B).

    Raises:
        ValueError: when no module matches ``target_modules`` (peft's message names them).
    """
    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        init_lora_weights=INIT_LORA_WEIGHTS[init],
        lora_dropout=0.0,  # dropout would make re-scored log-probs differ from the rollout's (ratio != 1)
    )
    transformer.add_adapter(config)
    return [p for p in transformer.parameters() if p.requires_grad]


@contextlib.contextmanager
def disable_adapter(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` as the base model (LoRA off) inside the block, e.g. for the KL reference."""
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


class LoraEMA:
    """Exponential moving average of the trainable (LoRA) parameters, kept in fp32.

    Decay per update is ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (the warm-up of diffusers'
    ``EMAModel``), so early averages are not dominated by the initial weights.

    Args:
        weights: the LoRA, read and written whole (rl/sharded_lora.py: also when the transformer is sharded).
        decay: the asymptotic decay in [0, 1).
    """

    def __init__(self, weights: LoraWeights, decay: float) -> None:
        self.weights = weights
        self.decay = decay
        self.num_updates = 0
        self.shadow = [value.float().clone() for value in weights.read()]

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        """Fold the current parameters into the average (call after each optimizer step).

        Args:
            decay: this update's decay instead of the warmed-up ``self.decay`` (a caller with its own schedule).
        """
        if decay is None:
            decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        self.num_updates += 1
        for shadow, value in zip(self.shadow, self.weights.read()):
            shadow.lerp_(value.float(), 1 - decay)

    @contextlib.contextmanager
    def average_parameters(self) -> Iterator[None]:
        """Inside the block the parameters hold the EMA values; the live values are restored after it."""
        live = [value.clone() for value in self.weights.read()]
        self.weights.write(self.shadow)
        try:
            yield
        finally:
            self.weights.write(live)

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged LoRA by parameter name, fp32 on the CPU (what the export writes; no collective)."""
        return {name: shadow.float().cpu().contiguous() for name, shadow in zip(self.weights.names, self.shadow)}

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s values on the device the average lives on (a checkpoint loads to the CPU;
        on a GPU the next update would mix devices)."""
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.shadow = [
            s.to(o.device, torch.float32, copy=True) for s, o in zip(state["shadow"], self.shadow, strict=True)
        ]


def save_lora(
    transformer: torch.nn.Module,
    directory: str | Path,
    is_main_process: bool = True,
    lora_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the transformer's ``default`` LoRA in diffusers format, with its adapter metadata (lora_alpha).

    ``FluxPipeline.load_lora_weights(directory)`` on a fresh pipeline of the same base model reproduces it.

    Args:
        transformer: the unwrapped (``accelerator.unwrap_model``) LoRA-carrying transformer.
        directory: output folder (created); holds ``pytorch_lora_weights.safetensors``.
        lora_state: the whole LoRA by parameter name (``LoraWeights.state_dict``: gathered when the transformer
            is sharded; the EMA's values inside ``LoraEMA.average_parameters``); default the transformer's own.
    """
    directory = Path(directory)
    peft_state = get_peft_model_state_dict(transformer, state_dict=lora_state)
    state = {k: v.detach().float().cpu().contiguous() for k, v in peft_state.items()}
    metadata = transformer.peft_config["default"].to_dict()
    FluxPipeline.save_lora_weights(
        directory,
        transformer_lora_layers=state,
        is_main_process=is_main_process,
        transformer_lora_adapter_metadata=metadata,
    )
    return directory
