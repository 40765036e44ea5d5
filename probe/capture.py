"""Early-step image-to-text attention capture for FLUX transformers.

FLUX runs joint attention over ``[text | image]`` tokens in both block types: double-stream blocks project
the two streams separately and concatenate them inside the attention processor; single-stream blocks
concatenate them *before* the processor and pass no ``encoder_hidden_states``, so the processor must be
told the text length. :class:`CaptureAttnProcessor` wraps a block's own processor: the block's output is
exactly what that processor returns (same object, not a re-implementation), and beside it the processor
recomputes the queries of the image tokens and the keys of all tokens to record

    A[b, i, t] = mean over heads of softmax_k(q_i . k_k / sqrt(d))[t],   i image token, t text token,

i.e. the attention probability of image query i on text key t, normalised over ALL joint keys (so a row of
A sums to the share of attention the image token gives to text, not to 1). Only ``[B, image, text]`` per
block is kept; scores are computed one chunk of heads and queries at a time, so the full joint attention
matrix of a block (let alone of all blocks) never exists at once.

The processors are installed only for the forward pass that captures (:func:`capture_attention`) and the
original processors are put back afterwards, so other steps run the untouched model and compute nothing
extra. :class:`ProbeRecorder` is the :class:`rl.sampler.StepObserver` that does this at one denoising step
and also keeps that step's x0 prediction (``x0 = x - sigma * v``, free)::

    recorder = ProbeRecorder(pipeline.transformer, capture_step=2, blocks=None, text_length=16, grid=(16, 16))
    early = sampler.advance(sampler.start(prompt_index, seeds), embeds, until_step=2, observer=recorder)
    capture = recorder.result()   # ProbeCapture: attention [B, n_blocks, 256, 16], x0 [B, 256, 64]

Steps are counted as in "capture at step k of T": the k-th transformer call, whose 0-based index in the
sampler's loop is ``k - 1`` (so ``advance(..., until_step=k)`` is the shortest run that captures at step k).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Sequence

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

_ATTENTION_NAME = re.compile(r"(?:^|\.)(single_transformer_blocks|transformer_blocks)\.(\d+)\.attn$")
# Largest fp32 score chunk [B, heads, queries, keys] materialised at once (2**24 elements = 64 MiB).
DEFAULT_CHUNK_ELEMENTS = 2**24


def attention_modules(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The FLUX attention modules in execution order: double-stream blocks, then single-stream blocks.

    Global block index ``j`` in this list is what ``blocks`` arguments refer to. Works through wrappers that
    prefix module names (DDP's ``module.``, peft's ``base_model.model.``, ``torch.compile``'s ``_orig_mod.``).

    Raises:
        ValueError: if the model has no FLUX attention blocks.
    """
    double: dict[int, torch.nn.Module] = {}
    single: dict[int, torch.nn.Module] = {}
    for name, module in transformer.named_modules():
        match = _ATTENTION_NAME.search(name)
        if match:
            (single if match.group(1).startswith("single") else double)[int(match.group(2))] = module
    if not double and not single:
        raise ValueError(f"{type(transformer).__name__} has no FLUX attention blocks (transformer_blocks.N.attn)")
    return [double[i] for i in sorted(double)] + [single[i] for i in sorted(single)]


def default_blocks(transformer: torch.nn.Module, count: int = 10) -> tuple[int, ...]:
    """``count`` global block indices evenly spread over the middle of the network (all blocks if fewer).

    The Diffusion Probe paper reads ~10 middle blocks of FLUX.1-dev's 57; on small models every block is used.
    """
    total = len(attention_modules(transformer))
    if total <= count:
        return tuple(range(total))
    # The middle 60% of the network, sampled evenly (both ends excluded: the first blocks still carry little
    # text-image binding and the last ones mostly refine the image stream).
    low, high = 0.2 * (total - 1), 0.8 * (total - 1)
    return tuple(sorted({round(low + (high - low) * i / (count - 1)) for i in range(count)}))


