"""AUTOMATIC1111 prompts: the parser, the chunked encoder, clip skip and textual inversion, on the tiny pipelines."""

from __future__ import annotations

import numpy as np
import pytest

from sdcli.generation import Engine, Settings, plan_jobs
from sdcli.generation.prompts import PromptSyntax, TextConditioning, chunk_tokens, frame, parse_weights
from conftest import one_error_line, paths_of, pixels

# 1. The parser ----------------------------------------------------------------------------------


def weights(text: str) -> list:
    return [None if p is None else (p[0], round(p[1], 6)) for p in parse_weights(text).pieces]


@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("a [small] cat", [("a ", 1.0), ("small", round(1 / 1.1, 6)), (" cat", 1.0)]),
    ("(red:1.3) circle", [("red", 1.3), (" circle", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),  # equal weights merge
    # nesting multiplies: ((house:1.3)) is 1.3 × 1.1 × 1.1
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
      ("sky", 1.4641), (".", 1.1)]),
    (r"\(literal\] \\ back", [("(literal] \\ back", 1.0)]),
    ("a:1.2) b", [("a:1.2) b", 1.0)]),  # a weight with no bracket to close is text
    ("ratio 16:9", [("ratio 16:9", 1.0)]),
    ("", [("", 1.0)]),
])
def test_weights_as_automatic1111_reads_them(text, expected):
    assert weights(text) == expected


def test_break_starts_a_new_chunk_only_as_a_word():
    assert weights("a cat BREAK (a dog)") == [("a cat", 1.0), None, ("", 1.0), ("a dog", 1.1)]
    assert weights("BREAKFAST at noon") == [("BREAKFAST at noon", 1.0)]
    assert weights("a BREAK BREAK b") == [("a", 1.0), None, ("", 1.0), None, ("b", 1.0)]


@pytest.mark.parametrize("text, expected", [
    ("(unbalanced", [("unbalanced", 1.1)]),  # closed at the end
    ("[a (b", [("a ", round(1 / 1.1, 6)), ("b", 1.0)]),  # 1/1.1 × 1.1 for b
    ("a) b]", [("a) b]", 1.0)]),  # nothing to close: text
])
def test_unbalanced_brackets_are_read_as_automatic1111_does_and_flagged(text, expected):
    assert weights(text) == expected
    assert parse_weights(text).unbalanced
    assert not parse_weights("(a) [b] (c:2) \\(").unbalanced


def test_chunks_hold_75_tokens_and_an_embedding_never_straddles_two():
    ids = [[[i] for i in range(80)], 1.5]
    (a, wa), (b, wb) = chunk_tokens([ids])
    assert a == list(range(75)) and b == list(range(75, 80)) and set(wa + wb) == {1.5}
    # 74 tokens, then a three-vector embedding: it moves to the next chunk whole.
    chunks = chunk_tokens([([[i] for i in range(74)] + [[100, 101, 102]], 1.0)])
    assert [len(c[0]) for c in chunks] == [74, 3]
    assert [len(c[0]) for c in chunk_tokens([([[1]], 1.0), None, ([[2]], 1.0)])] == [1, 1]
    assert chunk_tokens([([], 1.0)]) == [([], [])]  # an empty prompt is one empty chunk
    assert frame([5, 6], [1.2, 1.0], bos=1, eos=2, pad=0, size=4) == ([1, 5, 6, 2, 0, 0], [1.0, 1.2, 1.0, 1.0, 1.0, 1.0])


# 2. Images on the tiny pipelines ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pipelines(tiny_models):
    return {family: Engine.load(Settings(prompts=["x"], model=path)) for family, path in tiny_models.items()}


def image(loaded, prompt: str, g: float = 7.5, **settings) -> np.ndarray:
    s = Settings(prompts=[prompt], steps=2, guidance=[g], seeds=[3], **settings)
    (item,) = list(loaded.images(s, plan_jobs(s, [3])))
    return np.asarray(item.image, np.int16)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("negative", ["", "blue square"])
def test_a_plain_prompt_gives_diffusers_own_image(tiny_models, pipelines, family, negative):
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_models[family])
    pipe.set_progress_bar_config(disable=True)
    arrays = pipe("a red circle", negative_prompt=negative or None, num_inference_steps=2, guidance_scale=7.5,
                  generator=torch.Generator("cpu").manual_seed(3), output_type="np").images
    theirs = np.asarray(pipe.numpy_to_pil(arrays)[0], np.int16)
    assert np.array_equal(image(pipelines[family], "a red circle", negative_prompt=negative), theirs)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_weights_of_one_are_the_words_without_brackets(pipelines, family):
    loaded = pipelines[family]
    same = image(loaded, "a red circle on (top)", prompt_syntax="plain")  # diffusers reading the bare words
    assert np.array_equal(image(loaded, "a (red:1) circle (on:1.0) \\(top\\)"), same)
    assert np.array_equal(image(loaded, "a red circle on \\(top\\)"), same)
    assert not np.array_equal(image(loaded, "a (red:1.5) circle"), image(loaded, "a red circle"))


