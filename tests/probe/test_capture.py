import contextlib

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from probe.capture import (
    CaptureAttnProcessor,
    ObserverGroup,
    ProbeRecorder,
    attention_modules,
    capture_attention,
    default_blocks,
    image_to_text_attention,
)
from rl.sampler import FluxSampler, encode_prompts

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow circle"]
TEXT = 16


def _setup(pipe, noise_level=0.8, steps=4):
    sampler = FluxSampler(pipe, num_steps=steps, noise_level=noise_level, guidance_scale=3.5, height=32, width=32)
    embeds = encode_prompts(pipe, PROMPTS, max_sequence_length=TEXT)
    return sampler, embeds


def test_outputs_identical_and_maps_match_explicit_softmax(tiny_flux_pipeline, monkeypatch):
    pipe = tiny_flux_pipeline
    sampler, embeds = _setup(pipe)
    start = sampler.start(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3]))
    x, index = start.latents, start.prompt_index
    reference = sampler.velocity(x, 1, embeds, index)

    # Record every q/k reaching SDPA (in block order) to recompute the probabilities independently.
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        seen.append((query, key))
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    maps = {}
    blocks = list(range(len(attention_modules(pipe.transformer))))
    with capture_attention(pipe.transformer, blocks, TEXT, lambda b, m: maps.__setitem__(b, m), chunk_elements=97):
        captured = sampler.velocity(x, 1, embeds, index)
    assert torch.equal(captured, reference)  # the wrapped processor's own output: bit-identical
    assert sorted(maps) == blocks == [0, 1, 2]
    for block, (query, key) in enumerate(seen):  # [B, H, S, D], text first
        probs = torch.softmax(query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5, dim=-1)
        expected = probs[:, :, TEXT:, :TEXT].mean(dim=1)
        torch.testing.assert_close(maps[block], expected, rtol=1e-5, atol=1e-6)
        assert maps[block].shape == (3, 64, TEXT)
        assert (maps[block].sum(-1) < 1).all()  # softmax over ALL keys: image keys take the rest


def test_processors_restored_even_on_error(tiny_flux_pipeline):
    modules = attention_modules(tiny_flux_pipeline.transformer)
    before = [m.processor for m in modules]
    with (
        pytest.raises(RuntimeError, match="boom"),
        capture_attention(tiny_flux_pipeline.transformer, [0, 2], TEXT, print),
    ):
        assert isinstance(modules[0].processor, CaptureAttnProcessor)
        assert modules[1].processor is before[1]
        raise RuntimeError("boom")
    assert [m.processor for m in modules] == before
    assert all(type(p) is FluxAttnProcessor for p in before)
    with pytest.raises(IndexError), capture_attention(tiny_flux_pipeline.transformer, [3], TEXT, print):
        pass
    assert [m.processor for m in modules] == before


def test_recorder_captures_only_at_its_step(tiny_flux_pipeline, monkeypatch):
    pipe = tiny_flux_pipeline
    sampler, embeds = _setup(pipe)
    sampler.batch_size = 2
    start = sampler.start(torch.tensor([0, 0, 1, 2]), torch.tensor([5, 6, 7, 8]))
    plain = sampler.advance(start, embeds, until_step=4)

    calls = []
    original = CaptureAttnProcessor.__call__

    def counting(self, *args, **kwargs):
        calls.append(self.block)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CaptureAttnProcessor, "__call__", counting)
    steps_seen = []

    class Spy:
        def forward_context(self, step, rows):
            kinds = {type(m.processor).__name__ for m in attention_modules(pipe.transformer)}
            steps_seen.append((step, kinds))
            return contextlib.nullcontext()

        def after_forward(self, *args):
            pass

    recorder = ProbeRecorder.for_sampler(sampler, capture_step=2, blocks=[0, 2], text_length=TEXT)
    observed = sampler.advance(start, embeds, until_step=4, observer=ObserverGroup([recorder, Spy()]))
    assert torch.equal(observed.states, plain.states)  # capturing changes nothing
    assert calls == [0, 2, 0, 2]  # two row chunks at the capture step only, nothing at steps 1, 3, 4
    # Capture processors exist only inside the capture step's forward passes.
    assert [(step, sorted(kinds)) for step, kinds in steps_seen[::2]] == [
        (0, ["FluxAttnProcessor"]),
        (1, ["CaptureAttnProcessor", "FluxAttnProcessor"]),
        (2, ["FluxAttnProcessor"]),
        (3, ["FluxAttnProcessor"]),
    ]
    assert all(type(m.processor) is FluxAttnProcessor for m in attention_modules(pipe.transformer))

    capture = recorder.result(observed)
    assert torch.equal(capture.latents, observed.states[:, 2])  # after step 2, its SDE noise included
    assert capture.attention.shape == (4, 2, 64, TEXT) and capture.blocks == (0, 2) and capture.grid == (8, 8)
    assert capture.capture_step == 2 and capture.sigma == pytest.approx(float(sampler.sigmas[1]))
    # x0 = x - sigma * v at the 2nd call (0-based step 1) from the recorded states.
    v = sampler.velocity(plain.states[:, 1], 1, embeds, start.prompt_index)
    torch.testing.assert_close(capture.x0, plain.states[:, 1] - capture.sigma * v, rtol=0, atol=1e-6)


