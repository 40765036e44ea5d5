"""Builds a tiny, randomly initialised FLUX pipeline entirely offline.

The result is a real ``diffusers.FluxPipeline`` (FluxTransformer2DModel, AutoencoderKL with 16 latent
channels, CLIP and T5 text encoders, FlowMatchEulerDiscreteScheduler) whose parts are small enough to
sample and train on a laptop CPU. Tokenizers are built from a word list with the ``tokenizers`` library (a
word-level BPE for CLIP, a word-level Unigram for T5), so nothing is downloaded.

``launch/train_tiny_flux.py`` trains this pipeline on the shapes world and ships it in ``assets/``; the unit
tests use it untrained (``tests/conftest.py``), the way diffusers' own tests build theirs.
"""

from __future__ import annotations

import dataclasses
import json

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json: the tiny pipeline samples on FLUX's schedule
FLUX_DEV_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=4096,
    max_shift=1.15,
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
)


@dataclasses.dataclass
class TinyFluxConfig:
    """Sizes of the tiny pipeline. Defaults are the shipped model's (2.35M transformer parameters).

    ``resolution`` is the image side in pixels. The VAE downsamples ``2 ** (len(vae_channels) - 1)`` times
    and FLUX packs 2x2 latent patches into one token, so the defaults give an 8x8 image-token grid of 8x8
    pixels per token (FLUX.1 itself uses 16x16 pixels per token). A 16x16 grid (``vae_channels=(32, 64)``)
    costs several times more per training step on a CPU, too slow to pretrain and RL-tune on 2 cores (measured in
    docs/experiments.md, "The shapes world and the shipped tiny model").
    ``text_length`` is both the CLIP tokenizer's ``model_max_length`` and the T5 sequence length the
    trainer uses (``max_sequence_length``); every shapes prompt fits in it.
    """

    resolution: int = 64
    text_length: int = 16
    num_double_blocks: int = 2
    num_single_blocks: int = 4
    num_heads: int = 4
    head_dim: int = 32
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)
    text_dim: int = 32
    text_layers: int = 2
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_groups: int = 8


def _word_level_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style BPE (``</w>`` word suffix) whose merges rebuild every word into one token."""
    tokenizer = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=10_000,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz"),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    # Each word repeated so every merge that assembles it is frequent enough to be learnt.
    tokenizer.train_from_iterator([" ".join(words)] * 4, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # The trainer numbers tokens of equal frequency in hash order, which changes between processes; sorted ids
    # make the same words give the same ids (and the same seeded pipeline the same embeddings) every time.
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tokens = specials + sorted(set(model["vocab"]) - set(specials))
    return {token: index for index, token in enumerate(tokens)}, merges


def build_tokenizers(words: list[str], text_length: int) -> tuple[CLIPTokenizer, T5Tokenizer]:
    """CLIP and T5 tokenizers in which every word of ``words`` is exactly one token.

    Raises:
        ValueError: if a word does not come out as a single token (a word with characters outside a-z).
    """
    vocab, merges = _word_level_bpe(words)
    clip = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=text_length)
    # Unigram picks the segmentation with the highest total score: whole words (-1) beat any spelling
    # out of letters (-10 each), which only unknown words fall back to.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -10.0)]
    pieces += [(f"▁{word}", -1.0) for word in sorted(set(words))]
    pieces += [(letter, -10.0) for letter in "abcdefghijklmnopqrstuvwxyz"]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=text_length)
    for word in words:
        clip_ids = clip(word, add_special_tokens=False).input_ids
        t5_ids = t5(word, add_special_tokens=False).input_ids
        if len(clip_ids) != 1 or len(t5_ids) != 1:
            raise ValueError(f"word {word!r} is not a single token (clip {clip_ids}, t5 {t5_ids})")
    return clip, t5


def build_tiny_flux_pipeline(words: list[str], config: TinyFluxConfig | None = None, seed: int = 0) -> FluxPipeline:
    """A randomly initialised FluxPipeline of the given sizes, in fp32 on the CPU.

    Args:
        words: every word prompts may use (tokenizer vocabulary).
        config: sizes; ``TinyFluxConfig()`` when omitted.
        seed: seeds every module's initialisation, so two calls give identical pipelines.
    """
    config = config or TinyFluxConfig()
    clip_tokenizer, t5_tokenizer = build_tokenizers(words, config.text_length)
    inner_dim = config.num_heads * config.head_dim
    if sum(config.axes_dims_rope) != config.head_dim:
        raise ValueError(f"sum(axes_dims_rope)={sum(config.axes_dims_rope)} must equal head_dim={config.head_dim}")

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=config.num_double_blocks,
        num_single_layers=config.num_single_blocks,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.text_dim,
        pooled_projection_dim=config.text_dim,
        guidance_embeds=True,
        axes_dims_rope=config.axes_dims_rope,
    )
    assert inner_dim == transformer.inner_dim
    torch.manual_seed(seed + 1)
    n_levels = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_levels,
        up_block_types=("UpDecoderBlock2D",) * n_levels,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=config.vae_groups,
        sample_size=config.resolution,
        scaling_factor=1.0,
        shift_factor=0.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    torch.manual_seed(seed + 2)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=config.text_dim,
            intermediate_size=config.text_dim * 2,
            num_hidden_layers=config.text_layers,
            num_attention_heads=2,
            max_position_embeddings=config.text_length,
            projection_dim=config.text_dim,
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(seed + 3)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=config.text_dim,
            d_kv=8,
            d_ff=config.text_dim * 2,
            num_layers=config.text_layers,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    pipeline.set_progress_bar_config(disable=True)
    for module in (vae, clip, t5, transformer):
        module.eval()  # as from_pretrained leaves them: T5's dropout (0.1) would make prompt embeddings random
    return pipeline