def tiny_sd1_with_final_norm_bias(bias: float):
    """The tiny SD 1.x pipeline with its text encoder's final LayerNorm bias set: 0 makes every token's
    hidden state exactly zero-mean (as the bundled model's are), anything else gives the chunk a mean."""
    import torch

    from sdcli.testing import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd1")
    from sdcli.generation.prompts import _final_norm

    norm = _final_norm(pipe.text_encoder)
    with torch.no_grad():
        norm.bias.copy_(bias + 0.1 * torch.randn(norm.bias.shape, generator=torch.Generator().manual_seed(0)))
        if bias == 0:
            norm.bias.zero_()
    return pipe


@pytest.fixture(scope="module")
def biased_encoders():
    return {"zero-mean": tiny_sd1_with_final_norm_bias(0.0), "mean 0.5": tiny_sd1_with_final_norm_bias(0.5)}


def embeds(pipe, prompt: str):
    return TextConditioning(Settings(prompts=["x"]), pipe).call_kwargs([prompt], 1.0)["prompt_embeds"]


@pytest.mark.parametrize("prompt, position, weight", [
    ("a (red:1.5) circle", 2, 1.5),  # BOS, a, red
    ("a (red:0.5) circle", 2, 0.5),
    ("((red)) circle on a [black] square", 1, 1.21),
    ("a red (circle:2.0)", 3, 2.0),
])
def test_a_weight_keeps_automatic1111s_mean_where_the_chunk_has_one(biased_encoders, prompt, position, weight):
    import torch

    pipe = biased_encoders["mean 0.5"]
    plain = embeds(pipe, parse_weights(prompt).text)
    assert plain.mean() > 0.4  # a real level to restore
    expected = plain.clone()
    expected[0, position] *= weight
    if "[black]" in prompt:
        expected[0, 5] /= 1.1  # BOS red circle on a black
    expected *= plain.mean() / expected.mean()  # AUTOMATIC1111's "Original" emphasis, by hand
    assert torch.allclose(embeds(pipe, prompt), expected, atol=1e-6)


@pytest.mark.parametrize("encoder", ["zero-mean", "mean 0.5"])
@pytest.mark.parametrize("weight", ["0.5", "0.9", "1.1", "1.4", "2.0", "100", "-1", "0"])
def test_a_weight_never_gives_nan_or_flips_the_conditioning(biased_encoders, encoder, weight):
    import torch

    pipe = biased_encoders[encoder]
    plain = embeds(pipe, "a red circle on a white background")
    z = embeds(pipe, f"a red circle on a (white:{weight}) background")
    assert torch.isfinite(z).all()
    untouched = [i for i in range(z.shape[1]) if i != 6]  # BOS a red circle on a white
    cosine = torch.nn.functional.cosine_similarity(z[0, untouched], plain[0, untouched], dim=-1)
    assert (cosine > 0.999).all()  # the same directions, rescaled at most
    scale = (z[0, untouched].norm(dim=-1) / plain[0, untouched].norm(dim=-1))
    w = float(weight)
    assert (scale <= max(abs(w), 1 / abs(w) if w else 1) + 1e-5).all() and (scale > 0).all()
    if encoder == "zero-mean":  # no mean to restore: the weighted embeddings stand as they are
        expected = plain.clone()
        expected[0, 6] *= w
        assert torch.equal(z, expected)


@pytest.mark.parametrize("before, after, expected", [
    (1e-9, 1e-9, "as weighted"),  # both means rounding noise
    (0.3, -0.2, "as weighted"),  # the weights pushed the mean across zero: the ratio would negate the chunk
    (0.3, 1e-12, "as weighted"),  # the weighted mean vanishes: the ratio would be huge
    (0.3, 0.2, "scaled by 1.5"),  # a real level: AUTOMATIC1111's ratio, inside the weights' range
    (0.3, 0.01, "scaled by 2"),  # a real level but a ratio past the strongest weight: held at it
])
def test_the_mean_rescale_is_applied_only_where_it_means_something(before, after, expected):
    """`emphasis` on a hand-made chunk of two tokens, one weighted 2, whose means are ``before`` and ``after``."""
    import torch

    from sdcli.generation.prompts import emphasis

    # Token 0 (weight 1) and token 1 (weight 2), width 2; chunk mean = (m0 + m1) / 2, weighted (m0 + 2 m1) / 2.
    m1 = 2 * after - 2 * before
    m0 = 2 * before - m1
    z = torch.tensor([[[m0 + 1, m0 - 1], [m1 + 1, m1 - 1]]], dtype=torch.float64)
    weights = torch.tensor([[1.0, 2.0]])
    weighted = z * weights[:, :, None]
    out = emphasis(z, weights)
    assert torch.isfinite(out).all()
    factor = {"as weighted": 1.0, "scaled by 1.5": 1.5, "scaled by 2": 2.0}[expected]
    assert torch.allclose(out, weighted * factor, rtol=1e-6, atol=1e-12)


