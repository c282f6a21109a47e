"""The offline helpers tests and examples are built on."""

from sdcli.testing import _WORDS, write_clip_tokenizer


def test_every_word_of_the_tiny_tokenizer_is_one_token(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path)))
    split = [w for w in _WORDS if len(tok(w, add_special_tokens=False).input_ids) != 1]
    assert split == []
    # Unknown words still tokenize, byte by byte.
    assert len(tok("zebra", add_special_tokens=False).input_ids) > 1


def test_t5_tokenizer_knows_each_word_whole_and_ends_with_eos(tmp_path):
    from sdcli.testing import write_t5_tokenizer

    tok = write_t5_tokenizer(tmp_path)
    ids = tok("a red circle").input_ids
    assert len(ids) == 4 and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle"
    assert len(tok("zebra").input_ids) > 2  # unknown words fall back to letters


def test_tiny_flow_pipelines_load_offline_and_make_images(tiny_flow_models):
    import torch
    from diffusers import DiffusionPipeline

    for family, path in tiny_flow_models.items():
        pipe = DiffusionPipeline.from_pretrained(path)
        assert type(pipe).__name__ == ("StableDiffusion3Pipeline" if family == "sd3" else "FluxPipeline")
        pipe.set_progress_bar_config(disable=True)
        image = pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
        assert image.shape == (16, 16, 3) and 0 < image.std()
    assert DiffusionPipeline.from_pretrained(tiny_flow_models["flux"]).transformer.config.guidance_embeds
    assert not DiffusionPipeline.from_pretrained(tiny_flow_models["flux-schnell"]).transformer.config.guidance_embeds
