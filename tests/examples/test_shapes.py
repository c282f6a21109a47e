"""The shapes world behind the bundled model: dataset, evaluator, tokenizer, VAE script, pipeline builder."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.shapes import build_pipeline, dataset, evaluate, probe_vae, shape_classifier, tokenizer, train_vae  # noqa: E402


@pytest.fixture(scope="module")
def samples():
    # Seed 1 trained the evaluator's shape classifier; score it on other images.
    return dataset.make_dataset(400, seed=7)


def _pixels(image):
    return image.tobytes()


# -- dataset -------------------------------------------------------------------------------------------------

def test_dataset_is_deterministic_by_seed():
    a, b, c = dataset.make_dataset(12, seed=3), dataset.make_dataset(12, seed=3), dataset.make_dataset(12, seed=4)
    assert [(_pixels(i), t) for i, t, _ in a] == [(_pixels(i), t) for i, t, _ in b]
    assert [_pixels(i) for i, _, _ in a] != [_pixels(i) for i, _, _ in c]


def test_dataset_covers_every_attribute_and_captions_say_what_is_drawn(samples):
    assert len(dataset.COLORS) >= 6 and len(dataset.SHAPES) == 4 and len(dataset.SIZES) == 2
    seen = {attr: {a[attr] for _, _, a in samples} for attr in dataset.ATTRIBUTES}
    assert seen == {
        "color": set(dataset.COLORS), "shape": set(dataset.SHAPES), "size": set(dataset.SIZES),
        "position": set(dataset.POSITIONS), "background": set(dataset.BACKGROUNDS),
    }
    for image, text, attrs in samples:
        assert image.size == (64, 64) and image.mode == "RGB"
        assert attrs["color"] != attrs["background"]
        assert text == dataset.caption(attrs)
    assert dataset.caption(samples[0][2]).startswith(f"a {samples[0][2]['size']} {samples[0][2]['color']} ")


def test_caption_noise_changes_only_captions_at_the_asked_rate():
    rate, n = 0.1, 3000
    clean, noisy = dataset.make_dataset(n, seed=2), dataset.make_dataset(n, seed=2, caption_noise=rate)
    assert [(_pixels(i), a) for i, _, a in clean] == [(_pixels(i), a) for i, _, a in noisy]
    wrong = {attr: 0 for attr in ("color", "shape", "size", "position", "background")}
    for _, text, attrs in noisy:
        said = evaluate.parse_prompt(text)
        assert said["color"] != said["background"]  # never "a white square on a white background"
        for attr in wrong:
            wrong[attr] += said[attr] != attrs[attr]
    assert wrong["background"] == 0  # named wrong only when asked
    for attr in dataset.NOISY:
        assert abs(wrong[attr] / n - rate) < 0.02, (attr, wrong[attr] / n)  # ~5 standard errors
    # Asked to, the background is named wrong too, never as the colour the caption names.
    also = dataset.make_dataset(n, seed=2, caption_noise=rate, noisy=(*dataset.NOISY, "background"))
    assert [(_pixels(i), a) for i, _, a in also] == [(_pixels(i), a) for i, _, a in clean]
    wrong = dict.fromkeys(wrong, 0)
    for _, text, attrs in also:
        said = evaluate.parse_prompt(text)
        assert said["color"] != said["background"]
        for attr in wrong:
            wrong[attr] += said[attr] != attrs[attr]
    for attr in wrong:
        assert abs(wrong[attr] / n - rate) < 0.02, (attr, wrong[attr] / n)


def said(text: str) -> dict[str, str]:
    """What a caption names, read by the evaluator's prompt parser."""
    return {k: v for k, v in evaluate.parse_prompt(text).items() if v is not None}


