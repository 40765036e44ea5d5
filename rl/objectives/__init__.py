"""Policy objectives: what the group advantages weight. Each is one registered unit in this package.

An objective declares what it needs of the rollouts (:class:`Needs`), which ``policy/*`` metrics it produces,
computes the loss of a micro-batch (:meth:`Objective.loss`) and logs its own diagnostics
(:meth:`Objective.record`); the trainer calls only this interface and the config validates against the
declarations (rl/config.py), so a metric an objective does not compute is never logged. Shipped:

- ``flow_grpo`` (:mod:`rl.objectives.flow_grpo`): PPO-clipped ratio of the recorded SDE transitions' log-probs.
- ``awm`` (:mod:`rl.objectives.awm`): advantage-weighted matching on the finished images, noised afresh.

To add one (DiffusionNFT's, say): a file here with an :class:`Objective` subclass decorated
``@register("name")``, its options (if any) as ``<option_prefix>*`` fields of ``TrainingConfig`` and its tests
(docs/design.md section 3); every module here is imported, so it registers.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

from rl.registry import import_units, registrar

if TYPE_CHECKING:
    from rl.loss import LossOutput
    from rl.metrics_log import MetricsAccumulator

OBJECTIVES: dict[str, type[Objective]] = {}


@dataclasses.dataclass(frozen=True)
class Needs:
    """What an objective needs of the rollouts.

    Attributes:
        sde_noise: SDE noise on the trained steps (a ratio of transition log-probs needs a stochastic step).
        transitions: the recorded per-step states and log-probs of the trained steps.
        finished_images: every trained rollout finished (rollouts pruned early cannot train on their first steps).
    """

    sde_noise: bool
    transitions: bool
    finished_images: bool


class Objective:
    """Base of the registered objectives (see the module docstring)."""

    name: ClassVar[str]
    needs: ClassVar[Needs]
    metrics: ClassVar[tuple[str, ...]]  # the policy/* keys :meth:`record` logs
    # the TrainingConfig keys it alone reads (e.g. "awm_"): setting one under another objective is an error
    option_prefix: ClassVar[str] = ""

    def __init__(self, trainer) -> None:
        self.trainer = trainer  # its sampler, model, config and adapter-off reference context

    def loss(self, embeds, rollouts, rows, step, advantages, weights) -> LossOutput:
        """The loss of rollouts ``rows`` at denoising steps ``step`` (``[b]``), weighted per sample."""
        raise NotImplementedError

    @property
    def reference_forwards(self) -> int:
        """No-grad transformer forwards per trained (rollout, step) pair besides the policy's: the KL reference's."""
        return int(self.trainer.config.training.kl_beta > 0)

    def after_optimise(self) -> None:
        """Called once per GRPO step after all its updates: where an objective advances state it keeps across steps."""

    def state_dict(self) -> dict:
        """The objective's own state that resume restores (none by default)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

    def record(self, out: LossOutput, metrics: MetricsAccumulator, first_inner: bool) -> None:
        """Log the diagnostics of one micro-batch (the shared loss terms here; subclasses add their own)."""
        count = float(out.count)
        if count == 0:
            return
        metrics.add("policy/loss", float(out.loss.detach()), count)
        metrics.add("policy/policy_loss", float(out.policy_loss), count)
        if self.trainer.config.training.kl_beta > 0:
            metrics.add("policy/kl_ref", float(out.kl_ref), count)


register = registrar(OBJECTIVES, "objective")  # @register("name") makes an Objective subclass selectable


import_units(__name__, __path__)  # every module here registers its units
