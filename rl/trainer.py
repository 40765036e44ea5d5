"""Flow-GRPO with LoRA on a FLUX transformer: the training loop (docs/design.md section 2).

One GRPO step, per process (each process owns whole prompt groups; nothing is split across processes)::

    prompts -> encode once -> G SDE rollouts per prompt, recording (x_t, x_next, log p_old) per step, in chunks
      of whole groups; each finished chunk VAE-decoded (worker thread) and scored (reward pool) while the next
      denoises -> group advantages -> PPO-clipped loss (+ optional KL to the adapter-disabled reference) over
      the trained steps -> AdamW steps through accelerate -> EMA -> log

Every phase is a method. With a pruning policy the sampling phase is ``rl/pruned_rollout.py``'s: it runs
:meth:`GRPOTrainer.rollout` to step k (with an observer capturing attention), lets the probe pick survivors
(``Rollouts.select``), and finishes and scores only them with :meth:`GRPOTrainer.finish_and_score`. Saving and
resuming (run folder, checkpoints, summary) are ``rl/trainer_persistence.py``'s mixin, the optimizer steps
``rl/trainer_update.py``'s. Everything
device- and process-related goes through one ``accelerate.Accelerator``; metrics are reduced across processes as
sums and counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, set_seed
from diffusers import FluxPipeline
from tqdm.auto import tqdm

from rewards.compose import RewardResult, build_reward_set
from rl.advantages import group_advantages, group_std
from rl.batches import PromptBatch, ScoredRollouts, score_chunks, trained_steps
from rl.checkpoint import (
    register_lora_only_hooks,
)
from rl.config import RunConfig
from rl.cost import flux_equivalent
from rl.data import load_prompt_source, shard
from rl.distributed import (
    build_accelerator,
    configure_deepspeed,
    forwards_behind,
    is_deepspeed,
    is_lost_peer,
    reward_wait_limit,
    shards_parameters,
    whole_model_loading,
)
from rl.evaluation import HeldOutEvaluator
from rl.lora import LoraEMA, add_lora, disable_adapter
from rl.memory import model_state_mib, peak_memory_mib
from rl.metrics_log import MetricsAccumulator, MetricsLogger
from rl.objectives import OBJECTIVES
from rl.paths import repository_hint
from rl.phase_timer import PhaseTimer
from rl.predictors import PredictionCost
from rl.prompt_skip import FlatPromptHistory
from rl.pruned_rollout import PrunedRollout
from rl.run_files import LORA
from rl.run_lock import release_output_dir
from rl.sampler import FluxSampler, Rollouts, StepObserver, encode_prompts, native_size_warning
from rl.sharded_lora import LoraWeights
from rl.stop_signals import StopSignals
from rl.train_state import TrainState, budget_spent
from rl.trainer_persistence import TrainerPersistence
from rl.trainer_update import TrainerUpdate

logger = logging.getLogger(__name__)


def load_pipeline(config: RunConfig, device: torch.device) -> FluxPipeline:
    """The base FluxPipeline (hub id or local folder), frozen, on ``device``; bf16 weights under bf16 precision."""
    dtype = torch.bfloat16 if config.training.mixed_precision == "bf16" else torch.float32
    name = config.model.pretrained
    if hint := repository_hint(name):  # else diffusers tries the hub and says so at length
        raise FileNotFoundError(f"the model folder pretrained={name!r} does not exist{hint}")
    try:
        pipeline = FluxPipeline.from_pretrained(name, revision=config.model.revision, torch_dtype=dtype)
    except (OSError, ValueError) as error:  # diffusers' message names the path but neither the option nor the fix
        raise FileNotFoundError(
            f"cannot load the model pretrained={name!r}: {error} Set --pretrained to a FluxPipeline folder (one "
            "holding model_index.json, e.g. assets/tiny-flux-shapes) or a hub id such as black-forest-labs/FLUX.1-dev "
            "(downloaded, or in the local cache when offline)"
        ) from error
    pipeline.set_progress_bar_config(disable=True)
    for module in (pipeline.transformer, pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2):
        # eval mode throughout, training included: any dropout would make re-scored log-probs differ from the
        # rollout's (ratio != 1 before the first update); LoRA gradients do not need train mode
        module.requires_grad_(False).eval()
    return pipeline.to(device)


class GRPOTrainer(TrainerPersistence, TrainerUpdate):
    """Flow-GRPO trainer. Use as ``trainer.setup(); trainer.train(); trainer.cleanup()``.

    Args:
        config: a validated :class:`rl.config.RunConfig`.
    """

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.state = TrainState()
        self.metrics = MetricsAccumulator()
        # time/<phase>_s; finished chunks' decode and reward are timed beside the phases
        self.timer = PhaseTimer(torch.cuda.synchronize if torch.cuda.is_available() else None)
        self.step_images = 0
        self.padding_forwards = 0  # FSDP / ZeRO-3: throwaway forwards of every process since the last log
        self.base_eval: dict[str, float] = {}
        self.base_eval_setting: list[int] | None = None  # the prompts and seeds per prompt it was computed on
        self.final_eval: dict[str, float] = {}
        self.summary: dict = {}
        self.saved_step = -1  # the step of the newest checkpoint written or resumed from (-1: none)
        self.step_failure: Exception | None = None  # a chunk's failed reward, held to the end of the step
        self.last_eval = math.nan
        self.started = time.time()

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Accelerator, pipeline + LoRA, optimizer, EMA, samplers, prompt sources, reward, logger."""
        cfg = self.config
        s, t = cfg.sampling, cfg.training
        self.num_trained_steps = len(trained_steps(s, t.seed, 0, 1)[0])
        # one optimizer step per `gradient_accumulation_steps` micro-batches, each over all trained steps
        self.accelerator = build_accelerator(
            t.mixed_precision, t.gradient_accumulation_steps * self.num_trained_steps, t.distributed_timeout_s
        )
        # the first process's share is the largest; fewer prompts than processes fail here, now
        most = len(shard(range(s.prompts_per_step), 0, self.accelerator.num_processes)) * cfg.trained_group_size
        if t.gradient_accumulation_steps > most and self.accelerator.is_main_process:  # the config knew no processes
            logger.warning(
                "gradient_accumulation_steps=%d, but a process trains at most %d rollouts a step (%d prompts x %d "
                "trained each, over %d processes): the other micro-batches run forward and backward on no sample",
                t.gradient_accumulation_steps, most, s.prompts_per_step, cfg.trained_group_size,
                self.accelerator.num_processes,
            )  # fmt: skip
        # cheap, likely-to-fail pieces first: a missing prompt file or an unknown reward fails before the model loads
        self.train_prompts = load_prompt_source(s.prompts, s.prompt_category_weights)
        self.prompt_history = (
            FlatPromptHistory(s.prompt_skip_after, s.prompt_skip_explore) if s.prompt_skip_after else None
        )
        self.eval_prompts = load_prompt_source(cfg.eval.eval_prompts)
        r = cfg.reward
        wait = reward_wait_limit(r.reward_timeout_s, t.distributed_timeout_s, self.accelerator.num_processes)
        if wait != r.reward_timeout_s and self.accelerator.is_main_process:
            logger.warning(
                "reward_timeout_s=%g: a reward batch is given at most %g s, half of distributed_timeout_s=%g, so a hung "
                "reward stops every process with a checkpoint before the others time out", r.reward_timeout_s, wait,
                t.distributed_timeout_s,
            )  # fmt: skip
        self.reward_set = build_reward_set(
            r.reward, r.reward_weights, r.reward_kwargs, r.reward_workers, r.reward_failure_policy, timeout_s=wait
        )
        # one thread, so the VAE decodes one chunk at a time and chunks reach the reward pool in order
        self.decode_pool = ThreadPoolExecutor(1, thread_name_prefix="decode") if r.reward_overlap else None
        # the run folder before the model: a used folder or a changed config must fail in seconds, not after loading
        resume_path = self.prepare_output_dir()
        set_seed(t.seed)
        if torch.cuda.is_available():
            # cuDNN's attention backward returns NaN gradients from finite inputs under bf16 (measured on an H200
            # with the tiny model, torch 2.11; pytorch#196678, trl#7181): flash / memory-efficient kernels take over
            torch.backends.cuda.enable_cudnn_sdp(False)
        with whole_model_loading(self.accelerator):
            self.pipeline = load_pipeline(cfg, self.accelerator.device)
        warning = native_size_warning(s.height, s.width, self.pipeline.vae.config.sample_size)
        if warning and self.accelerator.is_main_process:  # blank images and flat rewards otherwise go unexplained
            logger.warning(warning)
        m = cfg.model
        self.lora_params = add_lora(
            self.pipeline.transformer, m.lora_rank, m.lora_alpha, m.lora_target_modules, m.init_lora_weights
        )
        for param in self.lora_params:  # trainable weights stay fp32 under bf16 autocast
            param.data = param.data.float()
        optimizer = torch.optim.AdamW(
            self.lora_params,
            lr=t.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.adam_weight_decay,
            eps=t.adam_epsilon,
        )
        configure_deepspeed(self.accelerator, t.train_batch_size, t.max_grad_norm)
        self.model, self.optimizer = self.accelerator.prepare(self.pipeline.transformer, optimizer)
        register_lora_only_hooks(self.accelerator, self.model)  # checkpoints hold the LoRA, not the frozen base
        # FSDP replaces each parameter by its slice (a DTensor): the LoRA is read again from the prepared model
        named = [(n, p) for n, p in self.accelerator.unwrap_model(self.model).named_parameters() if p.requires_grad]
        self.lora_params = [p for _, p in named]
        # read and written whole, also sharded; under DeepSpeed in bf16/fp16, read from its fp32 values
        masters = is_deepspeed(self.accelerator) and t.mixed_precision != "no"
        self.lora = LoraWeights(self.lora_params, [n for n, _ in named], deepspeed_masters=masters)
        self.ema = LoraEMA(self.lora, t.ema_decay) if t.ema_decay > 0 else None
        size = dict(guidance_scale=s.guidance_scale, height=s.height, width=s.width, batch_size=s.sample_batch_size)
        self.sampler = FluxSampler(
            self.pipeline, s.num_steps, s.noise_level, **size, sde_steps=s.train_window if s.sde_window_only else None
        )
        eval_sampler = FluxSampler(self.pipeline, cfg.eval.eval_num_steps or s.num_steps, 0.0, **size)
        self.evaluator = HeldOutEvaluator(
            self.accelerator,
            self.pipeline,
            eval_sampler,
            self.eval_prompts,
            self.reward_set,
            cfg.eval,
            m.max_sequence_length,
            self.show_bar,
            self.even_forwards,
        )
        self.pruner = PrunedRollout.from_config(cfg, self.sampler, self.accelerator)  # None: unpruned
        self.objective = OBJECTIVES[cfg.training.policy_objective](self)  # rl/objectives/
        self.log = MetricsLogger(
            self.output_dir,
            self.accelerator.is_main_process,
            cfg.logging.wandb_mode,
            cfg.logging.wandb_project,
            cfg.logging.run_name,
            cfg.flat(),
        )
        self.resume(resume_path)
        self.info(
            "GRPO: %d prompts (whole groups, %d on this process) x %d rollouts per step over %d processes, "
            "%d trained steps of %d, %d LoRA parameters",
            s.prompts_per_step,
            len(shard(range(s.prompts_per_step), self.accelerator.process_index, self.accelerator.num_processes)),
            s.group_size,
            self.accelerator.num_processes,
            self.num_trained_steps,
            s.num_steps,
            sum(p.numel() for p in self.lora_params),
        )

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, float]:
        """Run GRPO steps until ``max_steps`` or the time budget; evaluate and save. Returns the final eval."""
        cfg = self.config
        done = self.finished_without_checkpoint is not None or self.state.step > 0 and self.finished
        if done and self.load_finished_summary(self.finished_without_checkpoint):
            return self.final_eval  # a relaunch of a finished run: nothing to redo
        if cfg.eval.eval_before_training and self.state.step == 0:  # the same prompts and seeds as the final eval
            self.evaluate_base()
        elif self.base_eval and self.base_eval_setting not in (None, self.final_eval_setting):
            self.info("the final evaluation's prompts or seeds changed on resume: evaluating the base model again")
            self.evaluate_base()  # else the summary's delta would compare two different evaluations
        bar = tqdm(total=cfg.training.max_steps, initial=self.state.step, desc="GRPO", disable=not self.show_bar)
        self.last_save = time.time()
        with StopSignals() as signals:
            while not self.finished:
                step_start = dataclasses.replace(self.state), self.metrics.state()  # what a failed step keeps
                batch = self.next_prompts()  # whole groups for this process, encoded once
                failure = self.step_failure = None
                try:
                    with self.reward_set.step():  # one retry budget for the step's batches; a step lost counts once
                        if self.pruner is None:
                            # SDE sampling with log-probs, chunk by chunk; each chunk's decode + reward beside the next
                            scored = self.finish_and_score(batch, self.start(batch))
                        else:  # to step k with capture, probe, prune, continue and score survivors only (+ refresh)
                            scored, advantages = self.pruner.sample_and_score(self, batch)
                except Exception as error:  # a reward that stops the run: nothing of this step is applied yet
                    if is_lost_peer(error):  # another process is gone: no agreement to wait for
                        raise
                    failure = error
                # a failed reward (a chunk's, or a predictor's preview) is held until the step's collectives are
                # through, so every process gets here and they agree before anything of the step is applied
                self.stop_if_the_step_failed(self.step_failure or failure, step_start)
                if self.pruner is None:
                    advantages = self.advantages(scored)  # per prompt group
                else:
                    self.pruner.commit(self)  # the survivors join the probe's buffer (and refresh it when due)
                if self.prompt_history is not None:  # which of the step's groups were flat (a collective call)
                    flat_share = self.prompt_history.record_step(self.accelerator, batch.step_texts, scored)
                    self.metrics.add("prompts/flat_groups", flat_share, 1)
                self.optimise(batch, scored, advantages)  # PPO-clipped loss over the trained steps
                self.state.step += 1
                self.log_step(bar)
                self.stop_if_diverged()
                if cfg.eval.eval_every and self.state.step % cfg.eval.eval_every == 0 and not self.finished:
                    self.log_eval(self.evaluate())
                stop = self.signalled(signals)
                if stop or self.checkpoint_due():
                    self.save_checkpoint()
                    stop = stop or self.signalled(signals)  # one during the save stops now: it holds this step
                if stop:
                    bar.close()
                    raise SystemExit(
                        f"stopped by {signals.name} after step {self.state.step}: checkpoint written to "
                        f"{self.output_dir / 'checkpoints'}; continue with {self.relaunch}"
                    )
        flushed = self.metrics.pending  # log_every's last few steps
        if flushed:
            self.write_step_metrics(bar)
        bar.close()
        c = cfg.checkpoint
        if (c.save_every or c.save_every_minutes) and (flushed or self.saved_step != self.state.step):
            self.save_checkpoint()  # the trained end: a relaunch, or a signal during the final eval, resumes here
        self.final_eval = self.evaluate(final=True)
        self.log_eval(self.final_eval, prefix="final_eval")
        if cfg.checkpoint.save_lora:
            self.save(self.output_dir / LORA)
        self.write_summary()  # last: it marks the run finished, so a relaunch after a crash before it redoes the rest
        return self.final_eval

    def signalled(self, signals: StopSignals) -> bool:
        """Whether any process received a stop signal (a collective call: every process stops together)."""
        return self.global_count(int(signals.received is not None)) > 0

    def evaluate_base(self) -> None:
        """The base model's held-out score on the final evaluation's prompts and seeds (the summary's baseline)."""
        self.base_eval = self.evaluate(final=True, base=True)
        self.base_eval_setting = self.final_eval_setting
        self.log_eval(self.base_eval, prefix="base_eval")

    @property
    def final_eval_setting(self) -> list[int]:
        """The base and final evaluations' prompt count and seeds per prompt."""
        e = self.config.eval
        return [len(self.eval_prompts.eval_subset(e.final_eval_num_prompts)), e.final_images_per_prompt]

    def cleanup(self, peers_alive: bool = True) -> None:
        """Release the decode and reward threads and the logger; end accelerate's trackers. ``peers_alive``
        False (another process died or hung): no last barrier, which would fail or wait out the timeout again."""
        if self.decode_pool is not None:
            self.decode_pool.shutdown(wait=True)
        self.reward_set.close()
        self.log.close()
        release_output_dir(self.output_dir)
        # a process that tears its process group down while another still talks to it aborts ("terminate called
        # without an active exception": the first two-process DDP run of bench/memory_per_rank.py did at exit)
        if peers_alive:
            self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

    # ------------------------------------------------------------------ phases

    def next_prompts(self) -> PromptBatch:
        """This process's share (whole groups) of the step's prompts, their embeddings and rollout seeds."""
        cfg, acc = self.config, self.accelerator
        group_size = cfg.started_group_size  # group_size, times prune_expand when pruning expands the group
        if cfg.sampling.train_window_shift_every:  # MixGRPO's sliding window
            window = cfg.sampling.window_at(self.state.step)
            self.metrics.add("train/window_start", float(window.start), 1)
            if cfg.sampling.sde_window_only:  # the SDE noise slides with the trained steps
                self.sampler.sde_steps = frozenset(window)
        with self.phase("prompts"):
            n_global = cfg.sampling.prompts_per_step  # split unevenly when it must be: see rl/data.py shard
            if self.prompt_history is None:
                prompts = self.train_prompts.batch(self.state.step, n_global, cfg.training.seed)
            else:  # GRESO: prompts whose latest groups were flat give their slot to further draws
                prompts, skipped = self.prompt_history.draw(self.train_prompts, self.state.step, n_global,
                                                            cfg.training.seed)  # fmt: skip
                self.metrics.add("prompts/skipped", float(skipped), 1)  # the same on every process
            seeds = np.random.default_rng([cfg.training.seed, self.state.step, 1]).integers(2**62, size=(n_global, 1))
            seeds = seeds + np.arange(group_size)  # distinct per rollout, reproducible from (seed, step)
            mine = shard(list(range(n_global)), acc.process_index, acc.num_processes)
            texts = [prompts[i].text for i in mine]
            embeds = encode_prompts(self.pipeline, texts, cfg.model.max_sequence_length).to(acc.device)
            initial = torch.from_numpy(seeds[mine, :1]).repeat_interleave(group_size, 0).flatten()
        return PromptBatch(
            prompts=[prompts[i] for i in mine],
            embeds=embeds,
            prompt_index=torch.arange(len(mine)).repeat_interleave(group_size),
            group_ids=torch.tensor(mine),
            seeds=torch.from_numpy(seeds[mine]).flatten(),
            initial_seeds=initial if cfg.sampling.same_initial_noise else None,
            step_texts=[prompt.text for prompt in prompts],
        )

    def start(self, batch: PromptBatch) -> Rollouts:
        """Every rollout of ``batch`` at step 0 (its initial noise)."""
        return self.sampler.start(batch.prompt_index, batch.seeds, self.accelerator.device, batch.initial_seeds)

    def rollout(
        self, batch: PromptBatch, until_step: int | None = None, observer: StepObserver | None = None
    ) -> Rollouts:
        """Start every rollout of ``batch`` and sample it with the SDE sampler up to ``until_step`` (default: T)."""
        return self.continue_rollouts(batch, self.start(batch), until_step, observer)

    def continue_rollouts(
        self,
        batch: PromptBatch,
        rollouts: Rollouts,
        until_step: int | None = None,
        observer: StepObserver | None = None,
    ) -> Rollouts:
        """Continue ``rollouts`` of ``batch`` (all, or any subset such as pruning's survivors) to ``until_step``.

        A rollout's noise comes from its own seed, so a continued subset follows exactly the trajectories it
        would have followed had every rollout been continued.
        """
        until = self.sampler.num_steps if until_step is None else until_step
        with (
            self.even_forwards(self.sampler.calls(len(rollouts), until - rollouts.step)),
            self.sampling_bar(rollouts, until) as bar,
            self.phase("sample"),
            self.accelerator.autocast(),
        ):
            return self.sampler.advance(rollouts, batch.embeds, until, observer, progress=bar.update)

    @contextlib.contextmanager
    def even_forwards(self, forwards: int) -> Iterator[None]:
        """A phase of ``forwards`` transformer calls of this process. Under FSDP and ZeRO-3, where every forward is
        a collective, the processes agree on the most any of them makes before it starts (their shares of groups
        and pruning's survivors can differ: ``rl.distributed.forwards_behind``), and one planning fewer runs
        throwaway forwards after its own (their outputs dropped: the run trains as under DDP)."""
        behind, everyone = forwards_behind(self.accelerator, forwards)
        yield
        if behind:
            with self.phase("padding"):
                for _ in range(behind):
                    self.idle_forward()
        self.padding_forwards += everyone

    def idle_forward(self) -> None:
        """One throwaway transformer call under the sampler's autocast."""
        with self.accelerator.autocast():
            self.sampler.idle_forward(self.config.model.max_sequence_length, self.accelerator.device)

    def sampling_bar(self, rollouts: Rollouts, until: int) -> tqdm:
        """Count the transformer calls taking ``rollouts`` to step ``until`` (a collective) and show their progress."""
        total = len(rollouts) * (until - rollouts.step)
        calls = self.global_count(total)
        self.state.images_denoised += calls / self.sampler.num_steps
        self.state.transformer_calls += calls
        return tqdm(total=total, desc="sample", leave=False, disable=not self.show_bar)

    def finish_and_score(
        self, batch: PromptBatch, rollouts: Rollouts, result: RewardResult | None = None
    ) -> ScoredRollouts:
        """Denoise ``rollouts`` (all at one step) to T, decode and score them, chunk by chunk.

        The chunks are whole prompt groups (:func:`score_chunks`: each ends where the rows so far fill whole
        sampler batches, so every transformer and VAE call sees the rows it would see unchunked). With
        ``reward_overlap`` a finished chunk is decoded on a worker thread and scored in the reward pool while the
        transformer denoises the next chunk; without it, each chunk is decoded and scored before the next is
        denoised. The calls are the same either way, so the results are bit-identical; the scores come back in
        chunk order.

        Args:
            batch: the step's prompts (``rollouts.prompt_index`` points into them).
            rollouts: the rollouts to finish, each group's rows contiguous (the unpruned step, or the survivors).
            result: their reward, when a predictor already finished and scored them (the ``reward`` oracle).
        """
        if result is not None:
            return self.score(batch, rollouts, result)
        until = self.sampler.num_steps
        finished: list[Rollouts] = []
        pending: list[Future[Future[RewardResult]]] = []
        results: list[RewardResult] = []
        chunks = score_chunks(rollouts.prompt_index, self.sampler.batch_size)
        forwards = sum(self.sampler.calls(len(rows), until - rollouts.step) for rows in chunks)
        with self.even_forwards(forwards), self.sampling_bar(rollouts, until) as bar:
            for rows in chunks:
                with self.phase("sample"), self.accelerator.autocast():
                    done = self.sampler.advance(rollouts.select(rows), batch.embeds, until, progress=bar.update)
                finished.append(done)
                if self.decode_pool is None:
                    with self.phase("score_wait"):
                        results.append(self.held_result(self.decode_and_submit(batch, done), len(done)))
                else:
                    pending.append(self.decode_pool.submit(self.decode_and_submit, batch, done))
        self.count_judged(sum(map(len, finished)))
        with self.phase("score_wait"):  # what of the decoding and scoring sampling did not hide
            results += [self.held_result(future.result(), len(done)) for future, done in zip(pending, finished)]
        result = RewardResult.concatenate(results)
        self.timer.add_beside("reward", result.seconds)
        return self.score(batch, Rollouts.concatenate(finished), result)

    def held_result(self, future: Future[RewardResult], rollouts: int) -> RewardResult:
        """A chunk's or a preview's reward; a reward that failed the run is held in ``step_failure`` (the first) and
        the rollouts come back all invalid, so this process makes the step's remaining collectives with the others
        and they can agree to stop together (:meth:`stop_if_the_step_failed`)."""
        try:
            return self.reward_set.wait(future)  # at most reward_timeout_s: a hung reward fails the step
        except Exception as error:
            self.step_failure = self.step_failure or error
            return RewardResult.failed(rollouts, error)

    def decode_and_submit(self, batch: PromptBatch, rollouts: Rollouts) -> Future[RewardResult]:
        """Decode finished ``rollouts`` and hand the images to the reward pool (the decode worker runs this).

        Thread-safe for the one worker: no collective, no shared RNG (the VAE decodes deterministically), its
        own autocast and CUDA device (both are per thread); its seconds are timed beside the phases.
        """
        started = time.perf_counter()
        device = self.accelerator.device
        try:
            with (
                torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext(),
                self.accelerator.autocast(),
            ):
                images = self.sampler.decode(rollouts.latents)
        except Exception as error:  # a failed decode (the VAE out of memory) fails the step as a failed reward
            failed: Future[RewardResult] = Future()  # does: held until the step's collectives are through
            failed.set_exception(error)
            return failed
        self.timer.add_beside("decode", time.perf_counter() - started)
        return self.submit_images(batch, rollouts.prompt_index, images)

    def count_judged(self, rollouts: int) -> None:
        """Count ``rollouts`` decodes and reward calls over every process (a collective)."""
        count = self.global_count(rollouts)
        self.state.decodes += count
        self.state.reward_calls += count

    def judge(self, batch: PromptBatch, prompt_index: torch.Tensor, latents: torch.Tensor) -> RewardResult:
        """Decode packed ``latents`` of rollouts of prompts ``prompt_index`` and score them with the reward.

        Predictors' previews (rl/predictors/) and :meth:`score` without a result come through here; chunked
        finished rollouts go through :meth:`finish_and_score`. Every path counts its decodes and reward calls.
        """
        self.count_judged(len(latents))
        with self.phase("decode"), self.accelerator.autocast():
            images = self.sampler.decode(latents)
        with self.phase("reward"):
            return self.held_result(self.submit_images(batch, prompt_index, images), len(latents))

    def submit_images(
        self, batch: PromptBatch, prompt_index: torch.Tensor, images: torch.Tensor
    ) -> Future[RewardResult]:
        """Hand decoded ``images`` of rollouts of prompts ``prompt_index`` to the reward pool, with their texts,
        metadata and groups."""
        prompts = [batch.prompts[i] for i in prompt_index.tolist()]
        group_ids = batch.group_ids[prompt_index.cpu()]
        return self.reward_set.submit(images, [p.text for p in prompts], [p.metadata for p in prompts], group_ids)

    def score(self, batch: PromptBatch, rollouts: Rollouts, result: RewardResult | None = None) -> ScoredRollouts:
        """Decode finished rollouts and score them (reward thread pool); log every reward component.

        ``result``: their reward, when it is known already (:meth:`finish_and_score`'s, or the ``reward``
        oracle's): not scored twice. Without it the rollouts are decoded and scored in one piece.
        """
        group_ids = batch.group_ids[rollouts.prompt_index.cpu()]
        self.step_images += len(rollouts)
        self.state.images_seen += self.global_count(len(rollouts))
        if result is None:
            result = self.judge(batch, rollouts.prompt_index, rollouts.latents)
        valid = result.valid.bool()
        if not torch.isfinite(result.total[valid]).all():
            raise ValueError("the reward returned non-finite totals for rollouts it marked valid")
        # one global total per step: every process adds the same reduced count once
        self.metrics.add("reward/dropped", float(self.global_count(int((~valid).sum()))), 1)
        self.metrics.add_values("reward/total", result.total[valid])
        if valid.any():  # the contrast GRPO learns from (pruning's survivor selection aims to raise it)
            spread = group_std(result.total[valid].cpu(), group_ids[valid.cpu()])
            self.metrics.add("reward/group_std", float(spread.mean()), float(len(spread)))
        for key, values in result.components.items():
            self.metrics.add_values(f"reward/{key}", values[valid])
        return ScoredRollouts(rollouts, group_ids, result.total, result.components, valid)

    def advantages(self, scored: ScoredRollouts) -> torch.Tensor:
        """``[B]`` group-normalised advantages of valid rollouts (0 for invalid ones)."""
        t = self.config.training
        valid = scored.valid
        rewards = scored.rewards[valid].double()
        batch_std = None
        if t.adv_std == "batch":  # the std over every process's rewards, from sums and counts
            totals = torch.tensor([rewards.sum(), (rewards**2).sum(), len(rewards)], dtype=torch.float64)
            total, square, count = self.accelerator.reduce(totals.to(self.accelerator.device), "sum").tolist()
            batch_std = math.sqrt(max(square / max(count, 1) - (total / max(count, 1)) ** 2, 0.0))
        advantages = torch.zeros(len(valid))
        advantages[valid] = group_advantages(
            rewards, scored.group_ids[valid], t.adv_std, t.adv_clip_max, batch_std=batch_std
        )
        self.metrics.add("adv/abs_mean", advantages[valid].abs().mean() if valid.any() else 0.0, float(valid.sum()))
        zero = (advantages[valid] == 0).float().mean() if valid.any() else 0.0
        self.metrics.add("adv/zero_frac", zero, float(valid.sum()))  # weighted by rollouts: processes differ
        return advantages

    def reference_weights(self):
        """Context in which the model is the base (LoRA adapter off): the KL reference and the base evaluation."""
        return disable_adapter(self.accelerator.unwrap_model(self.model))

    # ------------------------------------------------------------------ evaluation and saving

    def evaluate(self, final: bool = False, base: bool = False) -> dict[str, float]:
        """Held-out mean rewards (rl/evaluation.py) of the EMA weights (the current ones without EMA), or of the
        base model (LoRA disabled) with ``base``; ``final``: the base and final evaluations' prompts and seeds."""
        if base:
            weights = self.reference_weights()
        else:
            weights = self.ema.average_parameters() if self.ema is not None else contextlib.nullcontext()
        key = "images/" + ("base_eval" if base else "final_eval" if final else "eval")

        def log_images(images: torch.Tensor, captions: list[str], columns: int) -> None:
            self.log.log_images(key, images, captions, self.state.step, columns=columns)

        with self.phase("eval"), weights:
            metrics = self.evaluator(final, log_images)
        evaluation = "the base evaluation" if base else "the final evaluation" if final else "an evaluation"
        # a reward that failed it: checkpoint, stop together
        self.stop_if_the_step_failed(self.evaluator.failure, what=f"{evaluation} after step {self.state.step}")
        return metrics

    # ------------------------------------------------------------------ helpers

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        """Time a phase of the main thread as ``time/<name>_s`` (exclusive of phases inside it: rl/phase_timer.py)."""
        return self.timer.phase(name)

    @property
    def step(self) -> int:
        """The GRPO step being run (0-based)."""
        return self.state.step

    def add_prediction_cost(self, cost: PredictionCost) -> None:
        """Count a predictor's extra transformer calls (its decodes and reward calls went through :meth:`judge`)."""
        self.state.transformer_calls += self.global_count(int(cost.transformer_calls))

    def global_count(self, count: int) -> int:
        """``count`` summed over every process (a collective call: every process must make it)."""
        if self.accelerator.num_processes == 1:
            return count
        return int(self.accelerator.reduce(torch.tensor([count], device=self.accelerator.device), "sum").item())

    @property
    def finished(self) -> bool:
        return budget_spent(self.config, self.state) or self.out_of_time()

    @property
    def show_bar(self) -> bool:
        return self.config.logging.progress_bar and self.accelerator.is_local_main_process

    def out_of_time(self) -> bool:
        """Whether the wall-clock budget is spent (the main process decides, so all processes stop together)."""
        budget = self.config.training.max_minutes
        flag = [budget > 0 and time.time() - self.started > 60 * budget]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(flag)
        return bool(flag[0])

    def log_step(self, bar: tqdm) -> None:
        """Reduce this step's metrics across processes and write them every ``log_every`` steps."""
        # a checkpoint written after the previous step is logged here, but is no part of this step's time
        step_time, times = self.timer.take(excluded=("checkpoint",))
        for name, seconds in times.items():
            self.metrics.add(f"time/{name}_s", seconds)
        self.metrics.add("time/step_s", step_time)
        self.metrics.add("perf/images_per_s", self.step_images / max(step_time, 1e-9))
        self.step_images = 0
        memory = {
            **model_state_mib(self.model, self.optimizer),
            "memory/peak_mib": peak_memory_mib(self.accelerator.device),
        }
        for key, mib in memory.items():  # the largest process's
            self.metrics.add_max(key, mib)
        if shards_parameters(self.accelerator):  # a global count: every process adds the same total once
            self.metrics.add("sample/padding_forwards", self.padding_forwards)
            self.padding_forwards = 0
        bar.update(1)
        if self.state.step % self.config.logging.log_every == 0:
            self.write_step_metrics(bar)

    def write_step_metrics(self, bar: tqdm) -> None:
        """Reduce the steps' metrics since the last write across processes and write them as one record."""
        metrics = self.metrics.reduce(self.accelerator)
        metrics["perf/images_per_s"] *= self.accelerator.num_processes
        self.metrics = MetricsAccumulator()
        metrics.update(
            {
                "train/step": self.state.step,
                "train/images_seen": self.state.images_seen,
                "train/images_denoised": self.state.images_denoised,
                **{f"compute/{k}": v for k, v in dataclasses.asdict(self.state.compute).items()},
                "compute/flux_equivalent": flux_equivalent(self.state.compute),
                "train/optimizer_steps": self.state.optimizer_steps,
                "train/lr": self.optimizer.param_groups[0]["lr"],
            }
        )
        self.log.log(metrics, self.state.step)
        bar.set_postfix(reward=f"{metrics.get('reward/total/mean', math.nan):.3f}", eval=f"{self.last_eval:.3f}")

    def log_eval(self, metrics: dict[str, float], prefix: str = "eval") -> None:
        """Write evaluation metrics as ``<prefix>/<key>`` (e.g. ``eval/shapes/score/mean``)."""
        record = {f"{prefix}/{key}": value for key, value in metrics.items()}
        record[f"time/{prefix}_s"] = self.timer.pop("eval")
        self.last_eval = metrics.get("total/mean", math.nan)
        self.log.log(record, self.state.step)
        self.info("%s at step %d: total %.4f", prefix, self.state.step, metrics.get("total/mean", math.nan))

    def info(self, message: str, *args) -> None:
        """Log once (main process), not once per process."""
        if self.accelerator.is_main_process:
            logger.info(message, *args)