def _image_queries_and_keys(
    attn: torch.nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
    text_length: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-token queries ``[B, S_img, H, D]`` and joint keys ``[B, S_txt + S_img, H, D]``, as the processor forms them.

    Mirrors ``FluxAttnProcessor``: projections (fused or not), per-head RMS norms, ``[text | image]`` order,
    rotary embedding on both. Text queries are never formed (nobody reads them).
    """
    joint = encoder_hidden_states is None  # single-stream: hidden_states is already [text | image]
    image_states = hidden_states[:, text_length:] if joint else hidden_states
    if attn.fused_projections:
        query, _, _ = attn.to_qkv(image_states).chunk(3, dim=-1)
        _, key, _ = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query = attn.to_q(image_states)
        key = attn.to_k(hidden_states)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    if not joint:
        if attn.fused_projections:
            _, text_key, _ = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            text_key = attn.add_k_proj(encoder_hidden_states)
        text_key = attn.norm_added_k(text_key.unflatten(-1, (-1, attn.head_dim)))
        key = torch.cat([text_key, key], dim=1)
    if image_rotary_emb is not None:
        cos, sin = image_rotary_emb
        query = apply_rotary_emb(query, (cos[text_length:], sin[text_length:]), sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query, key


def image_to_text_attention(
    query: torch.Tensor, key: torch.Tensor, text_length: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> torch.Tensor:
    """Head-averaged attention probabilities of image queries on text keys, softmax over all keys.

    Args:
        query: ``[B, S_img, H, D]`` image-token queries (after norm and rotary embedding).
        key: ``[B, S_txt + S_img, H, D]`` joint keys, text first.
        text_length: ``S_txt``.
        chunk_elements: most fp32 scores held at once; heads and queries are processed in chunks below it.

    Returns:
        ``[B, S_img, S_txt]`` fp32; each row sums to the image token's total attention on text (<= 1).
    """
    batch, num_queries, heads, dim = query.shape
    num_keys = key.shape[1]
    scale = 1.0 / math.sqrt(dim)  # SDPA's default, which the FLUX processor uses (it passes scale=None)
    per_head_query = batch * num_keys
    head_chunk = max(1, min(heads, chunk_elements // max(1, per_head_query * num_queries)))
    query_chunk = max(1, min(num_queries, chunk_elements // max(1, per_head_query * head_chunk)))
    # Under bf16 autocast the matmul below still runs in bf16 (logits ~5% off, up to 28% in a softmax's tail): the
    # shipped probes were collected and are read that way, so it stays; the output accumulates in fp32.
    query, key = query.float(), key.float()
    out = torch.zeros(batch, num_queries, text_length, dtype=torch.float32, device=query.device)
    for h0 in range(0, heads, head_chunk):
        k = key[:, :, h0 : h0 + head_chunk].permute(0, 2, 3, 1)  # [B, h, D, S_all]
        for q0 in range(0, num_queries, query_chunk):
            q = query[:, q0 : q0 + query_chunk, h0 : h0 + head_chunk].transpose(1, 2)  # [B, h, q, D]
            scores = torch.matmul(q, k).mul_(scale)  # [B, h, q, S_all]
            log_norm = torch.logsumexp(scores, dim=-1, keepdim=True)
            out[:, q0 : q0 + query_chunk] += (scores[..., :text_length] - log_norm).exp_().sum(dim=1)
    return out.div_(heads)


class CaptureAttnProcessor:
    """Wraps a block's FLUX attention processor: same signature, same output, plus the image-to-text map.

    Args:
        inner: the block's own processor (a ``FluxAttnProcessor``); it computes the block's output unchanged.
        block: the global block index passed to ``sink``.
        text_length: number of text tokens at the front of the joint sequence (needed by single-stream blocks).
        sink: called as ``sink(block, maps)`` with ``maps`` ``[B, S_img, S_txt]`` fp32 (detached).
        chunk_elements: see :func:`image_to_text_attention`.
    """

    def __init__(
        self,
        inner: FluxAttnProcessor,
        block: int,
        text_length: int,
        sink: Callable[[int, torch.Tensor], None],
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        self.inner = inner
        self.block = block
        self.text_length = text_length
        self.sink = sink
        self.chunk_elements = chunk_elements

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        output = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise NotImplementedError("attention capture does not support attention masks (FLUX passes none)")
        if encoder_hidden_states is not None and encoder_hidden_states.shape[1] != self.text_length:
            raise ValueError(
                f"block {self.block} got {encoder_hidden_states.shape[1]} text tokens, but the capture was set up "
                f"with text_length={self.text_length} (the sampler's max_sequence_length)"
            )
        with torch.no_grad():
            query, key = _image_queries_and_keys(
                attn, hidden_states, encoder_hidden_states, image_rotary_emb, self.text_length
            )
            self.sink(self.block, image_to_text_attention(query, key, self.text_length, self.chunk_elements))
        return output


@contextlib.contextmanager
def capture_attention(
    transformer: torch.nn.Module,
    blocks: Sequence[int],
    text_length: int,
    sink: Callable[[int, torch.Tensor], None],
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Iterator[None]:
    """Install :class:`CaptureAttnProcessor` on ``blocks`` for the duration of the block; restore on exit.

    Args:
        transformer: a FLUX transformer (possibly wrapped, see :func:`attention_modules`).
        blocks: global block indices (double-stream first, then single-stream).
        text_length: text tokens in the joint sequence.
        sink: receives ``(block, maps [B, S_img, S_txt])`` once per captured block per forward pass.

    Raises:
        IndexError: for a block index outside the model.
        TypeError: if a block's processor is not a ``FluxAttnProcessor`` (e.g. an IP-adapter processor).
    """
    modules = attention_modules(transformer)
    originals = []
    try:
        for block in blocks:
            if not 0 <= block < len(modules):
                raise IndexError(f"block {block} does not exist: the model has {len(modules)} attention blocks")
            module = modules[block]
            if not isinstance(module.processor, FluxAttnProcessor):
                raise TypeError(
                    f"block {block} runs {type(module.processor).__name__}; capture wraps FluxAttnProcessor"
                )
            originals.append((module, module.processor))
            module.processor = CaptureAttnProcessor(module.processor, block, text_length, sink, chunk_elements)
        yield
    finally:
        for module, processor in reversed(originals):
            module.processor = processor


@dataclasses.dataclass
class ProbeCapture:
    """What a :class:`ProbeRecorder` saw at its capture step, for B rollouts.

    Attributes:
        attention: ``[B, n_blocks, S_img, L]`` head-averaged image-query -> text-key probabilities (softmax
            over all joint keys) of ``blocks``, text columns ``0..L-1`` (the leading ``L`` text tokens).
        x0: ``[B, S_img, C]`` the packed x0 prediction ``x - sigma * v`` (None if not recorded).
        latents: ``[B, S_img, C]`` the packed latents after step k, i.e. the captured call's SDE step output
            (its fresh noise included); attached by ``ProbeRecorder.result(rollouts)``, else None.
        sigma: the sigma of the captured transformer call.
        capture_step: k of "capture at step k of T" (1-based).
        blocks: global block indices of ``attention``'s second axis.
        grid: ``(h, w)`` image-token grid; token ``i`` sits at row ``i // w``, column ``i % w``.
    """

    attention: torch.Tensor
    x0: torch.Tensor | None
    sigma: float
    capture_step: int
    blocks: tuple[int, ...]
    grid: tuple[int, int]
    latents: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.attention.shape[0]


class ProbeRecorder:
    """A :class:`rl.sampler.StepObserver` capturing attention maps and x0 at one denoising step.

    Args:
        transformer: the sampler's transformer.
        capture_step: k >= 1; captures during the k-th transformer call (loop index ``k - 1``).
        blocks: global block indices; None uses :func:`default_blocks`.
        text_length: text tokens per prompt (the sampler's ``max_sequence_length``).
        grid: ``(h, w)`` image-token grid (``sampler.latent_height // 2, sampler.latent_width // 2``).
        keep_text_tokens: store only the first this many text columns (T5 puts real tokens first and
            padding last, so the longest prompt's token count loses nothing); None keeps all.
        record_x0: also keep the x0 prediction of the captured call.
        dtype: storage dtype of the maps (fp32; fp16 halves memory).

    Rows are the row indices the sampler passes (positions in the ``Rollouts`` given to ``advance``); a recorder
    serves one ``advance`` call over B rollouts at a time: :meth:`result` then :meth:`reset` (or a new recorder).
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        capture_step: int,
        blocks: Sequence[int] | None,
        text_length: int,
        grid: tuple[int, int],
        keep_text_tokens: int | None = None,
        record_x0: bool = True,
        dtype: torch.dtype = torch.float32,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        if capture_step < 1:
            raise ValueError(f"capture_step counts transformer calls from 1, got {capture_step}")
        self.transformer = transformer
        self.capture_step = capture_step
        self.blocks = tuple(default_blocks(transformer) if blocks is None else blocks)
        self.text_length = text_length
        self.grid = tuple(grid)
        self.keep_text_tokens = text_length if keep_text_tokens is None else min(keep_text_tokens, text_length)
        self.record_x0 = record_x0
        self.dtype = dtype
        self.chunk_elements = chunk_elements
        self.reset()

    @classmethod
    def for_sampler(cls, sampler, capture_step: int, blocks: Sequence[int] | None, text_length: int, **kwargs):
        """A recorder matching an :class:`rl.sampler.FluxSampler`'s transformer and token grid."""
        grid = (sampler.latent_height // 2, sampler.latent_width // 2)
        return cls(sampler.transformer, capture_step, blocks, text_length, grid, **kwargs)

    def reset(self) -> None:
        self._maps: list[tuple[torch.Tensor, dict[int, torch.Tensor]]] = []
        self._x0: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._sigma: float | None = None

    def is_capture_step(self, step: int) -> bool:
        """Whether the sampler's 0-based loop ``step`` is the captured call."""
        return step == self.capture_step - 1

    def forward_context(self, step: int, rows: torch.Tensor) -> contextlib.AbstractContextManager:
        if not self.is_capture_step(step):
            return contextlib.nullcontext()
        per_block: dict[int, torch.Tensor] = {}
        self._maps.append((rows.detach().cpu(), per_block))

        def sink(block: int, maps: torch.Tensor) -> None:
            per_block[block] = maps[..., : self.keep_text_tokens].to(self.dtype)

        return capture_attention(self.transformer, self.blocks, self.text_length, sink, self.chunk_elements)

    def after_forward(
        self, step: int, rows: torch.Tensor, latents: torch.Tensor, velocity: torch.Tensor, sigma: float
    ) -> None:
        if not self.is_capture_step(step):
            return
        self._sigma = float(sigma)
        if self.record_x0:
            x0 = latents.float() - float(sigma) * velocity.float()
            self._x0.append((rows.detach().cpu(), x0.to(self.dtype)))

    @property
    def captured(self) -> bool:
        return bool(self._maps)

    def result(self, rollouts=None) -> ProbeCapture:
        """The capture of every row, in row order.

        Args:
            rollouts: optionally the :class:`rl.sampler.Rollouts` the sampler returned; their latents after the
                capture step become ``ProbeCapture.latents``.

        Raises:
            RuntimeError: if the capture step was never reached, rows are missing or duplicated, or
                ``rollouts`` do not match the captured rows.
        """
        if not self._maps:
            raise RuntimeError(
                f"nothing captured: the sampler never ran step {self.capture_step} "
                f"(advance(..., until_step >= {self.capture_step}) with this recorder as observer)"
            )
        rows = torch.cat([r for r, _ in self._maps])
        order = torch.argsort(rows)
        if not torch.equal(rows[order], torch.arange(len(rows))):
            raise RuntimeError(f"captured rows {sorted(rows.tolist())} are not 0..B-1 exactly once; call reset()")
        for _, per_block in self._maps:
            missing = set(self.blocks) - set(per_block)
            if missing:
                raise RuntimeError(f"blocks {sorted(missing)} produced no map (were their processors replaced?)")
        attention = torch.cat([torch.stack([m[b] for b in self.blocks], dim=1) for _, m in self._maps])[order]
        x0 = torch.cat([x for _, x in self._x0])[order] if self._x0 else None
        latents = None
        if rollouts is not None:
            if len(rollouts) != len(rows) or rollouts.step < self.capture_step:
                raise RuntimeError(
                    f"rollouts ({len(rollouts)} at step {rollouts.step}) do not match the capture "
                    f"({len(rows)} rows at step {self.capture_step})"
                )
            latents = rollouts.states[:, self.capture_step].to(self.dtype)
        return ProbeCapture(attention, x0, self._sigma, self.capture_step, self.blocks, self.grid, latents)


class ObserverGroup:
    """Several step observers as one (e.g. recorders at different capture steps in one sampling pass)."""

    def __init__(self, observers: Sequence) -> None:
        self.observers = list(observers)

    @contextlib.contextmanager
    def forward_context(self, step: int, rows: torch.Tensor) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for observer in self.observers:
                stack.enter_context(observer.forward_context(step, rows))
            yield

    def after_forward(
        self, step: int, rows: torch.Tensor, latents: torch.Tensor, velocity: torch.Tensor, sigma: float
    ) -> None:
        for observer in self.observers:
            observer.after_forward(step, rows, latents, velocity, sigma)