def test_the_readme_prompt_weights_example_runs_on_the_bundled_model(cli, tmp_path):
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    line = 'sdcli generate "a large (red:1.4) circle on a [white] background" --seed 1'
    assert line in readme
    result = cli(*shlex.split(line)[1:], "--steps", "3", "--out", tmp_path / "out")
    assert len(paths_of(result)) == 1, result.stderr


@pytest.fixture(scope="module")
def bundled_text():
    from sdcli.defaults import BUNDLED_MODEL

    if not (BUNDLED_MODEL / "model_index.json").is_file():
        pytest.skip("no bundled model in sdcli/models/shapes")
    loaded = Engine.load(Settings(prompts=["x"], model=str(BUNDLED_MODEL)))
    return TextConditioning(Settings(prompts=["x"]), loaded.pipe)


@pytest.mark.parametrize("word", ["large", "red", "triangle", "center", "black"])
@pytest.mark.parametrize("weighted, weight", [("({}:0.5)", 0.5), ("({}:0.9)", 0.9), ("({}:1.1)", 1.1),
                                              ("({}:1.4)", 1.4), ("({}:2.0)", 2.0), ("[{}]", 1 / 1.1),
                                              ("(({}))", 1.21)])
def test_weights_on_the_bundled_model_scale_the_word_and_leave_the_rest(bundled_text, word, weighted, weight):
    """The bundled model's text encoder gives zero-mean tokens (issue 28: NaN or a negated prompt before)."""
    import torch

    prompt = "a large red triangle in the center on a black background"
    plain = bundled_text.encode(prompt).embeds[0]
    z = bundled_text.encode(prompt.replace(word, weighted.format(word), 1)).embeds[0]
    assert torch.isfinite(z).all()
    at = 1 + prompt.split().index(word)  # after BOS; every word is one token
    others = [i for i in range(z.shape[0]) if i != at]
    assert (torch.nn.functional.cosine_similarity(z[others], plain[others], dim=-1) > 0.99).all()
    assert torch.allclose(z[others].norm(dim=-1), plain[others].norm(dim=-1), rtol=0.2)
    assert torch.nn.functional.cosine_similarity(z[at], plain[at], dim=0) > 0.99
    assert abs(float(z[at].norm() / plain[at].norm()) / weight - 1) < 0.2


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_words_past_token_77_change_the_image(pipelines, family):
    loaded = pipelines[family]
    long = "red " * 80
    assert not np.array_equal(image(loaded, long + "circle"), image(loaded, long + "square"))
    # diffusers' own encoding cuts them off, so there they change nothing.
    assert np.array_equal(image(loaded, long + "circle", prompt_syntax="plain"),
                          image(loaded, long + "square", prompt_syntax="plain"))


def test_a_long_prompt_is_two_chunks_and_the_negative_is_padded_to_match(pipelines):
    pipe = pipelines["sdxl"].pipe
    text = TextConditioning(Settings(prompts=["x"], negative_prompt="blue"), pipe)
    kwargs = text.call_kwargs(["red " * 80 + "circle"], 7.5)
    assert kwargs["prompt_embeds"].shape == (1, 154, 64)  # both encoders side by side
    assert kwargs["negative_prompt_embeds"].shape == (1, 154, 64)
    assert kwargs["pooled_prompt_embeds"].shape == (1, 32)
    first = text.call_kwargs(["red " * 75], 7.5)  # the pooled embedding is the first chunk's
    assert (kwargs["pooled_prompt_embeds"] == first["pooled_prompt_embeds"]).all()
    empty = text.encode("").embeds  # the negative's second chunk is the empty prompt's
    assert (kwargs["negative_prompt_embeds"][:, 77:] == empty).all()


def test_prompts_of_different_lengths_batch_like_one_at_a_time(pipelines):
    loaded = pipelines["sd1"]
    prompts = ["a red circle", "red " * 80 + "square"]

    def run(batch_size):
        s = Settings(prompts=prompts, steps=2, guidance=[7.5], seeds=[1], batch_size=batch_size)
        return [np.asarray(i.image, np.int16) for i in loaded.images(s, plan_jobs(s, [1]))]

    for a, b in zip(run(1), run(2)):
        assert np.abs(a - b).max() <= 1


def test_sdxl_leaves_an_empty_negative_prompt_at_zero(pipelines):
    text = TextConditioning(Settings(prompts=["x"]), pipelines["sdxl"].pipe)
    kwargs = text.call_kwargs(["a red circle"], 7.5)
    assert not kwargs["negative_prompt_embeds"].any() and not kwargs["negative_pooled_prompt_embeds"].any()
    assert "negative_prompt_embeds" not in text.call_kwargs(["a red circle"], 1.0)  # no unconditional branch


