"""`sdcli inspect-schedule` through the real CLI: formats, files, pictures, and one-line errors."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import pytest
from PIL import Image
from conftest import OTHER_PIPELINES, as_other_pipeline, one_error_line, strict_json


@pytest.fixture
def photo(tmp_path) -> Path:
    """A small real picture: a flat sky, an orange disc and a green square."""
    from PIL import ImageDraw

    img = Image.new("RGB", (96, 64), (135, 206, 235))
    draw = ImageDraw.Draw(img)
    draw.ellipse((8, 8, 48, 48), fill=(255, 165, 0))
    draw.rectangle((56, 24, 90, 60), fill=(0, 100, 0))
    path = tmp_path / "photo.jpg"
    img.save(path, quality=95)
    return path


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def test_table_for_stable_diffusion(cli):
    result = ok(cli("inspect-schedule", "--preset", "stable-diffusion", "--at", "0,500,999"))
    out = result.stdout
    assert "scaled_linear β 0.00085→0.012" in out
    for header in ("β_t", "1−β_t", "ᾱ_t", "α_t=√ᾱ_t", "σ_t=√(1−ᾱ_t)", "SNR", "log-SNR"):
        assert header in out
    assert "0.004660" in out  # ᾱ_999
    assert "terminal SNR (t=999): 0.004682" in out
    assert "α 0.0683   σ 0.9977" in out  # the terminal signal and noise scales
    assert "starts at 961, not T−1=999" in out
    assert "warning:" in result.stderr and "--rescale-zero-snr" in result.stderr
    assert "warning" not in out  # chatter stays off stdout


def test_quiet_keeps_stderr_empty(cli):
    result = ok(cli("inspect-schedule", "--preset", "stable-diffusion", "--quiet"))
    assert result.stderr == ""


def test_json_is_strict_and_has_the_documented_keys(cli):
    result = ok(cli("inspect-schedule", "--preset", "stable-diffusion", "--rescale-zero-snr",
                    "--prediction-type", "v_prediction", "--timestep-spacing", "trailing", "--scheduler", "ddim",
                    "--format", "json", "--every", "250", "--steps", "4"))
    doc = strict_json(result.stdout)
    assert {"config", "family", "terminal_snr", "terminal_signal_scale", "terminal_noise_scale", "sampling_timesteps",
            "rows"} <= set(doc)
    assert doc["family"] == "ddpm" and doc["terminal_signal_scale"] == 0.0 and doc["terminal_noise_scale"] == 1.0
    assert doc["config"]["_class_name"] == "DDIMScheduler"
    assert doc["config"]["rescale_betas_zero_snr"] is True and doc["config"]["timestep_spacing"] == "trailing"
    assert doc["terminal_snr"] == 0.0 and doc["terminal_log_snr"] is None
    assert doc["sampling_timesteps"] == [999, 749, 499, 249] and doc["first_timestep_is_terminal"]
    assert [r["t"] for r in doc["rows"]] == [0, 250, 500, 750, 999]
    last = doc["rows"][-1]
    assert last["snr"] == 0.0 and last["log_snr"] is None and last["beta"] == 1.0
    for r in doc["rows"][:-1]:
        assert {"t", "beta", "alpha_bar", "snr", "log_snr"} <= set(r)
        assert r["log_snr"] == pytest.approx(math.log(r["alpha_bar"] / (1 - r["alpha_bar"])))
    for r in doc["rows"]:  # DDPM: the (α, σ) core is √ᾱ and √(1−ᾱ), and α² + σ² = 1
        assert r["signal_scale"] == r["sqrt_alpha_bar"] and r["noise_scale"] == r["sqrt_one_minus_alpha_bar"]
        assert r["signal_scale"] ** 2 + r["noise_scale"] ** 2 == pytest.approx(1.0, abs=1e-12)
    assert last["signal_scale"] == 0.0 and last["noise_scale"] == 1.0
    assert doc["warnings"] == []


@pytest.mark.parametrize("args", [["--preset", "sdxl", "--scheduler", "Euler a", "--steps", "3"],
                                  ["--preset", "list"], ["--scheduler", "list"]])
def test_json_is_format_json_as_the_other_commands_spell_it(cli, args):
    as_json = ok(cli("inspect-schedule", *args, "--json")).stdout
    assert as_json == ok(cli("inspect-schedule", *args, "--format", "json", "--json")).stdout
    assert as_json == ok(cli("inspect-schedule", *args, "--format", "json")).stdout
    strict_json(as_json)


def test_csv_round_trips_minus_infinity(cli):
    result = ok(cli("inspect-schedule", "--preset", "zero-snr", "--format", "csv", "--at", "0,999"))
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["t"] for r in rows] == ["0", "999"]
    assert float(rows[1]["log_snr"]) == -math.inf and float(rows[1]["snr"]) == 0.0
    assert float(rows[0]["beta"]) == pytest.approx(0.00085, rel=1e-3)  # rescaling moves it a hair
    # the columns scripts read before stay in place; the (α, σ) core comes after them
    assert list(rows[0])[:9] == ["schedule", "t", "beta", "alpha", "alpha_bar", "sqrt_alpha_bar",
                                 "sqrt_one_minus_alpha_bar", "snr", "log_snr"]
    for r in rows:
        assert r["signal_scale"] == r["sqrt_alpha_bar"] and r["noise_scale"] == r["sqrt_one_minus_alpha_bar"]
        assert float(r["signal_scale"]) ** 2 + float(r["noise_scale"]) ** 2 == pytest.approx(1.0, abs=1e-12)
    assert float(rows[1]["signal_scale"]) == 0.0 and float(rows[1]["noise_scale"]) == 1.0


def test_compare_makes_one_table_one_json_and_one_plot(cli):
    names = "stable-diffusion,cosine,ddpm-linear,zero-snr"
    table = ok(cli("inspect-schedule", "--compare", names, "--at", "0,999", "-q")).stdout
    assert all(f"{n}: " in table for n in names.split(","))
    doc = strict_json(ok(cli("inspect-schedule", "--compare", names, "--format", "json", "--plot", "cmp.png",
                             "-q")).stdout)
    assert [s["name"] for s in doc["schedules"]] == names.split(",")
    snrs = {s["name"]: s["terminal_snr"] for s in doc["schedules"]}
    assert snrs["zero-snr"] == 0.0 < snrs["cosine"] < snrs["ddpm-linear"] < snrs["stable-diffusion"]
    assert doc["outputs"] == {"plot": "cmp.png"}
    assert Path("cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_is_a_real_png_with_provenance_and_is_never_overwritten_silently(cli):
    import os

    umask = os.umask(0o022)
    try:
        result = ok(cli("inspect-schedule", "--preset", "cosine", "--plot", "s.png", "-q"))
    finally:
        os.umask(umask)
    assert Path("s.png").stat().st_mode & 0o777 == 0o644  # not the 0600 of the temporary file
    assert result.stdout.strip().endswith("plot: s.png")
    img = Image.open("s.png")
    img.load()
    assert img.format == "PNG" and img.size[0] > 600 and img.size[1] > 300
    assert len(set(img.convert("L").getdata())) > 20  # lines and text, not a blank canvas
    assert json.loads(img.info["sdcli"])["schedules"][0]["config"]["beta_schedule"] == "squaredcos_cap_v2"
    before = Path("s.png").read_bytes()
    line = one_error_line(cli("inspect-schedule", "--preset", "ddpm-linear", "--plot", "s.png"), 1)
    assert "exists; pass --overwrite" in line
    assert Path("s.png").read_bytes() == before
    ok(cli("inspect-schedule", "--preset", "ddpm-linear", "--plot", "s.png", "--overwrite", "-q"))
    assert Path("s.png").read_bytes() != before
    assert sorted(p.name for p in Path(".").iterdir()) == ["s.png"]  # no temporary files left behind


def test_forward_strip_of_a_picture(cli, photo):
    ok(cli("inspect-schedule", "--compare", "stable-diffusion,cosine", "--image", photo, "--at", "0,250,999",
           "--out", "strip.png", "--size", "64", "--seed", "3", "-q"))
    img = Image.open("strip.png")
    record = json.loads(img.info["sdcli"])
    assert record["timesteps"] == [0, 250, 999] and record["seed"] == 3 and record["latent"] is False
    # the t=0 tile is the picture itself (ᾱ_0 ≈ 0.999): find its orange disc
    rgb = img.convert("RGB")
    orange = sum(1 for r, g, b in rgb.getdata() if r > 200 and 120 < g < 200 and b < 60)
    assert orange > 300
    wide = img.size[0]
    ok(cli("inspect-schedule", "--preset", "cosine", "--image", photo, "--at", "0,100,250,500,750,999",
           "--out", "strip6.png", "--size", "64", "-q"))
    assert Image.open("strip6.png").size[0] > wide  # one column per timestep


def test_plot_and_strip_read_only_the_alpha_sigma_core(tmp_path, photo):
    """A schedule with (α, σ) and nothing else (no DDPMScheduler, no β) still plots and noises a picture."""
    import torch

    from sdcli.schedule import core as sched
    from sdcli.schedule.report import forward_strip, noised, plot

    sigma = torch.linspace(0.0, 1.0, 50, dtype=torch.float64)
    process = sched.ForwardProcess(family="flow", signal_scale=1 - sigma, noise_scale=sigma)
    s = sched.Schedule(label="flow", config={}, process=process, forward=None, sampler=None)
    info = {"sampling_timesteps": [49, 25, 0], "terminal_snr": 0.0, "steps": 3}
    png = plot([s], [info], tmp_path / "flow.png")
    assert Image.open(png).size[0] > 600
    x0 = torch.rand(1, 3, 8, 8) * 2 - 1
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    xt = noised(s, x0, [0, 10, 49], eps)
    expected = torch.cat([(1 - float(sigma[t])) * x0 + float(sigma[t]) * eps for t in (0, 10, 49)])
    torch.testing.assert_close(xt, expected)
    forward_strip([s], photo, [0, 49], tmp_path / "flow_strip.png", size=32)
    tiles = Image.open(tmp_path / "flow_strip.png").convert("RGB")
    assert sum(1 for r, g, b in tiles.getdata() if r > 200 and 120 < g < 200 and b < 60) > 50  # t=0 is the picture


def test_latent_strip_uses_only_the_vae_of_a_tiny_model(cli, photo, tiny_models, monkeypatch):
    import diffusers

    loaded = []
    original = diffusers.DiffusionPipeline.from_pretrained
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained",
                        lambda *a, **k: loaded.append(a) or original(*a, **k))
    result = ok(cli("inspect-schedule", "--model", tiny_models["sd1"], "--latent", "--image", photo,
                    "--at", "0,500,999", "--out", "latent.png", "--size", "32", "--device", "cpu",
                    "--format", "json"))
    doc = strict_json(result.stdout)
    assert doc["outputs"] == {"strip": "latent.png"} and doc["scheduler"] == "PNDMScheduler"
    assert json.loads(Image.open("latent.png").info["sdcli"])["latent"] is True
    assert loaded == []  # no full pipeline load


def test_latent_strip_never_loads_a_pickled_vae(cli, photo, tiny_models, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    model = shutil.copytree(tiny_models["sd1"], tmp_path / "pickled")
    weights = next((model / "vae").glob("*.safetensors"))
    torch.save(load_file(str(weights)), model / "vae" / "diffusion_pytorch_model.bin")  # the same VAE, pickled
    weights.unlink()
    result = cli("inspect-schedule", "--model", model, "--latent", "--image", photo, "--at", "0,999",
                 "--out", "latent.png", "--size", "32", "--device", "cpu")
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "cannot load the VAE" in line and "safetensors" in line.lower()
    assert not Path("latent.png").exists()


def test_latent_encode_decode_shapes(tiny_models, photo):
    import torch

    from sdcli.schedule import core as sched
    from sdcli.schedule.report import decode, encode, load_image, load_vae, noised

    vae = load_vae(tiny_models["sd1"])
    x = load_image(photo, 32)
    assert x.shape == (1, 3, 16, 32) and -1 <= float(x.min()) and float(x.max()) <= 1
    z = encode(vae, x)
    assert z.shape == (1, 4, 8, 16)  # the tiny VAE halves the resolution once
    s = sched.build("sd", sched.preset_config("stable-diffusion"))
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    zt = noised(s, z, [0, 999], eps)
    torch.testing.assert_close(zt, s.forward.add_noise(z.expand(2, -1, -1, -1), eps.expand(2, -1, -1, -1),
                                                       torch.tensor([0, 999])))
    assert decode(vae, zt).shape == (2, 3, 16, 32)


def test_model_schedule_matches_its_scheduler_class(cli, tiny_models):
    from diffusers import DDIMScheduler

    doc = strict_json(ok(cli("inspect-schedule", "--model", tiny_models["sd2"], "--format", "json",
                             "--at", "0,999", "--steps", "5")).stdout)
    reference = DDIMScheduler.from_pretrained(tiny_models["sd2"], subfolder="scheduler")
    assert doc["name"] == "sd2" and doc["prediction_type"] == "v_prediction"
    assert doc["rows"][1]["alpha_bar"] == float(reference.alphas_cumprod[999])
    reference.set_timesteps(5)
    assert doc["sampling_timesteps"] == [int(t) for t in reference.timesteps]


@pytest.mark.parametrize("class_name", OTHER_PIPELINES)
def test_a_flow_schedule_of_a_pipeline_class_of_no_family_is_one_line(cli, tiny_flow_models, tiny_models, tmp_path,
                                                                      class_name):
    # Its resolution-dependent shift depends on the family's latent packing, which sdcli cannot guess.
    folder = as_other_pipeline(tiny_flow_models["flux"], tmp_path / "other", class_name)
    for args in (["--model", folder], ["--compare", f"sd3,{folder}"]):
        line = one_error_line(cli("inspect-schedule", *args, "--format", "json"), 1)
        assert f"{folder} is a {class_name}; sdcli works with Stable Diffusion" in line
    # A β schedule needs nothing of the family: it is the scheduler config's alone, and still shown.
    beta = as_other_pipeline(tiny_models["sd2"], tmp_path / "beta", class_name)
    assert strict_json(ok(cli("inspect-schedule", "--model", beta, "--format", "json")).stdout)["name"] == "beta"


def test_env_model_does_not_fight_an_explicit_preset(cli, tiny_models, monkeypatch):
    monkeypatch.setenv("SDCLI_MODEL", tiny_models["sd2"])
    doc = strict_json(ok(cli("inspect-schedule", "--preset", "cosine", "--format", "json")).stdout)
    assert doc["name"] == "cosine"
    doc = strict_json(ok(cli("inspect-schedule", "--format", "json")).stdout)
    assert doc["name"] == "sd2"


def test_lists(cli):
    presets = ok(cli("inspect-schedule", "--preset", "list")).stdout
    assert all(name in presets for name in ("ddpm-linear", "cosine", "stable-diffusion", "zero-snr"))
    # Each column starts at the same place on every line (sd3's FlowMatchEulerDiscreteScheduler pushed its row out).
    starts = {re.match(r"(\S+\s+)(\S+\s+)", line).span(2) for line in presets.splitlines()}
    assert len(starts) == 1, starts
    assert "dpm++2m-karras" in ok(cli("inspect-schedule", "--scheduler", "list")).stdout
    assert [r["name"] for r in strict_json(ok(cli("inspect-schedule", "--preset", "list", "--format", "json")).stdout)]


@pytest.mark.parametrize("args,code,text", [
    (["--preset", "nope"], 2, "unknown preset 'nope'"),
    (["--preset", "cosine", "--at", "1000"], 2, "--at 1000: outside the training timesteps [0, 1000)"),
    (["--preset", "cosine", "--at", "-5"], 2, "outside"),
    (["--preset", "cosine", "--num-train-timesteps", "100", "--at", "100"], 2, "[0, 100)"),
    (["--preset", "cosine", "--every", "0"], 2, "--every must be at least 1, got 0"),
    (["--preset", "cosine", "--steps", "0"], 2, "--steps 0"),
    (["--preset", "cosine", "--scheduler", "nope"], 2, "unknown scheduler 'nope'"),
    (["--preset", "cosine", "--json", "--format", "csv"], 2, "--json and --format csv ask for two formats"),
    (["--preset", "cosine", "--latent", "--image", "{photo}", "--out", "x.png"], 2, "--latent needs --model"),
    (["--preset", "cosine", "--image", "{photo}"], 2, "--image needs --out"),
    (["--preset", "cosine", "--out", "x.png"], 2, "give --image too"),
    (["--preset", "cosine", "--image", "{bad}", "--out", "x.png"], 1, "not a readable image"),
    (["--preset", "cosine", "--image", "missing.jpg", "--out", "x.png"], 1, "no such file"),
    (["--preset", "cosine", "--plot", "x.gif"], 2, "must end in .png"),
    (["--preset", "cosine", "--beta-start", "2"], 2, "--beta-start must be between 0 and 1, got 2"),
    (["--preset", "cosine", "--beta-end", "0.03"], 2, "--beta-end has no effect on the squaredcos_cap_v2 schedule"),
    (["--preset", "cosine", "--model", "{sd1}"], 2, "pick one"),
    (["--model", "./no/such/model"], 1, "no such model file or folder"),
    (["--model", "{empty}"], 1, "has no scheduler/scheduler_config.json"),
    ([], 2, "no schedule given"),
])
def test_bad_input_is_one_line_and_non_zero(cli, tiny_models, photo, tmp_path, monkeypatch, args, code, text):
    monkeypatch.setattr("sdcli.defaults.default_model", lambda: None)  # as if no bundled model or SDCLI_MODEL
    bad = tmp_path / "bad.jpg"
    bad.write_text("this is not a JPEG")
    (tmp_path / "empty").mkdir()
    values = {"photo": photo, "bad": bad, "sd1": tiny_models["sd1"], "empty": tmp_path / "empty"}
    line = one_error_line(cli("inspect-schedule", *[str(a).format(**values) for a in args]), code)
    assert text in line
    assert not Path("x.png").exists()


# Numbers are refused up front whatever their size or kind: NaN, inf and 1e308 pass every `x > 0` test and
# used to fail late (a NaN table) or not at all (2e9 timesteps: killed by the kernel).
@pytest.mark.parametrize("args,text", [
    (["--preset", "cosine", "--num-train-timesteps", "0"], "--num-train-timesteps must be between 2 and 100000"),
    (["--preset", "cosine", "--num-train-timesteps", "2000000000"], "--num-train-timesteps must be between 2 and 100000"),
    (["--preset", "cosine", "--num-train-timesteps", "-3"], "--num-train-timesteps must be between 2 and 100000"),
    (["--preset", "sd3", "--shift", "inf"], "--shift must be a finite number, got inf"),
    (["--preset", "sd3", "--shift", "nan"], "--shift must be a finite number, got nan"),
    (["--preset", "sd3", "--shift", "1e308"], "--shift must be positive and at most 1000"),
    (["--preset", "sd3", "--shift", "-2"], "--shift must be positive"),
    (["--preset", "flux", "--resolution", "1000000000x1024"], "--resolution must be between 8 and 16384"),
    (["--preset", "flux", "--resolution", "0x1024"], "--resolution must be between 8 and 16384"),
    (["--preset", "cosine", "--beta-start", "nan"], "--beta-start must be a finite number"),
    (["--preset", "cosine", "--every", "-1"], "--every must be at least 1"),
    (["--preset", "cosine", "--image", "x.jpg", "--out", "y.png", "--seed", "-1"], "--seed must be between 0 and"),
    # --training takes what finetune takes, checked by the same declarations (sdcli.training.config).
    (["--preset", "sd3", "--training", "--timestep-sampling", "mode", "--mode-scale", "5"],
     "--mode-scale must be between -1 and 1.75"),
    (["--preset", "sd3", "--training", "--timestep-sampling", "mode", "--mode-scale", "nan"],
     "--mode-scale must be a finite number"),
    (["--preset", "sd3", "--training", "--timestep-sampling", "logit-normal", "--logit-std", "0"],
     "--logit-std must be positive"),
    (["--preset", "sd3", "--training", "--timestep-sampling", "logit-normal", "--logit-mean", "inf"],
     "--logit-mean must be a finite number"),
    (["--preset", "stable-diffusion", "--training", "--snr-gamma", "1e308"], "--snr-gamma must be positive and at most"),
    (["--preset", "stable-diffusion", "--training", "--snr-gamma", "nan"], "--snr-gamma must be a finite number"),
    (["--preset", "stable-diffusion", "--training", "--debiased-loss", "--debiased-snr-floor", "inf"],
     "--debiased-snr-floor must be a finite number"),
    # A shape option without its sampling would be ignored, as finetune refuses it.
    (["--preset", "sd3", "--training", "--logit-std", "2"], "--logit-std shapes --timestep-sampling logit-normal"),
    (["--preset", "sd3", "--training", "--timestep-sampling", "logit-normal", "--mode-scale", "1"],
     "--mode-scale shapes --timestep-sampling mode"),
])
def test_numbers_are_refused_up_front_naming_the_option(cli, args, text):
    line = one_error_line(cli("inspect-schedule", *args), 2)
    assert text in line, line


@pytest.mark.parametrize("args,flag,needed", [
    (["--mode-scale", "1"], "--mode-scale", "--training"),
    (["--logit-mean", "0.5"], "--logit-mean", "--training"),
    (["--logit-std", "1"], "--logit-std", "--training"),
    (["--timestep-sampling", "mode"], "--timestep-sampling", "--training"),
    (["--weighting-scheme", "cosmap"], "--weighting-scheme", "--training"),
    (["--snr-gamma", "5"], "--snr-gamma", "--training"),
    (["--debiased-loss"], "--debiased-loss", "--training"),
    (["--debiased-snr-floor", "0.01"], "--debiased-snr-floor", "--training"),
    (["--seed", "3"], "--seed", "--image"),
    (["--size", "64"], "--size", "--image"),
])
def test_an_option_that_does_nothing_alone_is_refused(cli, args, flag, needed):
    line = one_error_line(cli("inspect-schedule", "--preset", "sd3", *args), 2)
    assert line == f"error: {flag} does nothing without {needed}"


def test_threads_option_reaches_torch(cli, monkeypatch):
    import torch

    asked = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)
    assert cli("inspect-schedule", "--preset", "cosine", "--threads", "2", "-q").exit_code == 0
    assert asked == [2]
    assert "--threads must be between 1 and 1024" in one_error_line(
        cli("inspect-schedule", "--preset", "cosine", "--threads", "0"), 2)