def test_partial_captions_leave_attributes_out_at_the_asked_rate_in_the_grammars_order():
    rate, n = 0.3, 3000
    full, partial = dataset.make_dataset(n, seed=2), dataset.make_dataset(n, seed=2, partial=rate)
    assert [(_pixels(i), a) for i, _, a in full] == [(_pixels(i), a) for i, _, a in partial]
    left_out = dict.fromkeys(dataset.OPTIONAL, 0)
    for (_, text, attrs), (_, whole, _) in zip(partial, full):
        named = said(text)
        assert named["shape"] == attrs["shape"]  # the noun is always there
        assert all(attrs[k] == v for k, v in named.items())  # no noise asked: what is named is what is drawn
        assert dataset.caption(named) == text
        words = iter(whole.split())
        assert all(word in words for word in text.split())  # the full caption's words, in its order
        for attr in left_out:
            left_out[attr] += attr not in named
    for attr, count in left_out.items():
        assert abs(count / n - rate) < 0.03, (attr, count / n)
    # Noise and omissions draw from their own streams: together, what is named is what the noisy caption says.
    noisy = dataset.make_dataset(200, seed=2, caption_noise=0.2)
    both = dataset.make_dataset(200, seed=2, caption_noise=0.2, partial=rate)
    for (_, noisy_text, _), (_, text, _) in zip(noisy, both):
        assert said(text).items() <= said(noisy_text).items()
    assert evaluate.parse_prompt("a red circle") == {**dict.fromkeys(evaluate.SCORED), "color": "red", "shape": "circle"}


def test_evaluator_scores_a_noisy_dataset_folder_against_what_is_drawn(tmp_path):
    dataset.write_dataset(tmp_path, 60, seed=4, caption_noise=0.5)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["caption_noise"] == 0.5 and meta["captions_with_a_wrong_word"] > 30
    accuracy = evaluate.evaluate_folder(tmp_path)["accuracy"]
    assert all(a >= 0.98 for a in accuracy.values()), accuracy
    _, captions = train_vae.load_images(tmp_path)  # the autoencoder's held-out score uses the truth too
    assert captions == [t for _, t, _ in dataset.make_dataset(60, seed=4)]


def test_dataset_cli_writes_an_imagefolder(tmp_path):
    assert dataset.main(["--out", str(tmp_path), "--n", "3", "--seed", "5"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == ["00000.png", "00001.png", "00002.png"]
    assert [r["text"] for r in rows] == [t for _, t, _ in dataset.make_dataset(3, seed=5)]
    assert all((tmp_path / r["file_name"]).is_file() for r in rows)


# -- evaluator -----------------------------------------------------------------------------------------------

def test_parse_prompt():
    assert evaluate.parse_prompt("a large red circle in the top left corner on a black background") == {
        "color": "red", "shape": "circle", "size": "large", "position": "top left", "background": "black"}
    # The background's colour is not the shape's, even when it comes first; unnamed attributes are None.
    assert evaluate.parse_prompt("On a WHITE background, a yellow star, centre") == {
        "color": "yellow", "shape": "star", "size": None, "position": "center", "background": "white"}
    assert evaluate.parse_prompt("a cat") == dict.fromkeys(evaluate.SCORED)


def test_every_position_and_colour_reads_back_from_its_caption():
    # Edge positions ("at the top", "on the left") must not be read as a corner or lost to the background's "on".
    for i, position in enumerate(dataset.POSITIONS):
        for color in dataset.COLORS:
            attrs = {"size": "small", "color": color, "shape": dataset.SHAPES[i % 4], "position": position,
                     "background": "white" if color != "white" else "black"}
            assert evaluate.parse_prompt(dataset.caption(attrs)) == attrs


def test_evaluator_reads_the_datasets_own_images(samples):
    report = evaluate.score((image, text) for image, text, _ in samples)
    assert report["n"] == len(samples)
    assert set(report["accuracy"]) == set(evaluate.SCORED)
    for attr, accuracy in report["accuracy"].items():
        assert accuracy >= 0.98, (attr, accuracy)


def test_evaluator_reads_blurred_noisy_images_too(samples):
    # Generations are softer than the data; the evaluator must not blame the model for that.
    import numpy as np

    rng = np.random.default_rng(0)
    blurred = [(shape_classifier.degrade(image, rng, blur=1.0, noise=10.0), text) for image, text, _ in samples[:150]]
    for attr, accuracy in evaluate.score(blurred)["accuracy"].items():
        assert accuracy >= 0.98, (attr, accuracy)


def test_shape_classifier_trains_from_the_generator():
    model = shape_classifier.train(n=24, seed=3, iterations=200)
    assert model["classes"] == list(dataset.SHAPES)
    assert len(model["weights"]) == shape_classifier.SIDE**2 + 1 and len(model["weights"][0]) == len(dataset.SHAPES)
    assert model["train_accuracy"] > 0.9


def test_evaluator_finds_no_shape_in_a_blank_image():
    from PIL import Image

    got = evaluate.analyse(Image.new("RGB", (64, 64), (128, 128, 128)))
    assert got["background"] == "gray" and got["color"] is None and got["shape"] is None


def test_diversity_is_zero_for_identical_images_and_positive_otherwise(samples):
    image = samples[0][0]
    assert evaluate.diversity([image, image.copy(), image.copy()]) == 0.0
    assert evaluate.diversity([image, samples[1][0]]) > 0.0
    assert evaluate.diversity([image]) is None
    # One prompt drawn with jitter varies a little; a different prompt varies more.
    attrs = samples[0][2]
    rng = random.Random(0)
    same = [dataset.render(attrs, rng) for _ in range(4)]
    assert 0 < evaluate.diversity(same) < evaluate.diversity([same[0], *(i for i, _, _ in samples[1:4])])


def _write_like_sdcli(path: Path, image, prompt: str, seed: int, guidance: float) -> None:
    from sdcli.generation.metadata import pnginfo

    record = {"prompt": prompt, "negative_prompt": "", "steps": 25, "sampler": "DDIM", "guidance": guidance,
              "seed": seed, "width": 64, "height": 64, "model_name": "shapes", "sdcli_version": "0"}
    image.save(path, pnginfo=pnginfo(record))


def test_prompt_and_seed_come_from_the_png_parameters_chunk(tmp_path, samples):
    image, text, _ = samples[0]
    _write_like_sdcli(tmp_path / "a.png", image, text, seed=42, guidance=7.5)
    got = evaluate.read_parameters(tmp_path / "a.png")
    assert (got["prompt"], got["seed"], got["guidance"]) == (text, 42, 7.5)
    image.save(tmp_path / "plain.png")
    assert evaluate.read_parameters(tmp_path / "plain.png") is None


def test_evaluate_folder_groups_by_guidance(tmp_path, samples):
    for i, (image, text, _) in enumerate(samples[:6]):
        _write_like_sdcli(tmp_path / f"{i}.png", image, text, seed=i, guidance=(1.0, 7.5)[i % 2])
    report = evaluate.evaluate_folder(tmp_path)
    assert report["n"] == 6 and set(report["by_guidance"]) == {"1", "7.5"}
    assert all(a == 1.0 for a in report["accuracy"].values())
    table = evaluate.markdown_table(report)
    assert table.count("\n") == 3 and "| 7.5 | 3 |" in table


# -- tokenizer -----------------------------------------------------------------------------------------------

def test_tokenizer_keeps_caption_words_whole(tmp_path, samples):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer.build_tokenizer(tmp_path / "tok")))
    assert tok.model_max_length == tokenizer.MAX_LENGTH
    for word in dataset.caption_words():
        assert tok.tokenize(word) == [word + "</w>"]
    for _, text, _ in samples[:20]:
        ids = tok(text, truncation=True).input_ids
        assert len(ids) == len(text.split()) + 2 <= tok.model_max_length  # nothing truncated
        assert tok.decode(ids, skip_special_tokens=True).strip() == text
    assert len(tok.tokenize("a magenta hexagon")) > 3  # unknown words still tokenize, byte by byte