def test_plain_syntax_passes_the_text(pipelines):
    text = TextConditioning(Settings(prompts=["x"], prompt_syntax=PromptSyntax.plain.value, negative_prompt="n"),
                            pipelines["sd1"].pipe)
    assert text.call_kwargs(["(a)"], 7.5) == {"prompt": ["(a)"], "negative_prompt": ["n"]}


# Prompt editing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_prompt_editing_swaps_the_embeddings_as_a_diffusers_callback_would(tiny_models, pipelines, family):
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_models[family])
    pipe.set_progress_bar_config(disable=True)
    xl = family == "sdxl"
    encoded = pipe.encode_prompt("a blue circle", device="cpu", num_images_per_prompt=1,
                                 do_classifier_free_guidance=True)
    if xl:
        pos, neg, pooled, neg_pooled = encoded
    else:
        pos, neg = encoded

    def switch(_pipe, i, _t, _kwargs):  # after the first step: "a blue circle"
        out = {"prompt_embeds": torch.cat([neg, pos])}
        if xl:
            out["add_text_embeds"] = torch.cat([neg_pooled, pooled])
        return out if i == 0 else {}

    arrays = pipe("a red circle", num_inference_steps=2, guidance_scale=7.5, callback_on_step_end=switch,
                  generator=torch.Generator("cpu").manual_seed(3), output_type="np").images
    theirs = np.asarray(pipe.numpy_to_pil(arrays)[0], np.int16)
    loaded = pipelines[family]
    assert np.abs(image(loaded, "a [red:blue:1] circle") - theirs).max() <= 1
    assert np.array_equal(image(loaded, "a [red|blue] circle"), image(loaded, "a [red:blue:1] circle"))


def test_prompt_editing_at_the_ends_is_one_prompt_and_in_between_neither(pipelines):
    loaded = pipelines["sd1"]
    red, blue = image(loaded, "a red circle"), image(loaded, "a blue circle")
    assert np.array_equal(image(loaded, "a [red:blue:2] circle"), red)  # 2 of 2 steps red
    assert np.array_equal(image(loaded, "a [red:blue:0] circle"), blue)
    assert np.array_equal(image(loaded, "a red circle", negative_prompt="[square:blue:0.0]"),
                          image(loaded, "a red circle", negative_prompt="blue"))  # the negative prompt too
    middle = image(loaded, "a [red:blue:0.5] circle")
    assert not np.array_equal(middle, red) and not np.array_equal(middle, blue)


def test_an_edited_prompt_that_grows_a_chunk_batches_like_one_at_a_time(pipelines):
    loaded = pipelines["sd1"]
    prompts = ["a [red:" + "red " * 80 + ":1] circle", "a blue square"]

    def run(batch_size):
        s = Settings(prompts=prompts, steps=2, guidance=[7.5], seeds=[1], batch_size=batch_size)
        return [np.asarray(i.image, np.int16) for i in loaded.images(s, plan_jobs(s, [1]))]

    for a, b in zip(run(1), run(2)):
        assert np.abs(a - b).max() <= 1


def test_prompt_editing_runs_through_both_hires_passes_and_is_recorded_as_typed(cli, tiny_sd, tmp_path):
    from PIL import Image

    from sdcli.generation.metadata import A1111_KEY

    args = ("--model", tiny_sd, "--steps", "2", "--seed", "1", "--hires-scale", "2", "--width", "32", "--height", "32")
    result = cli("generate", "a [red|blue] circle", *args, "--out", tmp_path / "edited")
    assert result.exit_code == 0, result.stderr
    (path,) = paths_of(result)
    assert Image.open(path).info[A1111_KEY].startswith("a [red|blue] circle\n")
    plain = cli("generate", "a red circle", *args, "--out", tmp_path / "plain")
    assert not np.array_equal(pixels(path), pixels(paths_of(plain)[0]))


def test_prompt_editing_on_a_model_sdcli_does_not_encode_fails_in_one_line(cli, tiny_flow_models, tmp_path):
    result = cli("generate", "a [red:blue:1] circle", "--model", tiny_flow_models["sd3"], "--steps", "1",
                 "--seed", "1", "--out", tmp_path / "out")
    assert "prompt editing ([from:to:when], [a|b]) needs a Stable Diffusion" in one_error_line(result)
    assert not list((tmp_path / "out").glob("*.png"))


# 3. Clip skip -----------------------------------------------------------------------------------


def hidden_states(tokenizer, model, prompt: str):
    import torch

    ids = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states


def test_clip_skip_2_is_the_penultimate_layer_normed_on_sd1(pipelines):
    import torch

    pipe = pipelines["sd1"].pipe
    ours = TextConditioning(Settings(prompts=["x"], clip_skip=2), pipe).call_kwargs(["a red circle"], 1.0)
    with torch.no_grad():
        by_hand = pipe.text_encoder.final_layer_norm(hidden_states(pipe.tokenizer, pipe.text_encoder, "a red circle")[-2])
    assert torch.equal(ours["prompt_embeds"], by_hand)


