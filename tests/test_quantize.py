"""Big models on small cards (`sdcli.quantize`): what runs on the CPU runs here, on tiny pipelines; what needs CUDA is
refused in one line before anything loads (its GPU tests are in tests/test_gpu.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import one_error_line

ARGS = ("--steps", "2", "-W", "16", "-H", "16", "--seed", "1")


def _made(result):
    assert result.exit_code == 0, result.stderr
    path = result.stdout.split()[-1]
    return np.asarray(Image.open(path), np.int16), json.loads(Image.open(path).info["sdcli"]), path


@pytest.fixture(scope="module")
def flux(tiny_flow_models):
    return tiny_flow_models["flux"]


@pytest.fixture(scope="module")
def plain(flux, tmp_path_factory):
    """The unquantized image every mode is compared with."""
    from typer.testing import CliRunner

    from sdcli.cli import app

    out = tmp_path_factory.mktemp("plain") / "plain.png"
    result = CliRunner().invoke(app, ["generate", "a red circle", "-m", flux, *ARGS, "-o", str(out)])
    return _made(result)[0]


@pytest.fixture(scope="module")
def ggufs(flux, tiny_models, tmp_path_factory):
    pytest.importorskip("gguf")
    from sdcli.testing import save_tiny_gguf

    root = tmp_path_factory.mktemp("gguf")
    files = {q: save_tiny_gguf(flux, root / f"flux-{q}.gguf", q) for q in ("Q8_0", "Q4_0")}
    files["sd"] = save_tiny_gguf(tiny_models["sd1"], root / "sd.gguf", "Q8_0", denoiser="unet")
    whole = files["Q8_0"].read_bytes()
    files["truncated"] = root / "cut.gguf"
    files["truncated"].write_bytes(whole[: len(whole) * 2 // 3])
    return files


# 1. Modes that run on the CPU ---------------------------------------------------------------------------------


def test_int8_weight_quantizes_the_denoiser_records_the_backend_and_replays(cli, flux, plain, tmp_path):
    pytest.importorskip("torchao")
    from sdcli.generation import Engine, Settings

    image, record, path = _made(cli("generate", "a red circle", "-m", flux, *ARGS, "--quantize", "int8", "-o",
                                    tmp_path / "q.png"))
    # The device picks the backend: torchao's weight-only int8 on the CPU; the record names it for a replay.
    assert record["quantize"] == "torchao:int8-weight"
    assert "Quantization: torchao:int8-weight" in Image.open(path).info["parameters"]
    assert 0 < np.abs(image - plain).max() <= 24  # rounded weights, the same picture
    again, _, _ = _made(cli("generate", "--from-metadata", path, "-o", tmp_path / "r.png"))
    assert np.array_equal(again, image)
    engine = Engine.load(Settings(model=flux, quantize="int8-weight"))
    q = engine.pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert "Int8" in type(q).__name__
    assert type(engine.pipe.text_encoder_2.shared.weight).__name__ == "Parameter"  # text encoders untouched


def test_quantize_text_encoder_quantizes_t5_too(flux):
    pytest.importorskip("torchao")
    from sdcli.generation import Engine, Settings

    engine = Engine.load(Settings(model=flux, quantize="torchao:int8-weight", quantize_text_encoder=True))
    t5 = engine.pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight
    assert "Int8" in type(t5).__name__
    assert engine.generate("a red circle", seeds=[1], steps=1, width=16, height=16)[0].image.size == (16, 16)


@pytest.mark.parametrize("qtype,tolerance", [("Q8_0", 12), ("Q4_0", 60)])
def test_gguf_transformer_beside_a_base_folder_runs_on_the_cpu(cli, flux, plain, ggufs, qtype, tolerance, tmp_path):
    image, record, _ = _made(cli("generate", "a red circle", "-m", flux, *ARGS, "--transformer", ggufs[qtype],
                                 "-o", tmp_path / "g.png"))
    assert record["denoiser_file"] == str(ggufs[qtype])
    assert 0 < np.abs(image - plain).max() <= tolerance


def test_storage_dtype_float8_stores_the_weights_in_float8(cli, flux, plain, tmp_path):
    import torch

    from sdcli.generation import Engine, Settings

    engine = Engine.load(Settings(model=flux, storage_dtype="float8"))
    assert engine.pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    image, record, _ = _made(cli("generate", "a red circle", "-m", flux, *ARGS, "--storage-dtype", "float8", "-o",
                                 tmp_path / "s.png"))
    assert record["storage_dtype"] == "float8"
    assert 0 < np.abs(image - plain).max() <= 40


@pytest.mark.parametrize("cache,at_most", [("first-block:0.5", 4), ("taylorseer", 6), ("mag", 6)])
def test_cache_skips_denoiser_work_and_is_undone_after_the_request(flux, cache, at_most):
    """Each cache runs fewer of the last block's layers than steps, changes the image a little, and leaves the
    engine as it found it: the next uncached request is the first one's image again."""
    from sdcli.generation import Engine, Settings

    engine = Engine.load(Settings(model=flux))
    layer = engine.pipe.transformer.single_transformer_blocks[-1].attn.to_q
    calls = []
    layer.register_forward_hook(lambda *a: calls.append(1))

    def image(**kw):
        calls.clear()
        made = engine.generate("a red circle", seeds=[1], steps=8, width=16, height=16, **kw)[0]
        return np.asarray(made.image, np.int16), len(calls), made.record

    plain, full, _ = image()
    cached, ran, record = image(step_cache=cache)
    assert full == 8 and ran <= at_most
    assert record["step_cache"] == cache
    assert 0 < np.abs(cached - plain).mean() < 40
    assert np.array_equal(image()[0], plain) and engine.pipe.transformer._cache_config is None