# -- VAE script and pipeline ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    """Two optimiser steps: enough to check the script's outputs, not the training."""
    import torch

    images, captions = train_vae.generate_images(12, seed=0)
    out = tmp_path_factory.mktemp("vae")
    threads = torch.get_num_threads()  # one thread: two fight over a shared machine's cores
    try:
        _, record = train_vae.train(out, images, captions, steps=2, batch_size=2, log_every=1, held_out=4, threads=1)
    finally:
        torch.set_num_threads(threads)
    return out, record


def test_train_vae_saves_a_scaled_autoencoder(trained_vae):
    from diffusers import AutoencoderKL

    out, record = trained_vae
    vae = AutoencoderKL.from_pretrained(str(out))
    assert vae.config.scaling_factor == pytest.approx(1 / record["latents"]["std"])
    assert vae.config.scaling_factor != AutoencoderKL().config.scaling_factor
    assert (out / "reconstructions.png").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    saved = json.loads((out / "training.json").read_text())
    assert saved["settings"]["steps"] == 2 and saved["held_out_mse_before"] > 0
    assert set(saved["held_out_reconstruction_accuracy"]) == set(evaluate.SCORED)


def test_probe_vae_prints_a_row_per_background_and_refuses_a_folder_without_one(trained_vae, tmp_path, capsys):
    import torch

    out, _ = trained_vae
    threads = torch.get_num_threads()
    try:
        assert probe_vae.main([str(out), "--shape", "square", "--per-pair", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    table = capsys.readouterr().out
    rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines() if line.startswith("| ")]
    assert rows == ["background", *dataset.BACKGROUNDS]
    assert "mean over 23 pairs" in table
    assert probe_vae.main([str(tmp_path)]) == 1
    assert "no autoencoder" in capsys.readouterr().err


def test_build_pipeline_is_loadable_and_small(tmp_path, trained_vae):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = build_pipeline.build_pipeline(trained_vae[0], tokenizer.build_tokenizer(tmp_path / "tok"))
    pipe.save_pretrained(str(tmp_path / "pipe"), safe_serialization=True)
    assert build_pipeline.safetensors_mb(tmp_path / "pipe") <= build_pipeline.SIZE_LIMIT_MB
    loaded = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"))
    config = loaded.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == ("v_prediction", True, "trailing")
    loaded.set_progress_bar_config(disable=True)
    latents = loaded("a small green square in the center on a gray background", num_inference_steps=2,
                     height=64, width=64, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all()


def test_build_pipeline_token_std_makes_the_text_encoder_read_a_word_alike_in_any_caption(tmp_path, trained_vae):
    # --token-std 0.6 (the second partial-caption attempt): "circle" in a short prompt and in a full caption
    # alike, "circle" and "star" in the same place apart. CLIP's own init, the default, does neither.
    import torch

    def similarities(token_std):
        pipe = build_pipeline.build_pipeline(trained_vae[0], tokenizer.build_tokenizer(tmp_path / "tok"),
                                             token_std=token_std)
        tok, encoder = pipe.tokenizer, pipe.text_encoder.eval()

        def state(prompt, word):
            ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
            with torch.no_grad():
                hidden = encoder(ids)[0][0]
            return hidden[ids[0].tolist().index(tok.convert_tokens_to_ids(word + "</w>"))]

        full = "a large red circle in the top left corner on a black background"
        cos = torch.nn.functional.cosine_similarity
        return (float(cos(state("a circle", "circle"), state(full, "circle"), dim=0)),
                float(cos(state("a red circle", "circle"), state("a red star", "star"), dim=0)))

    across_contexts, across_shapes = similarities(0.6)
    assert across_contexts > 0.9 and across_shapes < 0.6, (across_contexts, across_shapes)
    default_contexts, default_shapes = similarities(None)
    assert default_contexts < across_contexts and default_shapes > 0.8, (default_contexts, default_shapes)


def test_build_pipeline_rejects_a_vae_with_other_latents(tmp_path):
    from diffusers import AutoencoderKL

    # One downsampling: 64 px images would make 32x32 latents.
    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=64).save_pretrained(str(tmp_path / "vae"))
    with pytest.raises(ValueError, match="UNet expects 4x16x16"):
        build_pipeline.build_pipeline(tmp_path / "vae", tokenizer.build_tokenizer(tmp_path / "tok"))


@pytest.mark.slow
def test_recipe_rebuilds_a_loadable_pipeline_end_to_end(tmp_path):
    # The bundled model's whole recipe at toy sizes: every step runs, in order, and hands the next what it needs.
    import os
    import subprocess

    env = {**os.environ, "N": "80", "HELD_OUT": "16", "VAE_STEPS": "2", "UNET_STEPS": "2", "TABLE": "0", "THREADS": "1",
           "OMP_NUM_THREADS": "1"}  # the rest (partial captions, edge weight 30, the floored loss) as the shipped recipe
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's python and sdcli
    res = subprocess.run(["bash", str(ROOT / "examples/shapes/recipe.sh"), str(tmp_path / "shapes")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    model = Path(res.stdout.strip().splitlines()[-1])
    assert model == tmp_path / "shapes" / "model"
    settings = json.loads((model / "training_settings.json").read_text())
    assert (settings["method"], settings["steps"], settings["config"]["debiased_loss"],
            settings["config"]["debiased_snr_floor"]) == ("full", 2, True, 0.0083)
    vae_runs = [json.loads((tmp_path / "shapes" / v / "training.json").read_text())["settings"] for v in ("vae3", "vae")]
    assert [(r["edge_weight"], r["lr"]) for r in vae_runs] == [(10, 5e-4), (30, 2.5e-4)]  # LAST_EDGE: the last run only
    rows = (tmp_path / "shapes" / "data" / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == 80
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(model / "tokenizer"))
    assert all(tok.tokenize(w) == [w + "</w>"] for w in ("orange", "pink", "bottom", "corner"))