def test_clip_skip_on_sdxl_goes_back_from_the_penultimate_layer(pipelines):
    import torch

    pipe = pipelines["sdxl"].pipe
    ours = TextConditioning(Settings(prompts=["x"], clip_skip=2), pipe).call_kwargs(["a red circle"], 1.0)
    by_hand = torch.cat([hidden_states(pipe.tokenizer, pipe.text_encoder, "a red circle")[-3],
                         hidden_states(pipe.tokenizer_2, pipe.text_encoder_2, "a red circle")[-3]], dim=-1)
    assert torch.equal(ours["prompt_embeds"], by_hand)


# 4. Textual inversion ---------------------------------------------------------------------------


def save(path, tensors) -> str:
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return str(path)


def random_vectors(*shape, seed=0):
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_an_a1111_embedding_loads_and_its_token_changes_the_image(cli, tiny_sd, tmp_path):
    a = save(tmp_path / "mystyle.safetensors", {"emb_params": random_vectors(2, 32)})
    b = save(tmp_path / "other.safetensors", {"emb_params": random_vectors(2, 32, seed=1)})
    common = ["generate", "a mystyle circle", "--model", tiny_sd, "--steps", "2", "--seed", "1"]
    (one,) = paths_of(cli(*common, "--embedding", a, "--out", tmp_path / "a"))
    (two,) = paths_of(cli(*common, "--embedding", f"{b}:mystyle", "--out", tmp_path / "b"))
    assert not np.array_equal(pixels(one), pixels(two))
    # ... and in the negative prompt.
    (neg,) = paths_of(cli(*common, "--embedding", a, "-n", "mystyle", "--out", tmp_path / "c"))
    assert not np.array_equal(pixels(one), pixels(neg))


def test_a_multi_vector_embedding_reads_the_same_in_both_syntaxes(tiny_sd, tmp_path):
    """diffusers expands T into T T_1 ... itself under plain syntax; the a1111 path must do the same."""
    path = save(tmp_path / "learned_embeds.safetensors", {"<cat-toy>": random_vectors(3, 32)})
    loaded = Engine.load(Settings(prompts=["x"], model=tiny_sd))
    emb = {"embeddings": [(path, "<cat-toy>")]}
    assert np.array_equal(image(loaded, "a <cat-toy> circle", **emb),
                          image(loaded, "a <cat-toy> circle", prompt_syntax="plain", **emb))
    assert not np.array_equal(image(loaded, "a <cat-toy> circle", **emb), image(loaded, "a circle", **emb))


def test_a_diffusers_learned_embeds_file_is_called_by_its_own_token(tiny_sd, tmp_path):
    import torch

    from sdcli.generation.embeddings import parse_embedding

    vectors = random_vectors(32)
    path = save(tmp_path / "learned_embeds.safetensors", {"<cat-toy>": vectors})
    assert parse_embedding(path) == (path, "<cat-toy>")
    assert parse_embedding(f"{path}:kitty") == (path, "kitty")
    a1111 = save(tmp_path / "easyneg.safetensors", {"emb_params": random_vectors(1, 32)})
    assert parse_embedding(a1111) == (a1111, "easyneg")
    loaded = Engine.load(Settings(prompts=["x"], model=tiny_sd))
    rows = loaded.pipe.text_encoder.get_input_embeddings().weight.shape[0]
    with loaded.request(Settings(prompts=["x"], embeddings=[(path, "<cat-toy>")])) as pipe:
        row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<cat-toy>")]
        assert torch.equal(row, vectors)
    # The request over, the token and its row are gone again.
    assert "<cat-toy>" not in loaded.pipe.tokenizer.get_vocab()
    assert loaded.pipe.text_encoder.get_input_embeddings().weight.shape[0] == rows


def test_an_sdxl_embedding_fills_both_text_encoders(tiny_models, tmp_path):
    import torch

    l, g = random_vectors(2, 32), random_vectors(2, 32, seed=1)
    path = save(tmp_path / "xl.safetensors", {"clip_l": l, "clip_g": g})
    loaded = Engine.load(Settings(prompts=["x"], model=tiny_models["sdxl"]))
    emb = {"embeddings": [(path, "xl")]}
    with loaded.request(Settings(prompts=["x"], **emb)) as pipe:
        for tokenizer, model, rows in ((pipe.tokenizer, pipe.text_encoder, l),
                                       (pipe.tokenizer_2, pipe.text_encoder_2, g)):
            ids = tokenizer.convert_tokens_to_ids(["xl", "xl_1"])
            assert torch.equal(model.get_input_embeddings().weight[ids], rows)
    assert not np.array_equal(image(loaded, "a xl circle", **emb), image(loaded, "a circle", **emb))