def test_cache_is_recorded_and_replayed(cli, flux, tmp_path):
    image, record, path = _made(cli("generate", "a red circle", "-m", flux, *ARGS, "--cache", "first-block:0.5",
                                    "-o", tmp_path / "c.png"))
    assert record["step_cache"] == "first-block:0.5"
    assert np.array_equal(_made(cli("generate", "--from-metadata", path, "-o", tmp_path / "r.png"))[0], image)


# 2. What cannot run here, one line each, nothing loaded ----------------------------------------------------


@pytest.mark.parametrize("extra,words", [
    (("--quantize", "int9"), "--quantize int9: unknown quantization"),
    (("--quantize", "gptq:int4"), "--quantize gptq:int4: unknown quantization"),
    (("--quantize", "nf4"), "--quantize nf4: bitsandbytes's nf4 needs a CUDA GPU"),
    (("--quantize", "fp8"), "--quantize fp8: torchao's fp8 needs a CUDA GPU"),
    (("--quantize", "torchao:int4-weight"), "int4-weight needs a CUDA GPU"),
    (("--quantize", "bitsandbytes:int8"), "bitsandbytes's int8 needs a CUDA GPU"),
    (("--offload", "group"), "--offload group needs a CUDA device"),
    (("--offload", "sequential"), "--offload sequential needs a CUDA device"),
    (("--quantize-text-encoder",), "--quantize-text-encoder needs --quantize"),
    (("--quantize", "int8", "--storage-dtype", "float8"), "--storage-dtype float8 with --quantize"),
    (("--cache", "first-block:2"), "--cache first-block:2: the threshold must be"),
    (("--cache", "teacache"), "--cache teacache: unknown cache"),
])
def test_modes_that_cannot_run_are_refused_before_loading(cli, flux, no_pipeline_loads, extra, words):
    line = one_error_line(cli("generate", "a red circle", "-m", flux, *ARGS, *extra), 2)
    assert words in line and not no_pipeline_loads


def test_a_cache_on_a_family_without_one_is_refused(cli, tiny_sd, no_pipeline_loads):
    line = one_error_line(cli("generate", "a", "-m", tiny_sd, *ARGS, "--cache", "mag"), 2)
    assert "--cache mag" in line and "no step cache" in line and not no_pipeline_loads


def test_a_missing_backend_is_named_with_its_install_line(cli, flux, monkeypatch, no_pipeline_loads):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    line = one_error_line(cli("generate", "a", "-m", flux, *ARGS, "--quantize", "int8-weight"), 2)
    assert "needs torchao" in line and "pip install torchao" in line and not no_pipeline_loads


@pytest.mark.parametrize("which,flag,words", [
    ("sd", "--transformer", "holds a unet of the sd family, and --model"),
    ("truncated", "--transformer", "truncated"),
])
def test_a_gguf_that_does_not_fit_is_refused_before_loading(cli, flux, ggufs, no_pipeline_loads, which, flag, words):
    line = one_error_line(cli("generate", "a", "-m", flux, *ARGS, flag, ggufs[which]))
    assert f"{flag} {ggufs[which]}" in line and words in line and not no_pipeline_loads


def test_a_flux_gguf_as_the_unet_of_an_sd_model_is_refused(cli, tiny_sd, ggufs, no_pipeline_loads):
    line = one_error_line(cli("generate", "a", "-m", tiny_sd, *ARGS, "--unet", ggufs["Q8_0"]))
    assert "--unet" in line and "transformer of the flux family" in line and not no_pipeline_loads


def test_a_gguf_as_the_model_needs_its_pipeline_from_the_hub(cli, ggufs):
    """Offline, with its base pipeline not cached: one line saying to give the base folder and the file apart."""
    line = one_error_line(cli("generate", "a", "-m", ggufs["Q8_0"], *ARGS))
    assert "holds only the transformer" in line and "--transformer" in line


# 3. The modes' own arithmetic ----------------------------------------------------------------------------------


@pytest.mark.parametrize("typed,device,runs", [
    ("int8", "cpu", "torchao:int8-weight"),
    ("int8", "cuda", "bitsandbytes:int8"),
    ("nf4", "cpu", "bitsandbytes:nf4"),
    ("torchao:int8", "cuda", "torchao:int8-weight"),
    ("FP8", "cuda", "torchao:fp8"),
])
def test_the_backend_is_the_devices_unless_named(typed, device, runs):
    from sdcli.quantize import canonical

    assert canonical(typed, device) == runs
