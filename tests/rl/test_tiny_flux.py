import torch
from diffusers import FluxPipeline

from rewards.shapes import all_prompts, vocabulary
from rl.tiny_flux import build_tokenizers


def test_every_word_is_one_token_in_both_tokenizers():
    clip, t5 = build_tokenizers(vocabulary(), text_length=16)
    ids = t5("a red circle left of a blue square").input_ids
    assert len(ids) == 9 and ids[-1] == t5.eos_token_id  # 8 words + end token
    clip_ids = clip("a red circle left of a blue square").input_ids
    assert len(clip_ids) == 10 and clip_ids[0] == clip.bos_token_id and clip_ids[-1] == clip.eos_token_id
    longest = max(len(t5(s.prompt).input_ids) for s in all_prompts())
    assert longest <= 16


def test_fixture_is_deterministic_and_round_trips_offline(tiny_flux_pipeline, tiny_flux_config, tmp_path):
    from rl.tiny_flux import build_tiny_flux_pipeline

    again = build_tiny_flux_pipeline(vocabulary(), tiny_flux_config, seed=0)
    for a, b in zip(tiny_flux_pipeline.transformer.parameters(), again.transformer.parameters()):
        assert torch.equal(a, b)
    tiny_flux_pipeline.save_pretrained(tmp_path)
    loaded = FluxPipeline.from_pretrained(tmp_path)
    assert loaded.tokenizer_2("two crosses").input_ids == tiny_flux_pipeline.tokenizer_2("two crosses").input_ids
    with torch.no_grad():
        images = loaded(
            "a red circle", height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="pt"
        ).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_built_pipeline_is_in_eval_mode_and_encodes_prompts_deterministically(tiny_flux_pipeline):
    pipe = tiny_flux_pipeline
    assert not any(m.training for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer))
    first = pipe.encode_prompt(["a red circle"], None, max_sequence_length=16)[0]
    assert torch.equal(first, pipe.encode_prompt(["a red circle"], None, max_sequence_length=16)[0])


def test_tokenizer_ids_do_not_depend_on_the_build():
    words = vocabulary()
    ids = {tuple(build_tokenizers(words, 16)[0](" ".join(words)).input_ids) for _ in range(4)}
    assert len(ids) == 1