def test_a_pickled_a1111_embedding_needs_allow_pickle(cli, tiny_sd, tmp_path):
    import torch

    path = tmp_path / "pstyle.pt"
    torch.save({"string_to_param": {"*": torch.nn.Parameter(random_vectors(2, 32))}, "name": "pstyle"}, path)
    common = ["generate", "a pstyle circle", "--model", tiny_sd, "--steps", "1", "--seed", "1", "--embedding", path]
    line = one_error_line(cli(*common, "--out", tmp_path / "no"), code=2)
    assert "pickled" in line and "--allow-pickle" in line
    assert not (tmp_path / "no").exists()
    assert len(paths_of(cli(*common, "--allow-pickle", "--out", tmp_path / "yes"))) == 1


# 5. Bad input: one line each --------------------------------------------------------------------


@pytest.mark.parametrize("case, args, message", [
    ("narrow", ["--embedding", "{narrow}"], "is 16 wide but this model's text encoder takes 32"),
    ("in vocabulary", ["--embedding", "{ok}:red"], "the token 'red' is already in this model's vocabulary"),
    ("sd1 embedding on sdxl", ["--embedding", "{ok}", "--model", "{sdxl}"], "SDXL needs vectors for both"),
    ("sdxl embedding on sd1", ["--embedding", "{xl}"], "holds SDXL vectors"),
    ("same token twice", ["--embedding", "{ok}:t", "--embedding", "{narrow}:t"], "both use the token 't'"),
    ("missing", ["--embedding", "{missing}"], "no such file"),
    ("not an embedding", ["--embedding", "{many}"], "is not a textual-inversion embedding"),
    ("clip skip past the layers", ["--clip-skip", "3"], "--clip-skip 3: this model's text encoder has only 2 layers"),
    ("clip skip 0", ["--clip-skip", "0"], "--clip-skip must be at least 1"),
    ("clip skip with plain", ["--clip-skip", "2", "--prompt-syntax", "plain"], "--clip-skip needs --prompt-syntax"),
])
def test_bad_prompt_settings_fail_in_one_line(cli, tiny_models, tmp_path, case, args, message):
    files = {
        "narrow": save(tmp_path / "narrow.safetensors", {"emb_params": random_vectors(1, 16)}),
        "ok": save(tmp_path / "ok.safetensors", {"emb_params": random_vectors(1, 32)}),
        "xl": save(tmp_path / "xl.safetensors", {"clip_l": random_vectors(1, 32), "clip_g": random_vectors(1, 32)}),
        "many": save(tmp_path / "many.safetensors", {"a": random_vectors(1, 32), "b": random_vectors(1, 32)}),
        "missing": str(tmp_path / "missing.safetensors"),
        "sdxl": tiny_models["sdxl"],
    }
    args = [a.format(**files) for a in args]
    if "--model" not in args:
        args += ["--model", tiny_models["sd1"]]
    line = one_error_line(cli("generate", "a ok circle", "--steps", "1", "--seed", "1", *args,
                              "--out", tmp_path / "out"))
    assert message in line, line
    assert not list((tmp_path / "out").glob("*.png"))


NESTED = 3000


@pytest.mark.parametrize("prompt, message", [
    ("a (red:nan) circle", "the weight in '(red:nan)' must be a plain number from -100 to 100"),
    ("a (red:inf) circle", "the weight in '(red:inf)' must be a plain number"),
    ("a (red:-inf) circle", "the weight in '(red:-inf)' must be a plain number"),
    ("a (red:1e300) circle", "the weight in '(red:1e300)' must be a plain number"),
    ("a (big red:-Infinity) circle", "the weight in '(big red:-Infinity)' must be a plain number"),
    ("a (red: NaN ) circle", "the weight in '(red: NaN )' must be a plain number"),
    ("a ((red):1" + "0" * 400 + ") circle", "the weight in '((red):1000000"),  # 1e400: inf as a float
    ("a (red:101) circle", "the weight in '(red:101)' is outside -100 to 100"),
    ("a (red:-250.5) circle", "the weight in '(red:-250.5)' is outside -100 to 100"),
    ("a ((((((((red:90)))))))) circle", "the brackets around 'red' multiply its weight to 175.4"),
    ("a [red:blue:nan] circle", "the switch step in '[red:blue:nan]' must be a step number (10) or a fraction"),
    ("a [red:blue:inf] circle", "the switch step in '[red:blue:inf]'"),
    ("a [red:blue:1e400] circle", "the switch step in '[red:blue:1e400]'"),
    ("a [red:blue:" + "9" * 400 + "] circle", "the switch step in '[red:blue:999"),
    ("a [blue:-1] circle", "the switch step in '[blue:-1]'"),
    ("a [red::1e3] circle", "the switch step in '[red::1e3]'"),
    ("(" * NESTED + "red" + ")" * NESTED, f"brackets nested {NESTED} deep; sdcli reads at most 100"),
    ("[" * NESTED + "red" + "]" * NESTED, f"brackets nested {NESTED} deep"),
    ("(" * 100_000 + "red", "brackets nested 100000 deep"),
    ("[" * 100_000 + "red" + "]" * 100_000, "brackets nested 100000 deep"),
    ("[red:" * NESTED + "blue" + ":1]" * NESTED, f"brackets nested {NESTED} deep"),
    ("[a|" * NESTED + "b" + "]" * NESTED, f"brackets nested {NESTED} deep"),
    ("([" * 60 + "red" + "])" * 60, "brackets nested 120 deep"),
])
@pytest.mark.parametrize("where", ["prompt", "negative"])
def test_numbers_no_model_can_take_are_refused_before_loading(cli, tmp_path, prompt, message, where):
    """nan, inf and overflowing weights or switch steps, and brackets nested past what the parsers read: one
    line naming the piece, before the model loads (the model given does not exist)."""
    args = [prompt] if where == "prompt" else ["a circle", "-n", prompt]
    result = cli("generate", *args, "--model", tmp_path / "no-model", "--steps", "1", "--out", tmp_path / "out")
    line = one_error_line(result, 2)
    assert message in line and line.startswith("error: the prompt: " if where == "prompt" else
                                               "error: --negative-prompt: ")
    assert len(line) < 200 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("prompt", ["a (red:100) circle", "a (red:-100) [blue:red:0.5] circle", "(" * 48 + "red",
                                    "[" * 100 + "red", "a (red:0) circle", "a (red: 1.4 ) circle"])