def test_recorder_reports_missing_capture_and_truncates_tokens(tiny_flux_pipeline):
    sampler, embeds = _setup(tiny_flux_pipeline)
    start = sampler.start(torch.tensor([0, 1]), torch.tensor([1, 2]))
    recorder = ProbeRecorder.for_sampler(sampler, 3, None, TEXT, keep_text_tokens=5, record_x0=False)
    early = sampler.advance(start, embeds, until_step=2, observer=recorder)
    with pytest.raises(RuntimeError, match="never ran step 3"):
        recorder.result()
    sampler.advance(early, embeds, until_step=3, observer=recorder)
    capture = recorder.result()
    assert capture.attention.shape == (2, 3, 64, 5) and capture.x0 is None
    assert recorder.blocks == default_blocks(tiny_flux_pipeline.transformer) == (0, 1, 2)


def test_chunking_does_not_change_maps():
    torch.manual_seed(0)
    query, key = torch.randn(2, 12, 3, 8), torch.randn(2, 17, 3, 8)
    full = image_to_text_attention(query, key, 5, chunk_elements=10**9)
    for chunk in (1, 17, 100, 17 * 12 * 2):
        torch.testing.assert_close(image_to_text_attention(query, key, 5, chunk_elements=chunk), full)
    expected = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", query, key) / 8**0.5, -1)[..., :5].mean(1)
    torch.testing.assert_close(full, expected)


def test_fused_projections_give_the_same_maps(tiny_flux_pipeline):
    sampler, embeds = _setup(tiny_flux_pipeline)
    start = sampler.start(torch.tensor([0, 2]), torch.tensor([1, 2]))
    maps = {}
    for fused in (False, True):
        if fused:
            tiny_flux_pipeline.transformer.fuse_qkv_projections()
        out = {}
        with capture_attention(tiny_flux_pipeline.transformer, [0, 1, 2], TEXT, out.__setitem__):
            sampler.velocity(start.latents, 0, embeds, start.prompt_index)
        maps[fused] = out
    assert attention_modules(tiny_flux_pipeline.transformer)[0].fused_projections
    for block in (0, 1, 2):
        torch.testing.assert_close(maps[True][block], maps[False][block], rtol=1e-5, atol=1e-6)


def test_capture_on_a_lora_transformer(tiny_flux_pipeline):
    from peft import LoraConfig

    pipe = tiny_flux_pipeline
    pipe.transformer.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    sampler, embeds = _setup(pipe)
    start = sampler.start(torch.tensor([0, 1]), torch.tensor([1, 2]))
    reference = sampler.velocity(start.latents, 0, embeds, start.prompt_index)
    maps = {}
    with capture_attention(pipe.transformer, [0, 2], TEXT, maps.__setitem__):
        captured = sampler.velocity(start.latents, 0, embeds, start.prompt_index)
    assert torch.equal(captured, reference) and sorted(maps) == [0, 2]
    pipe.transformer.disable_adapters()  # the maps follow the adapter: they come from the LoRA-wrapped q/k
    base = {}
    with capture_attention(pipe.transformer, [0, 2], TEXT, base.__setitem__):
        sampler.velocity(start.latents, 0, embeds, start.prompt_index)
    assert not torch.allclose(base[0], maps[0])
