import torch
from diffusers import FluxPipeline

from rl.config import FLUX_LORA_TARGETS
from rl.lora import LoraEMA, add_lora, disable_adapter, save_lora
from rl.sampler import FluxSampler, encode_prompts
from rl.sharded_lora import LoraWeights


def _sample(pipeline):
    pipeline.text_encoder_2.eval()  # the fixture is built in train mode: T5 dropout would randomise embeddings
    sampler = FluxSampler(pipeline, num_steps=3, noise_level=0.0, guidance_scale=3.5, height=32, width=32)
    embeds = encode_prompts(pipeline, ["a red circle", "two blue squares"], max_sequence_length=16)
    return sampler.advance(sampler.start(torch.arange(2), torch.tensor([1, 2])), embeds, 3).latents


def test_lora_targets_disable_and_default_init(tiny_flux_pipeline):
    transformer = tiny_flux_pipeline.transformer
    base = _sample(tiny_flux_pipeline)
    params = add_lora(transformer, rank=4, alpha=8, target_modules=FLUX_LORA_TARGETS, init="true")
    adapted = {name.split(".lora_")[0] for name, p in transformer.named_parameters() if p.requires_grad}
    assert any("transformer_blocks.0.attn.add_q_proj" in n for n in adapted)
    assert any("single_transformer_blocks.0.attn.to_q" in n for n in adapted)
    assert any("ff_context.net.2" in n for n in adapted)
    assert all(p.requires_grad for p in params) and len(params) == 2 * len(adapted)
    assert torch.equal(_sample(tiny_flux_pipeline), base)  # B = 0: a no-op until trained
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(_sample(tiny_flux_pipeline), base)
    with disable_adapter(transformer):
        assert torch.equal(_sample(tiny_flux_pipeline), base)
    assert not torch.allclose(_sample(tiny_flux_pipeline), base)  # re-enabled after the block


def test_saved_lora_reloads_in_diffusers_with_its_alpha(tiny_flux_pipeline, tmp_path):
    # two loads of one saved pipeline (rebuilding it could retrain its tokenizers differently)
    tiny_flux_pipeline.save_pretrained(tmp_path / "base")
    pipeline = FluxPipeline.from_pretrained(tmp_path / "base")
    # alpha != r: a reload without the adapter metadata would assume alpha = r and change the outputs
    add_lora(pipeline.transformer, rank=4, alpha=16, target_modules=FLUX_LORA_TARGETS, init="false")
    trained = _sample(pipeline)
    save_lora(pipeline.transformer, tmp_path / "lora")
    fresh = FluxPipeline.from_pretrained(tmp_path / "base")
    fresh.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(_sample(fresh), trained, rtol=0, atol=1e-5)


def test_ema_average_swap_and_state():
    param = torch.nn.Parameter(torch.zeros(2))
    ema = LoraEMA(LoraWeights([param], ["w"]), decay=0.9)
    with torch.no_grad():
        param.fill_(1.0)
    ema.update()  # warm-up decay min(0.9, 1/10) = 0.1: shadow = 0.1 * 0 + 0.9 * 1 = 0.9
    torch.testing.assert_close(ema.shadow[0], torch.full((2,), 0.9))
    ema.update()  # decay min(0.9, 2/11) = 0.181818: shadow = 0.181818 * 0.9 + 0.818182 * 1 = 0.981818
    torch.testing.assert_close(ema.shadow[0], torch.full((2,), 0.981818), atol=1e-6, rtol=0)
    with ema.average_parameters():
        torch.testing.assert_close(param.detach(), torch.full((2,), 0.981818), atol=1e-6, rtol=0)
    assert param.detach().tolist() == [1.0, 1.0]
    other = LoraEMA(LoraWeights([param], ["w"]), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 2 and other.decay == 0.9 and torch.equal(other.shadow[0], ema.shadow[0])
    # a checkpoint loads to the CPU; the average stays on the LoRA's device (a GPU's: the next update mixed devices)
    on_meta = LoraEMA(LoraWeights([torch.nn.Parameter(torch.zeros(2, device="meta"))], ["w"]), decay=0.9)
    on_meta.load_state_dict(ema.state_dict())
    assert on_meta.shadow[0].device.type == "meta" and on_meta.shadow[0].dtype == torch.float32