def test_weights_and_nesting_within_the_bounds_are_read(prompt):
    from sdcli.generation.prompts import check_prompt_numbers

    check_prompt_numbers(prompt, "the prompt")
    assert parse_weights(prompt).pieces


def test_a_weight_may_have_spaces_around_it_as_in_automatic1111():
    assert weights("a (red: 1.4 ) circle") == [("a ", 1.0), ("red", 1.4), (" circle", 1.0)]


def embedding_files(tmp_path) -> dict:
    """Embedding files no model can take, each written in the test (the tiny text encoders are 32 wide)."""
    import torch

    def one(name, tensor):
        return save(tmp_path / f"{name}.safetensors", {"emb_params": tensor})

    v = random_vectors(2, 32)
    return {
        "nan": one("nan", v.clone().index_put_((torch.tensor([1]), torch.tensor([3])), torch.tensor(float("nan")))),
        "inf": one("inf", v.clone().index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("-inf")))),
        "huge": one("huge", v * 1e6),
        "huge64": one("huge64", v.double() * 1e300),  # inf once it is float32
        "int": one("int", torch.ones(2, 32, dtype=torch.int64)),
        "bool": one("bool", torch.ones(2, 32, dtype=torch.bool)),
        "3d": one("3d", random_vectors(1, 2, 32)),
        "empty": one("empty", torch.zeros(0, 32)),
        "empty1d": one("empty1d", torch.zeros(0)),
        "narrow": one("narrow", random_vectors(2, 16)),
        "xl-counts": save(tmp_path / "xlc.safetensors",
                          {"clip_l": random_vectors(2, 32), "clip_g": random_vectors(3, 32)}),
        "xl-nan": save(tmp_path / "xlnan.safetensors", {"clip_l": v, "clip_g": v * float("nan")}),
        "xl-narrow-g": save(tmp_path / "xlg.safetensors", {"clip_l": v, "clip_g": random_vectors(2, 8)}),
        "xl": save(tmp_path / "xl.safetensors", {"clip_l": v, "clip_g": v.clone()}),
        "ok": one("ok", v),
        "zz": one("zz", random_vectors(1, 32)),
        "zz_1": one("zz_1", random_vectors(1, 32)),
        "zq": one("zq", random_vectors(3, 32)),
        "zq_1": one("zq_1", random_vectors(1, 32)),
        "zq_2": one("zq_2", random_vectors(1, 32)),
    }


