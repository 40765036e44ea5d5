"""Held-out evaluation during training: deterministic samples of fixed prompts and seeds, scored by the reward.

Image j of prompt p (its index in the eval source) uses seed ``1000 p + j``, as launch/eval_shapes.py, so a
final evaluation over every prompt reproduces that script's score, and the base and final evaluations of a run
see the same prompts, seeds and sampler (their difference is the run's held-out gain, ``summary.json``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator
from diffusers import FluxPipeline
from tqdm.auto import tqdm

from rewards.base import RewardError
from rewards.compose import RewardResult, RewardSet
from rl.config import EvalConfig
from rl.data import Prompt, PromptSource
from rl.distributed import EvenForwards, unsharded_forwards
from rl.metrics_log import MetricsAccumulator
from rl.sampler import FluxSampler, encode_prompts

ImageLogger = Callable[[torch.Tensor, list[str], int], None]  # (images [B, 3, H, W], their prompts, columns)


class HeldOutEvaluator:
    """Evaluates the model as it stands (the caller picks the weights: EMA, base, current) on held-out prompts.

    Args:
        accelerator: the run's; prompts are split across processes, metrics reduced as sums and counts.
        pipeline: for its text encoders.
        sampler: a deterministic sampler (noise level 0) on the trained transformer.
        prompts: the held-out prompt source.
        reward: the run's reward set (called directly: evaluation waits for its scores).
        config: which prompts and how many images each.
        text_length: T5 tokens per prompt (``max_sequence_length``).
        show_bar: show a progress bar.
        even_forwards: the evaluation's transformer calls run inside ``even_forwards(count)``: under FSDP and
            ZeRO-3 (every forward a collective) a process with a smaller share catches up with throwaway ones
            (``rl.trainer.GRPOTrainer.even_forwards``).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        pipeline: FluxPipeline,
        sampler: FluxSampler,
        prompts: PromptSource,
        reward: RewardSet,
        config: EvalConfig,
        text_length: int,
        show_bar: bool,
        even_forwards: EvenForwards = unsharded_forwards,
    ) -> None:
        self.accelerator, self.pipeline, self.sampler = accelerator, pipeline, sampler
        self.prompts, self.reward, self.config = prompts, reward, config
        self.failure: RewardError | None = None  # the last evaluation's reward failure (see scores)
        self.text_length, self.show_bar = text_length, show_bar
        self.even_forwards = even_forwards

    @torch.no_grad()
    def __call__(self, final: bool, log_images: ImageLogger) -> dict[str, float]:
        """Mean reward (``total/mean``), every component's and every prompt tag's, over all processes.

        Args:
            final: ``final_eval_num_prompts`` prompts x ``final_images_per_prompt`` seeds (the base and final
                evaluations) rather than the periodic ``eval_num_prompts`` x ``eval_images_per_prompt``.
            log_images: receives the first images of this process's share (a grid for samples/ and wandb).
        """
        e, acc, sampler = self.config, self.accelerator, self.sampler
        self.failure = None
        items = self.prompts.eval_subset(e.final_eval_num_prompts if final else e.eval_num_prompts)
        items = items[acc.process_index :: acc.num_processes]
        per_image = e.final_images_per_prompt if final else e.eval_images_per_prompt
        metrics = MetricsAccumulator()
        chunk = max(1, sampler.batch_size // per_image)
        starts = range(0, len(items), chunk)
        forwards = sum(
            sampler.calls(len(items[start : start + chunk]) * per_image, sampler.num_steps) for start in starts
        )
        with self.even_forwards(forwards):  # shares may differ by a prompt
            for start in tqdm(starts, desc="eval", leave=False, disable=not self.show_bar):
                part = items[start : start + chunk]
                embeds = encode_prompts(self.pipeline, [p.text for _, p in part], self.text_length)
                prompt_index = torch.arange(len(part)).repeat_interleave(per_image)
                seeds = torch.tensor([index * 1000 + j for index, _ in part for j in range(per_image)])
                # autocast on sampling and decoding only, as in training: a reward runs in its own dtype
                with acc.autocast():
                    done = sampler.advance(
                        sampler.start(prompt_index, seeds, acc.device), embeds.to(acc.device), sampler.num_steps
                    )
                    images = sampler.decode(done.latents)
                prompts = [part[i][1] for i in prompt_index.tolist()]
                if start == 0:
                    log_images(images, [p.text for p in prompts], per_image * 4)
                result = self.scores(images, prompts)
                valid = result.valid.bool()
                metrics.add_values("total", result.total[valid])
                for key, values in result.components.items():
                    metrics.add_values(key, values[valid])
                for prompt, score, ok in zip(prompts, result.total.tolist(), valid.tolist()):
                    if ok and "tag" in prompt.metadata:
                        metrics.add(f"tag/{prompt.metadata['tag']}/mean", score)
        return metrics.reduce(acc)

    def scores(self, images: torch.Tensor, prompts: list[Prompt]) -> RewardResult:
        """The reward's result; a reward that fails (raises, or hangs past ``reward_timeout_s``) is held in
        :attr:`failure` (the first) and its images come back invalid, so this process makes the evaluation's
        remaining collectives with the others and the trainer stops them together after a checkpoint."""
        try:
            return self.reward(images, [p.text for p in prompts], [p.metadata for p in prompts])
        except RewardError as error:
            self.failure = self.failure or error
            return RewardResult.failed(len(prompts), error)
