"""`sdcli generate` driven through the real CLI on tiny random-weight pipelines."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdcli.generation.metadata import parse_a1111
from conftest import paths_of, pixels


@pytest.mark.parametrize("family,size,prediction", [("sd1", 16, "epsilon"), ("sd2", 16, "v_prediction"),
                                                     ("sdxl", 16, "epsilon")])
def test_each_family_generates_a_png_with_metadata(cli, tiny_models, family, size, prediction):
    result = cli("generate", "a red circle", "--model", tiny_models[family], "--seed", "3", "--steps", "2")
    (path,) = paths_of(result)
    img = Image.open(path)
    assert img.size == (size, size)
    record = json.loads(img.info["sdcli"])
    assert record["model_family"] == family
    assert record["prediction_type"] == prediction
    params = parse_a1111(img.info["parameters"])
    assert params["prompt"] == "a red circle"
    assert params["Seed"] == "3" and params["Steps"] == "2" and params["CFG scale"] == "7.5"
    assert params["Size"] == f"{size}x{size}"


def test_same_seed_gives_byte_identical_png_and_other_seed_differs(cli, tiny_sd, tmp_path):
    args = ("generate", "a blue square", "--model", tiny_sd, "--steps", "3")
    (a,) = paths_of(cli(*args, "--seed", "7", "--out", tmp_path / "a"))
    (b,) = paths_of(cli(*args, "--seed", "7", "--out", tmp_path / "b"))
    (c,) = paths_of(cli(*args, "--seed", "8", "--out", tmp_path / "c"))
    assert a.read_bytes() == b.read_bytes()
    assert np.abs(pixels(a) - pixels(c)).max() > 0


def test_random_seed_is_printed_and_recorded(cli, tiny_sd):
    result = cli("generate", "a cat", "--model", tiny_sd, "--steps", "1")
    (path,) = paths_of(result)
    seed = json.loads(Image.open(path).info["sdcli"])["seed"]
    assert f"seed: {seed} (random)" in result.stderr


def test_guidance_sweep_makes_one_image_per_value_and_a_contact_sheet(cli, tiny_sd):
    result = cli("generate", "a red circle", "--model", tiny_sd, "--steps", "2", "--seed", "1,2,3",
                 "--guidance", "1,3,7.5,12", "--out", "sweep")
    paths = paths_of(result)
    images = [p for p in paths if "sheet" not in p.name]
    sheets = [p for p in paths if "sheet" in p.name]
    assert len(images) == 12 and len(sheets) == 1
    guidances = sorted({json.loads(Image.open(p).info["sdcli"])["guidance"] for p in images})
    assert guidances == [1.0, 3.0, 7.5, 12.0]
    sheet = Image.open(sheets[0])
    # Four columns and three rows of (enlarged) cells: wider than tall.
    assert sheet.width > sheet.height > 3 * 16
    # Different guidance values really change the picture for the same seed.
    by_g = {json.loads(Image.open(p).info["sdcli"])["guidance"]: p for p in images
            if json.loads(Image.open(p).info["sdcli"])["seed"] == 1}
    assert np.abs(pixels(by_g[1.0]) - pixels(by_g[12.0])).max() > 0


def test_json_output_is_one_record_per_image(cli, tiny_sd):
    result = cli("generate", "a", "b", "--model", tiny_sd, "--steps", "1", "--seed", "4", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in records] == ["a", "b"]
    assert all(Path(r["path"]).is_file() and r["seed"] == 4 for r in records)
    assert result.stderr.strip() == ""  # --quiet


def test_from_metadata_regenerates_the_same_image_and_options_override(cli, tiny_sd, tmp_path):
    (orig,) = paths_of(cli("generate", "a green star", "--model", tiny_sd, "--seed", "11", "--steps", "3",
                           "-g", "5", "-s", "euler", "-n", "blurry", "--out", tmp_path / "o"))
    (again,) = paths_of(cli("generate", "--from-metadata", orig, "--out", tmp_path / "r"))
    assert again.read_bytes() == orig.read_bytes()
    (changed,) = paths_of(cli("generate", "--from-metadata", orig, "-g", "9", "--out", tmp_path / "c"))
    record = json.loads(Image.open(changed).info["sdcli"])
    assert record["guidance"] == 9 and record["seed"] == 11 and record["scheduler"] == "euler"
    assert record["negative_prompt"] == "blurry"


def test_prompt_file_and_numbered_outputs_never_overwrite(cli, tiny_sd, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n# a comment\n\na blue square\n")
    first = paths_of(cli("generate", "--prompt-file", prompts, "--model", tiny_sd, "--steps", "1", "--seed", "1"))
    second = paths_of(cli("generate", "--prompt-file", prompts, "--model", tiny_sd, "--steps", "1", "--seed", "1"))
    assert len(first) == 2 and len(set(first) | set(second)) == 4
    assert all(p.is_file() for p in first + second)


def test_single_png_out_refuses_to_overwrite(cli, tiny_sd):
    (path,) = paths_of(cli("generate", "x", "--model", tiny_sd, "--steps", "1", "--seed", "1", "-o", "one.png"))
    before = path.read_bytes()
    result = cli("generate", "x", "--model", tiny_sd, "--steps", "1", "--seed", "2", "-o", "one.png")
    assert result.exit_code != 0 and "--overwrite" in result.stderr
    assert path.read_bytes() == before
    assert paths_of(cli("generate", "x", "--model", tiny_sd, "--steps", "1", "--seed", "2", "-o", "one.png",
                        "--overwrite")) == [path]
    assert path.read_bytes() != before
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_save_trajectory_writes_one_frame_per_step(cli, tiny_sd):
    paths = paths_of(cli("generate", "x", "--model", tiny_sd, "--steps", "4", "--seed", "1", "-s", "ddim",
                         "--save-trajectory"))
    gif = next(p for p in paths if p.suffix == ".gif")
    strip = next(p for p in paths if p.name.endswith("-trajectory.png"))
    assert Image.open(gif).n_frames == 5  # x̂_0 after each of 4 steps, then the final image
    assert Image.open(strip).width > 4 * 16


@pytest.mark.parametrize("blocker", ["existing strip", "existing gif", "folder as strip", "folder as gif",
                                     "name too long"])
def test_a_trajectory_name_that_cannot_be_written_is_refused_before_the_image_is_made(cli, tiny_sd, tmp_path,
                                                                                       monkeypatch, blocker):
    from conftest import one_error_line
    from sdcli import pipeline

    # The trajectory's names add "-trajectory.png": a 245-byte image name leaves them past 255 bytes.
    out = tmp_path / (("x" * 241 if blocker == "name too long" else "image") + ".png")
    strip, gif = out.with_name(out.stem + "-trajectory.png"), out.with_name(out.stem + "-trajectory.gif")
    if blocker != "name too long":
        target = strip if "strip" in blocker else gif
        target.mkdir() if blocker.startswith("folder") else target.write_bytes(b"mine")
    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    line = one_error_line(cli("generate", "x", "--model", tiny_sd, "--steps", "1", "--seed", "1", "--out", out,
                              "--save-trajectory"), 1)
    assert "trajectory" in line
    assert not out.exists()  # refused before any work: no image either
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("size", [250, 255])
def test_an_output_name_near_the_limit_is_written_and_one_past_it_is_refused(cli, tiny_sd, tmp_path, size):
    from conftest import one_error_line

    out = tmp_path / ("y" * (size - 4) + ".png")  # its temporary name must not pass 255 bytes
    result = cli("generate", "x", "--model", tiny_sd, "--steps", "1", "--seed", "1", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert paths_of(result) == [out] and out.is_file()
    long = tmp_path / ("z" * 253 + ".png")
    line = one_error_line(cli("generate", "x", "--model", tiny_sd, "--steps", "1", "--seed", "1", "--out", long), 1)
    assert "257 bytes" in line and "zzzz" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # nothing half-written


@pytest.mark.parametrize("out", ["afile/x.png", "afile/sub/x.png", "afile/shots/"])
def test_an_out_under_a_file_names_that_file_before_loading(cli, tiny_sd, tmp_path, out):
    from conftest import one_error_line

    (tmp_path / "afile").write_text("mine")
    line = one_error_line(cli("generate", "x", "--model", tiny_sd, "--out", tmp_path / out), 1)  # no "loaded" line
    assert line.endswith(f"{tmp_path / 'afile'} is a file, not a folder"), line
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_closed_form_x0_matches_ddims_own_estimate(prediction_type):
    # Schedulers without pred_original_sample get x̂_0 from x_t = √ᾱ·x_0 + √(1−ᾱ)·ε; DDIM reports its
    # own, so the two must agree on the same step.
    import torch
    from diffusers import DDIMScheduler

    from sdcli.generation.trajectory import closed_form_x0

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type, clip_sample=False)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    sample, output = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for t in sched.timesteps[:3]:
        ours = closed_form_x0(sched, output, t, sample)
        theirs = sched.step(output, t, sample).pred_original_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_trajectory_is_recorded_for_a_scheduler_without_its_own_estimate(tiny_sd):
    from sdcli.generation import Engine, Settings, plan_jobs

    s = Settings(prompts=["x"], model=tiny_sd, steps=3, scheduler="dpm++2m", seeds=[1], save_trajectory=True)
    loaded = Engine.load(s)
    (item,) = list(loaded.images(s, plan_jobs(s, [1])))
    assert len(item.trajectory) == 3
    assert item.trajectory[0].size == item.image.size
    # The estimate moves as denoising proceeds.
    assert np.abs(np.asarray(item.trajectory[0], np.int16) - np.asarray(item.trajectory[-1], np.int16)).max() > 0


def test_img2img_records_strength_and_starts_from_the_image(cli, tiny_sd, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (37, 29), (200, 30, 30)).save(init)
    result = cli("generate", "x", "--model", tiny_sd, "--steps", "4", "--seed", "1", "--init-image", init,
                 "--strength", "0.5")
    (path,) = paths_of(result)
    img = Image.open(path)
    assert img.size == (32, 24)  # init size rounded down to a multiple of 8
    params = parse_a1111(img.info["parameters"])
    assert params["Denoising strength"] == "0.5"
    (txt2img,) = paths_of(cli("generate", "x", "--model", tiny_sd, "--steps", "4", "--seed", "1", "-W", "32", "-H", "24"))
    assert np.abs(pixels(path) - pixels(txt2img)).max() > 0


@pytest.mark.parametrize("name", ["ddim", "ddpm", "pndm", "euler", "euler-ancestral", "heun", "lms", "dpm++2m",
                                  "dpm++2m-karras", "unipc"])
def test_every_named_scheduler_runs(cli, tiny_sd, name):
    from sdcli.schedule.samplers import SCHEDULERS

    (path,) = paths_of(cli("generate", "x", "--model", tiny_sd, "--steps", "3", "--seed", "1", "-s", name,
                           "--timestep-spacing", "trailing"))
    params = parse_a1111(Image.open(path).info["parameters"])
    assert params["Sampler"] == SCHEDULERS[name].a1111
    assert params["Timestep spacing"] == "trailing"


def test_scheduler_list(cli):
    result = cli("generate", "--scheduler", "list")
    assert result.exit_code == 0
    cells = [re.split(r"\s{2,}", line) for line in result.stdout.splitlines() if line.strip()]
    rows = {row[0]: row[1:3] for row in cells}
    assert {"ddim", "euler-ancestral", "dpm++2m-karras", "unipc"} <= set(rows)
    # AUTOMATIC1111's and ComfyUI's names beside sdcli's, as the README's table promised
    assert rows["name"] == ["AUTOMATIC1111", "ComfyUI"] and rows["--sigmas"] == ["AUTOMATIC1111", "ComfyUI"]
    assert rows["euler-ancestral"] == ["Euler a", "euler_ancestral"]
    assert rows["dpm++2m-karras"] == ["DPM++ 2M Karras", "dpmpp_2m + karras"]
    assert rows["sgm_uniform"] == ["SGM Uniform", "sgm_uniform"]
    listed = json.loads(cli("schedulers", "--json").stdout)
    assert {"name": "euler-ancestral", "a1111": "Euler a", "comfyui": ["euler_ancestral"]}.items() <= next(
        r for r in listed["samplers"] if r["name"] == "euler-ancestral").items()


# The same image whichever vocabulary names the sampler: (AUTOMATIC1111's or ComfyUI's words, sdcli's).
SAME_SAMPLER = {
    "a1111": (["-s", "Euler a"], ["-s", "euler-ancestral"]),
    "a1111-karras": (["--sampler", "DPM++ 2M Karras"], ["-s", "dpm++2m-karras"]),
    "a1111-schedule-type": (["-s", "DPM++ 2M", "--sigmas", "Karras"], ["-s", "dpm++2m-karras"]),
    "comfyui": (["-s", "dpmpp_2m", "--sigmas", "karras"], ["-s", "dpm++2m-karras"]),
    "a1111-lms-karras": (["-s", "LMS Karras"], ["-s", "lms", "--sigmas", "karras"]),
    "comfyui-sgm-uniform": (["-s", "euler", "--sigmas", "sgm_uniform"], ["-s", "euler", "--sigmas", "SGM Uniform"]),
}


@pytest.mark.parametrize("case", SAME_SAMPLER)
def test_a1111_and_comfyui_sampler_names_make_sdclis_image(cli, tiny_sd, case):
    theirs, ours = SAME_SAMPLER[case]
    common = ["generate", "x", "--model", tiny_sd, "--steps", "2", "--seed", "1", "--cfg", "5"]
    (a,) = paths_of(cli(*common, *theirs, "--out", "a.png"))
    (b,) = paths_of(cli(*common, *ours, "--out", "b.png"))
    assert np.array_equal(pixels(a), pixels(b))
    assert Image.open(a).info["parameters"] == Image.open(b).info["parameters"]
    assert json.loads(Image.open(a).info["sdcli"]) == json.loads(Image.open(b).info["sdcli"])
    assert json.loads(Image.open(a).info["sdcli"])["guidance"] == 5.0  # --cfg is --guidance
    (again,) = paths_of(cli("generate", "--from-metadata", a, "--out", "again.png"))
    assert np.array_equal(pixels(again), pixels(a))


def test_a_comfyui_timestep_schedule_is_the_timestep_spacing_and_recorded(cli, tiny_sd):
    common = ["generate", "x", "--model", tiny_sd, "--steps", "3", "--seed", "1", "-s", "euler"]
    (comfy,) = paths_of(cli(*common, "--sigmas", "normal", "--out", "a.png"))
    (spaced,) = paths_of(cli(*common, "--timestep-spacing", "linspace", "--out", "b.png"))
    (own,) = paths_of(cli(*common, "--out", "c.png"))
    assert np.array_equal(pixels(comfy), pixels(spaced))
    assert np.abs(pixels(comfy) - pixels(own)).max() > 0  # the tiny model's own spacing is leading
    assert "Schedule type: Normal" in Image.open(comfy).info["parameters"]


def test_subprocess_prints_paths_on_stdout_and_notes_on_stderr(tiny_sd, tmp_path):
    res = subprocess.run([sys.executable, "-m", "sdcli", "generate", "a dog", "--model", tiny_sd, "--steps", "1",
                          "--seed", "2", "--out", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert [Path(line).is_file() for line in res.stdout.splitlines()] == [True]
    assert "loaded" in res.stderr


def test_progress_is_plain_lines_with_time_left_on_stderr_when_it_is_not_a_terminal(cli, tiny_sd, monkeypatch):
    # A 4096x4096 image on a CPU ran for minutes without a word in a log: the bar was drawn on terminals only.
    import re

    monkeypatch.setattr("sdcli.progress.SLOW", 0.0)  # every load as slow as a big model's: it says so
    result = cli("generate", "a dog", "--model", tiny_sd, "--steps", "3", "--seed", "2")
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("denoising ")]
    # The first step (so a slow run tells early how long it takes) and the last; more in between on slow runs.
    # The tiny model's PNDM runs 3 steps and its warm-up: 4.
    assert lines[0].startswith("denoising 1/4 ") and lines[-1].startswith("denoising 4/4 ")
    assert all(re.fullmatch(r"denoising \d/4  [\d.]+ (s/step|steps/s)  eta \d+:\d\d:\d\d", line) for line in lines)
    assert "denoising" not in result.stdout
    # Loading a big model takes minutes: a log says so before, and how long after.
    said = result.stderr.splitlines()
    loading = said.index(f"loading {Path(tiny_sd).resolve()} ...")
    assert said[loading + 1].startswith("loaded ") and said.index(lines[0]) > loading
    assert "denoising" not in cli("generate", "a dog", "--model", tiny_sd, "--steps", "2", "-q").stderr


def test_without_scipy_generate_works_and_lms_says_what_to_install(tiny_sd, tmp_path):
    # scipy is optional (only LMS needs it); hide it the way importlib sees a missing package.
    script = (
        "import sys; sys.modules['scipy'] = None\n"
        "from sdcli.cli import main\n"
        "sys.argv = ['sdcli', *sys.argv[1:]]\n"
        "main()\n"
    )
    common = ["generate", "x", "--model", tiny_sd, "--steps", "2", "--seed", "1"]
    lms = subprocess.run([sys.executable, "-c", script, *common, "-s", "lms", "--out", str(tmp_path / "lms")],
                         capture_output=True, text=True)
    assert lms.returncode != 0
    assert lms.stderr.strip().splitlines() == [
        "error: the lms sampler needs scipy, which is not installed: pip install scipy"]
    assert not (tmp_path / "lms").exists()
    ddim = subprocess.run([sys.executable, "-c", script, *common, "--out", str(tmp_path / "ddim")],
                          capture_output=True, text=True)
    assert ddim.returncode == 0, ddim.stderr
    assert [Path(line).parent.name for line in ddim.stdout.splitlines()] == ["ddim"]


def test_long_prompt_warns_naming_the_dropped_words_only_where_they_are_dropped(cli, tiny_sd):
    long = " ".join(["red"] * 80) + " purple elephant"
    result = cli("generate", long, "--model", tiny_sd, "--steps", "1", "--seed", "1", "--prompt-syntax", "plain")
    assert result.exit_code == 0
    assert "ignored" in result.stderr and "purple elephant" in result.stderr
    chunked = cli("generate", long, "--model", tiny_sd, "--steps", "1", "--seed", "1")  # a1111: read in chunks
    assert chunked.exit_code == 0 and "ignored" not in chunked.stderr


def test_outputs_get_ordinary_permissions(cli, tiny_sd):
    import os
    import stat

    (path,) = paths_of(cli("generate", "x", "--model", tiny_sd, "--steps", "1", "--seed", "1"))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_bundled_model_names_the_words_it_never_saw(cli, tiny_models, monkeypatch):
    from sdcli import defaults
    from sdcli.generation import unknown_words
    from sdcli.pipeline import load_pipeline

    tiny_sd = tiny_models["sd1"]
    tokenizer = load_pipeline(tiny_sd).pipe.tokenizer
    assert unknown_words(tokenizer, "A red elephant, on a zebra") == ["elephant", "zebra"]
    assert unknown_words(tokenizer, "a large red circle") == []
    monkeypatch.setattr(defaults, "BUNDLED_MODEL", Path(tiny_sd))
    result = cli("generate", "a red elephant", "--steps", "1", "--seed", "1")  # no --model: the "bundled" one
    assert result.exit_code == 0, result.stderr
    assert "has never seen 'elephant'" in result.stderr
    other = cli("generate", "a red elephant", "--model", tiny_models["sd2"], "--steps", "1", "--seed", "1")
    assert other.exit_code == 0 and "never seen" not in other.stderr  # only the bundled toy warns


def test_eta_gives_plain_diffusers_ddim_image_and_replays(cli, tiny_sd, tmp_path):
    import diffusers
    import torch

    from sdcli.schedule.samplers import make_scheduler

    common = ["a red circle", "--model", tiny_sd, "--steps", "3", "--seed", "2", "--scheduler", "ddim",
              "--prompt-syntax", "plain"]
    (path,) = paths_of(cli("generate", *common, "--eta", "0.8", "--out", tmp_path / "a.png"))
    (zero,) = paths_of(cli("generate", *common, "--out", tmp_path / "b.png"))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    theirs = pipe("a red circle", num_inference_steps=3, eta=0.8, generator=torch.Generator("cpu").manual_seed(2),
                  output_type="np").images[0]
    assert np.array_equal(pixels(path), np.round(theirs * 255).astype(np.int16))
    assert not np.array_equal(pixels(path), pixels(zero))  # η draws fresh noise each step: another image
    record = json.loads(Image.open(path).info["sdcli"])
    assert record["eta"] == 0.8 and "Eta DDIM: 0.8" in Image.open(path).info["parameters"]
    assert "Eta" not in Image.open(zero).info["parameters"]  # 0, the default, as A1111 leaves it out
    (again,) = paths_of(cli("generate", "--from-metadata", path, "--out", tmp_path / "c.png"))
    assert np.array_equal(pixels(again), pixels(path))


@pytest.mark.parametrize("model,args,says", [
    ("sd1", ["--scheduler", "euler"], "--eta: --scheduler euler has no η"),
    ("sd1", [], "--eta: this model's PNDMScheduler has no η"),  # the sampler it comes with
    ("flux", [], "--eta: FluxPipeline samples by flow matching, which has no η"),
])
def test_eta_on_a_sampler_without_it_is_refused_before_loading(cli, tiny_models, tiny_flow_models, tmp_path,
                                                              no_pipeline_loads, model, args, says):
    from conftest import one_error_line

    path = {**tiny_models, **tiny_flow_models}[model]
    line = one_error_line(cli("generate", "x", "--model", path, "--eta", "0.5", *args, "--out", tmp_path / "o"), 2)
    assert line.startswith(f"error: {says}")
    assert not (tmp_path / "o").exists()
