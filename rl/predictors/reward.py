"""``reward``: the oracle: every rollout finished, decoded and scored by the real reward.

Nothing is saved on denoising; with the ``variance`` policy it is PODS (arXiv 2504.13818: train on the
max-variance subset of a larger, fully scored group), and with any policy it measures the ceiling of
selection in the same harness. The trainer reuses these rewards for the survivors instead of scoring twice.
"""

from __future__ import annotations

from rl.predictors import Prediction, PredictionCost, PredictionInputs, Predictor, register, reward_scores, scored_rows


@register("reward")
class RewardPredictor(Predictor):
    scores_with_reward = True
    finishes_rollouts = True

    @property
    def cost_per_rollout(self) -> PredictionCost:
        return PredictionCost(0.0, 1.0, 1.0)  # the finished image decoded and scored

    def predict(self, inputs: PredictionInputs) -> Prediction:
        result = inputs.score_latents(inputs.early.latents)
        cost = self.cost_per_rollout.times(len(inputs.early))
        return Prediction(reward_scores(result), cost, 0.0, result=result, valid=scored_rows(result))