@pytest.mark.parametrize("model, names, code, message", [
    ("sd1", ["nan"], 1, "--embedding nan.safetensors holds NaN or infinite values"),
    ("sd1", ["inf"], 1, "--embedding inf.safetensors holds NaN or infinite values"),
    ("sd1", ["huge"], 1, "--embedding huge.safetensors holds values as large as"),
    ("sd1", ["huge64"], 1, "--embedding huge64.safetensors holds values as large as"),
    ("sd1", ["int"], 1, "--embedding int.safetensors holds int64 values; an embedding's vectors are floating-point"),
    ("sd1", ["bool"], 1, "--embedding bool.safetensors holds bool values"),
    ("sd1", ["3d"], 1, "--embedding 3d.safetensors holds a tensor of shape (1, 2, 32); an embedding is one vector or"),
    ("sd1", ["empty"], 1, "--embedding empty.safetensors holds a tensor of shape (0, 32)"),
    ("sd1", ["empty1d"], 1, "--embedding empty1d.safetensors holds a tensor of shape (1, 0)"),
    ("sd1", ["narrow"], 1, "--embedding narrow.safetensors is 16 wide but this model's text encoder takes 32"),
    ("sdxl", ["xl-counts"], 1, "--embedding xlc.safetensors holds 2 clip_l vectors but 3 clip_g ones"),
    ("sdxl", ["xl-nan"], 1, "--embedding xlnan.safetensors clip_g holds NaN or infinite values"),
    ("sdxl", ["xl-narrow-g"], 1, "--embedding xlg.safetensors clip_g is 8 wide but this model's text encoder takes 32"),
    ("sd1", ["zz", "zz_1"], 2, "the tokens 'zz' (zz.safetensors) and 'zz_1' (zz_1.safetensors) collide"),
    ("sd1", ["zz_1", "zz"], 2, "the tokens 'zz_1' (zz_1.safetensors) and 'zz' (zz.safetensors) collide"),
    ("sd1", ["zq", "zq_2"], 2, "the tokens 'zq' (zq.safetensors) and 'zq_2' (zq_2.safetensors) collide"),
    ("sdxl", ["xl", "zq_1", "zq"], 2, "'zq_1' (zq_1.safetensors) and 'zq' (zq.safetensors) collide"),
    # On SD3 and Flux, the family table (`sdcli.generation.applies`) refuses any embedding as an option that
    # does not apply there (exit 2), naming the file and the model, never SDXL.
    ("sd3", ["xl"], 2, "--embedding: xl.safetensors: textual-inversion embeddings need a Stable Diffusion 1.x, 2.x "
                       "or XL model, whose CLIP encoders sdcli loads them into; StableDiffusion3Pipeline reads"),
    ("sd3", ["ok"], 2, "--embedding: ok.safetensors: textual-inversion embeddings need a Stable Diffusion 1.x"),
    ("flux", ["xl"], 2, "--embedding: xl.safetensors: textual-inversion embeddings need a Stable Diffusion 1.x, 2.x "
                        "or XL model, whose CLIP encoders sdcli loads them into; FluxPipeline reads"),
    ("flux-schnell", ["ok"], 2, "--embedding: ok.safetensors: textual-inversion embeddings need"),
])
def test_embeddings_no_text_encoder_can_take_are_refused_before_loading(
        cli, tiny_models, tiny_flow_models, tmp_path, monkeypatch, model, names, code, message):
    import sdcli.pipeline

    def no_loading(*_args, **_kwargs):
        raise AssertionError("the model loaded before the embedding was refused")

    monkeypatch.setattr(sdcli.pipeline, "load_pipeline", no_loading)
    files = embedding_files(tmp_path)
    args = [a for n in names for a in ("--embedding", files[n])]
    path = {**tiny_models, **tiny_flow_models}[model]
    result = cli("generate", "a ok circle", "--model", path, "--steps", "1", "--seed", "1", *args,
                 "--out", tmp_path / "out")
    line = one_error_line(result, code)
    assert message in line, line
    assert "SDXL" not in line or model in ("sd1", "sdxl")  # an SD3 or Flux model is named as itself
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family, name", [("sd1", "nan"), ("sd1", "3d"), ("sdxl", "xl-counts"), ("sd1", "narrow")])
def test_loading_refuses_the_same_embeddings_on_its_own(pipelines, tmp_path, family, name):
    """The library call checks what plan checked, for callers that load embeddings themselves."""
    from sdcli.generation.embeddings import load_embeddings
    from sdcli.errors import SdcliError

    path = embedding_files(tmp_path)[name]
    with pytest.raises(SdcliError, match=r"--embedding \w+\.safetensors"):
        load_embeddings(pipelines[family].pipe, [(path, "tok" + name.replace("-", ""))], False)


@pytest.mark.parametrize("value", ["abc", 3, [["a", "b"]], [{"path": 1, "token": "t"}], [{"token": "t"}],
                                   {"path": "x", "token": "t"}, [{"path": "x", "token": None}]])
def test_a_records_embeddings_of_the_wrong_shape_are_one_line(value):
    from sdcli.generation.embeddings import embeddings_from_record
    from sdcli.errors import DataError

    with pytest.raises(DataError, match="the record's embeddings are not a list of"):
        embeddings_from_record(value)


def test_unbalanced_brackets_warn_and_still_generate(cli, tiny_sd, tmp_path):
    result = cli("generate", "a (red circle", "--model", tiny_sd, "--steps", "1", "--seed", "1", "-n", "blue]")
    assert result.exit_code == 0, result.stderr
    assert "unbalanced brackets in 'a (red circle'" in result.stderr
    assert "unbalanced brackets in 'blue]'" in result.stderr
    quiet = cli("generate", "a (red circle", "--model", tiny_sd, "--steps", "1", "--seed", "1", "-q")
    assert quiet.exit_code == 0 and "unbalanced" not in quiet.stderr
