"""Each generate setting is declared once; the CLI, the record and the replay all come from that declaration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdcli.declare import Role, declared
from sdcli.generation.settings import Settings, recorded, settings_from_record, sweep_axes
from sdcli.generation.metadata import parse_a1111
from conftest import pixels, strict_json


def test_every_declared_setting_is_an_option_of_generate_with_its_help():
    import typer.main

    from sdcli.cli import app

    command = typer.main.get_command(app).commands["generate"]
    params = {p.name: p for p in command.params}
    for d in declared(Settings):
        assert d.name in params, d.name
        assert params[d.name].help == d.opt.help
    # The command adds only options about files, never a second spelling of a setting.
    extra = set(params) - {d.name for d in declared(Settings)}
    assert extra == {"prompt_file", "out", "overwrite", "from_metadata", "quiet", "json"}


def record_of(path: Path) -> dict:
    return json.loads(Image.open(path).info["sdcli"])


def made(result) -> list[Path]:
    assert result.exit_code == 0, result.stderr
    return [Path(line) for line in result.stdout.splitlines() if line.strip()]


def assert_round_trip(cli, image: Path, tmp_path: Path) -> None:
    """Every recorded field survives the PNG and --from-metadata, and the replay has the same pixels."""
    record = record_of(image)
    task = record["task"]
    keys = [d.record_key for d in recorded(task)] + [d.record_key for d in sweep_axes()]
    assert set(keys) <= set(record), set(keys) - set(record)
    replay = settings_from_record(record)
    # A validation image is recorded before its run saves the LoRA, so its record holds no hash of it.
    unhashed = record.get("finetune_validation") and not any("sha256" in lo for lo in record.get("loras") or [])
    for d in declared(Settings):
        if d.opt.role is Role.RUNTIME or d.record_key not in record:
            continue
        value = getattr(replay, d.name)
        stored = d.opt.to_record(value) if d.opt.to_record else value
        if d.name == "loras" and unhashed:
            stored = [{k: v for k, v in lo.items() if k != "sha256"} for lo in stored]
        assert stored == ([record[d.record_key]] if d.opt.role is Role.SWEEP else record[d.record_key]), d.name
    a1111 = parse_a1111(Image.open(image).info["parameters"])
    for d in declared(Settings):
        if d.opt.a1111 and d.opt.a1111 in ("Steps", "CFG scale", "Seed"):
            assert float(a1111[d.opt.a1111]) == float(record[d.record_key])
    (again,) = made(cli("generate", "--from-metadata", image, "--out", tmp_path / "replay" / image.name))
    assert np.array_equal(pixels(again), pixels(image))
    again_record = record_of(again)
    if unhashed:
        again_record["loras"] = [{k: v for k, v in lo.items() if k != "sha256"} for lo in again_record["loras"]]
    assert {k: v for k, v in again_record.items() if k != "finetune_validation"} == \
        {k: v for k, v in record.items() if k != "finetune_validation"}


def test_txt2img_round_trips(cli, tiny_sd, tmp_path):
    (image,) = made(cli("generate", "a red circle", "--model", tiny_sd, "--steps", "2", "--seed", "3", "-n", "blue",
                        "-g", "5", "--guidance-rescale", "0.5", "-s", "euler", "--timestep-spacing", "trailing",
                        "-W", "24", "-H", "16", "--out", tmp_path / "a"))
    assert "CFG Rescale phi: 0.5" in Image.open(image).info["parameters"]
    assert_round_trip(cli, image, tmp_path)


def test_img2img_round_trips(cli, tiny_sd, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (24, 16), (200, 30, 30)).save(init)
    (image,) = made(cli("generate", "x", "--model", tiny_sd, "--steps", "4", "--seed", "1", "--init-image", init,
                        "--strength", "0.5", "--out", tmp_path / "a"))
    assert record_of(image)["task"] == "img2img" and record_of(image)["strength"] == 0.5
    assert_round_trip(cli, image, tmp_path)


def test_one_image_of_a_sweep_round_trips(cli, tiny_sd, tmp_path):
    images = [p for p in made(cli("generate", "a red circle", "--model", tiny_sd, "--steps", "2", "--seed", "1,2",
                                  "-g", "1,3", "--out", tmp_path / "a")) if "sheet" not in p.name]
    picked = next(p for p in images if record_of(p)["guidance"] == 3 and record_of(p)["seed"] == 2)
    assert_round_trip(cli, picked, tmp_path)


def test_finetune_validation_image_round_trips_and_an_earlier_one_says_why_not(cli, tiny_sd, dataset, tmp_path):
    result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", tmp_path / "lora", "--max-steps", "2",
                 "--batch-size", "2", "--lr", "1e-2", "--checkpoint-every", "0", "--validation-prompt", "a red circle",
                 "--validation-every", "1", "--validation-steps", "2", "-q", "--json")
    assert result.exit_code == 0, result.stderr
    assert strict_json(result.stdout)["out"]  # one JSON document: validation images are not finetune's result
    last = next((tmp_path / "lora" / "validation" / "step-000002").glob("*.png"))
    record = record_of(last)
    assert record["loras"] == [{"path": str((tmp_path / "lora").resolve()), "scale": 1.0}]
    assert_round_trip(cli, last, tmp_path)
    earlier = next((tmp_path / "lora" / "validation" / "step-000001").glob("*.png"))
    result = cli("generate", "--from-metadata", earlier, "--out", tmp_path / "old")
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "step 1" in lines[0] and "final weights (step 2)" in lines[0]
    assert not (tmp_path / "old").exists() or not any((tmp_path / "old").iterdir())


def test_the_bundled_model_is_recorded_by_name_not_install_path(cli, monkeypatch, tmp_path):
    from sdcli import defaults

    monkeypatch.delenv("SDCLI_MODEL", raising=False)
    (image,) = made(cli("generate", "a red circle", "--steps", "2", "--seed", "1", "--out", tmp_path / "a"))
    assert record_of(image)["model"] == defaults.BUNDLED_NAME
    assert_round_trip(cli, image, tmp_path)


def test_a_weighted_long_prompt_with_clip_skip_and_an_embedding_round_trips(cli, tiny_sd, tmp_path):
    import torch
    from safetensors.torch import save_file

    from sdcli.generation.embeddings import file_sha256

    emb = tmp_path / "mystyle.safetensors"
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))}, str(emb))
    prompt = "a (mystyle:1.2) [circle] " + "red " * 80 + "BREAK (square:0.8)"
    (image,) = made(cli("generate", prompt, "--model", tiny_sd, "--steps", "2", "--seed", "4", "--clip-skip", "2",
                        "--embedding", emb, "-n", "mystyle", "--out", tmp_path / "a"))
    params = Image.open(image).info["parameters"]
    assert "Clip skip: 2" in params and f'TI hashes: "mystyle: {file_sha256(emb)[:12]}"' in params
    assert record_of(image)["prompt_syntax"] == "a1111"
    assert_round_trip(cli, image, tmp_path)
    # A changed embedding file would make another image: the replay says so instead.
    save_file({"emb_params": torch.zeros(2, 32)}, str(emb))
    result = cli("generate", "--from-metadata", image, "--out", tmp_path / "changed")
    assert result.exit_code == 1 and "changed since this image was made" in result.stderr


ESSENTIALS = {"model": "m", "steps": 2, "seed": 1, "guidance": 5.0, "width": 16, "height": 16}


def test_a_record_from_before_prompt_syntax_replays_as_plain_text():
    assert settings_from_record({"prompt": "(red:1.3)", **ESSENTIALS}).prompt_syntax == "plain"
    assert settings_from_record({"prompt": "(red:1.3)", "prompt_syntax": "a1111", **ESSENTIALS}
                                ).prompt_syntax == "a1111"


def test_a_replaced_input_is_not_checked_against_the_recorded_file(cli, tiny_sd, tmp_path):
    from PIL import Image as PILImage

    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    PILImage.new("RGB", (16, 16), (200, 30, 30)).save(init)
    PILImage.new("L", (16, 16), 255).save(mask)
    (image,) = made(cli("generate", "x", "--model", tiny_sd, "--steps", "2", "--seed", "1", "--init-image", init,
                        "--mask", mask, "--out", tmp_path / "a"))
    PILImage.new("L", (16, 16), 0).save(mask)  # the recorded mask changes...
    new_mask = tmp_path / "new-mask.png"
    PILImage.new("L", (16, 16), 255).save(new_mask)
    # ...but a replay that names a new one uses it instead of refusing over the old one.
    (again,) = made(cli("generate", "--from-metadata", image, "--mask", new_mask, "--out", tmp_path / "b"))
    assert record_of(again)["mask"]["path"] == str(new_mask)


def test_guidance_rescale_where_the_pipeline_has_none_is_refused(cli, tiny_sd, tmp_path):
    from PIL import Image as PILImage

    from conftest import one_error_line

    init = tmp_path / "init.png"
    PILImage.new("RGB", (16, 16), (200, 30, 30)).save(init)
    result = cli("generate", "x", "--model", tiny_sd, "--steps", "2", "--init-image", init, "--guidance-rescale",
                 "0.5", "--out", tmp_path / "o", "-q")
    assert "has no guidance rescale" in one_error_line(result)


# Records that cannot be trusted as they are: each refused in one line naming its field, never "unexpected".

def write_record(path: Path, record, parameters: str | None = None, raw: str | None = None) -> Path:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("sdcli", raw if raw is not None else json.dumps(record))
    if parameters is not None:
        info.add_text("parameters", parameters)
    Image.new("RGB", (16, 16)).save(path, pnginfo=info)
    return path


LORA = "LORA"  # replaced by a real LoRA folder


@pytest.mark.parametrize("field,value,named", [
    ("steps", "abc", "steps"), ("steps", 2.5, "steps"), ("steps", True, "steps"), ("steps", -5, "--steps"),
    ("seed", None, "seed"), ("seed", "1", "seed"), ("seed", -1, "--seed"),
    ("prompt", 123, "prompt"), ("prompt", None, "prompt"), ("negative_prompt", ["x"], "negative_prompt"),
    ("loras", "abc", "loras"), ("loras", [{"path": 1, "scale": 1}], "loras"), ("loras", [[1, 2]], "loras"),
    ("loras", [{"path": LORA, "scale": "NaN"}], "loras"), ("loras", [{"path": LORA, "scale": float("nan")}], "--lora"),
    ("loras", [{"path": LORA, "scale": 1e300}], "--lora"),
    ("embeddings", "abc", "embeddings"), ("embeddings", [[1, 2]], "embeddings"), ("embeddings", [{"x": 1}], "embeddings"),
    ("guidance", "nan", "guidance"), ("guidance", float("nan"), "guidance"), ("guidance", float("inf"), "guidance"),
    ("guidance", 1e300, "--guidance"), ("guidance", -3, "--guidance"),
    ("width", -5, "--width"), ("width", "16", "width"), ("height", 10**9, "16x1000000000"),  # the memory check
    ("hires_scale", float("inf"), "hires_scale"), ("hires_scale", 1e300, "--hires-scale"),
    ("strength", float("nan"), "strength"), ("clip_skip", "2", "clip_skip"),
    ("prompt_syntax", "bogus", "prompt_syntax"), ("sigmas", 5, "sigmas"), ("true_cfg", "yes", "true_cfg"),
    ("controlnets", "abc", "controlnets"), ("init_image", {"path": 3}, "init_image"),
    ("outpaint", "abc", "outpaint"),
    # Numbers a record holds go through the command line's declared ranges, as if typed.
    ("loras", [{"path": LORA, "scale": 1e300}], "--lora LORA:SCALE must be between -100 and 100, got 1e+300"),
    ("controlnets", [{"path": "cn", "scale": -1}], "--controlnet cn:SCALE must be between 0 and 100, got -1"),
    ("guidance_rescale", 2, "--guidance-rescale must be between 0 and 1, got 2"),
    ("distilled_guidance", 5000, "--distilled-guidance must be between 0 and 1000, got 5000"),
    ("outpaint", [-8, 0, 0, 0], "--outpaint must be between 0 and 4096, got -8"),
    ("hires_scale", 0.5, "--hires-scale must be greater than 1 and at most 8, got 0.5"),
    ("hires_steps", 0, "--hires-steps must be at least 1, got 0"), ("mask_blur", -1, "--mask-blur must not be"),
    ("strength", 0, "--strength must be positive and at most 1, got 0"),
    ("control_start", 2, "--control-start must be between 0 and 1 (a fraction of the steps), got 2"),
    ("clip_skip", 0, "--clip-skip must be at least 1"), ("seed", 2**63, "--seed must be between 0 and"),
    # What a record says about its run is text in every record sdcli writes: anything else is not one of them.
    ("sampler", 7, "sampler"), ("schedule_type", None, "schedule_type"), ("model_family", ["sd"], "model_family"),
    ("model_name", 1, "model_name"), ("prediction_type", {"x": 1}, "prediction_type"), ("task", 3, "task"),
    ("sdcli_version", 1.0, "sdcli_version"),
    ("finetune_validation", "abc", "finetune_validation"), ("finetune_validation", {"out": 1, "step": 1},
                                                             "finetune_validation"),
    ("finetune_validation", {"out": "o", "step": "2"}, "finetune_validation step"),
])
def test_a_malformed_record_is_refused_naming_its_field(cli, tiny_sd, tmp_path, field, value, named):
    from conftest import one_error_line
    from sdcli.testing import save_random_lora

    if "LORA" in json.dumps(value):
        lora = str(save_random_lora(tiny_sd, tmp_path / "lora"))
        value = json.loads(json.dumps(value).replace('"LORA"', json.dumps(lora)))
        named = named.replace("LORA", lora)
    record = {"prompt": "x", "model": tiny_sd, "steps": 1, "seed": 1, "guidance": 5.0, "width": 16, "height": 16,
              field: value}
    image = write_record(tmp_path / "r.png", record)
    line = one_error_line(cli("generate", "--from-metadata", image, "--out", tmp_path / "o.png"))
    assert named in line and "unexpected" not in line, line
    assert "Error:" not in line, line  # the reader's own exception is no news to the user
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("raw,expected", [
    ('[1, 2]', "not a record"), ('"text"', "not a record"),
    ('{"prompt": "x", "model": "m", "seed": 1, "guidance": 5, "width": 16, "height": 16, "steps": 1e400}', "steps"),
])
def test_a_record_that_is_not_a_dict_of_settings_is_refused(cli, tmp_path, raw, expected):
    from conftest import one_error_line

    image = write_record(tmp_path / "r.png", None, raw=raw)
    assert expected in one_error_line(cli("generate", "--from-metadata", image, "--out", tmp_path / "o.png"))


def test_a_record_missing_steps_and_size_replays_them_from_its_parameters_text(cli, tiny_sd, tmp_path):
    (image,) = made(cli("generate", "a red circle", "--model", tiny_sd, "--steps", "3", "--seed", "4", "-W", "24",
                        "-H", "16", "--out", tmp_path / "a.png"))
    record = record_of(image)
    for key in ("steps", "width", "height", "seed"):
        del record[key]
    short = write_record(tmp_path / "short.png", record, parameters=Image.open(image).info["parameters"])
    (again,) = made(cli("generate", "--from-metadata", short, "--out", tmp_path / "b.png"))
    assert np.array_equal(pixels(again), pixels(image))
    # Without the text either, nothing to go on: refused, naming what is missing.
    from conftest import one_error_line

    bare = write_record(tmp_path / "bare.png", record)
    line = one_error_line(cli("generate", "--from-metadata", bare, "--out", tmp_path / "c.png"))
    assert "holds no steps" in line
    # What the user types fills the gap.
    made(cli("generate", "--from-metadata", bare, "--steps", "3", "--seed", "4", "-W", "24", "-H", "16",
             "--out", tmp_path / "d.png"))


def test_a_lora_that_changed_since_the_image_was_made_is_named_on_replay(cli, tiny_sd, tmp_path):
    from safetensors.torch import load_file, save_file

    from conftest import one_error_line
    from sdcli.testing import save_random_lora

    lora = save_random_lora(tiny_sd, tmp_path / "lora")
    (image,) = made(cli("generate", "x", "--model", tiny_sd, "--steps", "1", "--seed", "1", "--lora", f"{lora}:0.5",
                        "--out", tmp_path / "a.png"))
    digest = record_of(image)["loras"][0]["sha256"]
    assert f"lora: {digest[:12]}" in Image.open(image).info["parameters"]  # AUTOMATIC1111's "Lora hashes"
    made(cli("generate", "--from-metadata", image, "--out", tmp_path / "same.png"))  # unchanged: replays
    weights = next(Path(lora).glob("*.safetensors"))
    tensors = load_file(weights)
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 0.01
    save_file(tensors, weights)
    line = one_error_line(cli("generate", "--from-metadata", image, "--out", tmp_path / "b.png"))
    assert "--lora" in line and str(Path(lora).resolve()) in line and "changed" in line


# Numbers as users type them: non-finite, huge, or in digits other than ASCII's, each refused naming the option.

@pytest.mark.parametrize("args,named", [
    (["--hires-scale", "nan"], "--hires-scale"), (["--hires-scale", "inf"], "--hires-scale"),
    (["--hires-scale", "1e308"], "--hires-scale"), (["--hires-scale", "0"], "--hires-scale"),
    (["--hires-scale", "-2"], "--hires-scale"),
    (["--lora", "LORA:nan"], "--lora"), (["--lora", "LORA:inf"], "--lora"), (["--lora", "LORA:-inf"], "--lora"),
    (["--lora", "LORA:1e300"], "--lora"), (["--lora", "LORA:1e400"], "--lora"), (["--lora", "LORA:١"], "--lora"),
    (["--lora", "LORA:1_0"], "--lora"),
    (["--controlnet", "cn:nan"], "--controlnet cn:nan: the scale"), (["--controlnet", "cn:1e300"], "--controlnet cn:SCALE must be between 0 and 100"),
    (["--distilled-guidance", "nan"], "--distilled-guidance must be a finite number, got nan"),
    (["--guidance", "nan"], "--guidance"), (["--guidance", "1e300"], "--guidance"),
    (["--guidance-rescale", "inf"], "--guidance-rescale"),
    (["--strength", "nan", "--init-image", "INIT"], "--strength"),
    (["--hires-scale", "2", "--hires-strength", "nan"], "--hires-strength"),
    (["--control-start", "nan"], "--control-start"),
    (["--outpaint", "²,0,0,0", "--init-image", "INIT"], "--outpaint"),
    (["--outpaint", "١٦,0,0,0", "--init-image", "INIT"], "--outpaint"),
    (["--outpaint", "1e9,0,0,0", "--init-image", "INIT"], "--outpaint"),
    (["--outpaint", "-1,0,0,0", "--init-image", "INIT"], "--outpaint"),
    (["--outpaint", "nan", "--init-image", "INIT"], "--outpaint"),
    (["--outpaint", "8,0,0,999999999999", "--init-image", "INIT"], "--outpaint"),
    (["--seed", "١٢"], "--seed"), (["--seed", "²"], "--seed"), (["--seed", "1_0"], "--seed"),
    (["--seed", "1,٣"], "--seed"),
])
def test_a_bad_number_is_refused_before_loading_naming_its_option(cli, tiny_sd, tmp_path, args, named):
    from conftest import one_error_line
    from sdcli.testing import save_random_lora

    if any("LORA" in a for a in args):
        lora = str(save_random_lora(tiny_sd, tmp_path / "lora"))
        args = [a.replace("LORA", lora) for a in args]
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "init.png")
    args = [str(tmp_path / "init.png") if a == "INIT" else a for a in args]
    result = cli("generate", "x", "--model", tiny_sd, "--steps", "2", "-W", "16", "-H", "16", "--out",
                 tmp_path / "o.png", *args)
    line = one_error_line(result, 2)  # nothing loaded first
    assert named in line and "unexpected" not in line, line


# Each number's range is declared once, on its setting; one checker walks every number of every setting.

def _holds_a_number(t) -> bool:
    import typing

    return t in (int, float) or any(_holds_a_number(a) for a in typing.get_args(t))


def test_every_number_generate_takes_declares_its_range():
    # The class, not the cases: a numeric option added later without a range fails here; so does one whose
    # numbers sit in a list (a guidance sweep) or in (path, scale) pairs (--lora, --controlnet).
    numeric = [d for d in declared(Settings) if _holds_a_number(d.type)]
    assert {"guidance", "loras", "controlnets", "seeds", "outpaint", "threads"} <= {d.name for d in numeric}
    assert len(numeric) >= 20
    assert [d.flag for d in numeric if d.opt.range is None] == []


@pytest.mark.parametrize("args,expected", [
    (["--lora", "LORA:-101"], "--lora LORA:SCALE must be between -100 and 100, got -101"),
    (["--lora", "LORA:0.5", "--lora", "LORA:1e300"], "--lora LORA:SCALE must be between -100 and 100, got 1e+300"),
    (["--controlnet", "cn:-0.5"], "--controlnet cn:SCALE must be between 0 and 100, got -0.5"),
    (["--controlnet", "cn:101"], "--controlnet cn:SCALE must be between 0 and 100, got 101"),
    (["--guidance", "1,3,1001"], "--guidance must be between 0 and 1000, got 1001"),
    (["--guidance-rescale", "0.5,-0.1"], "--guidance-rescale must be between 0 and 1, got -0.1"),
    (["--distilled-guidance", "1001"], "--distilled-guidance must be between 0 and 1000, got 1001"),
    (["--distilled-guidance", "-1"], "--distilled-guidance must be between 0 and 1000, got -1"),
    (["--num-images", "0"], "--num-images must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--threads", "2000"], "--threads must be between 1 and 1024, got 2000"),
    (["--seed", "-1"], "--seed must be between 0 and 9223372036854775807, got -1"),
    (["--seed", "1,9223372036854775808"],
     "--seed must be between 0 and 9223372036854775807, got 9223372036854775808"),
    (["-W", "-8"], "--width must be positive, got -8"), (["-H", "0"], "--height must be positive, got 0"),
    (["--hires-scale", "9"], "--hires-scale must be greater than 1 and at most 8, got 9"),
    (["--hires-scale", "2", "--hires-steps", "0"], "--hires-steps must be at least 1, got 0"),
    (["--hires-scale", "2", "--hires-strength", "0"], "--hires-strength must be positive and at most 1, got 0"),
    (["--hires-scale", "2", "--hires-strength", "1.5"], "--hires-strength must be positive and at most 1, got 1.5"),
    (["--init-image", "INIT", "--strength", "1.5"], "--strength must be positive and at most 1, got 1.5"),
    (["--init-image", "INIT", "--outpaint", "8,0,0,5000"], "--outpaint must be between 0 and 4096, got 5000"),
    (["--mask-blur", "-3"], "--mask-blur must not be negative, got -3"),
    (["--control-end", "2"], "--control-end must be between 0 and 1 (a fraction of the steps), got 2"),
])
def test_a_number_past_its_declared_range_is_refused_naming_the_option_as_typed(cli, tiny_sd, tmp_path, args,
                                                                                 expected):
    from conftest import one_error_line
    from sdcli.testing import save_random_lora

    if any("LORA" in a for a in args):
        lora = str(save_random_lora(tiny_sd, tmp_path / "lora"))
        args, expected = [a.replace("LORA", lora) for a in args], expected.replace("LORA", lora)
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "init.png")
    args = [str(tmp_path / "init.png") if a == "INIT" else a for a in args]
    result = cli("generate", "x", "--model", tiny_sd, "--steps", "2", "-W", "16", "-H", "16", "--out",
                 tmp_path / "o.png", *args)
    assert one_error_line(result, 2) == f"error: {expected}"  # nothing loaded first
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_lora_whose_weights_hold_nan_or_inf_is_refused_by_name_before_loading(cli, tiny_sd, tmp_path, bad):
    from safetensors.torch import load_file, save_file

    from conftest import one_error_line
    from sdcli.testing import save_random_lora

    lora = save_random_lora(tiny_sd, tmp_path / "lora")
    weights = next(Path(lora).glob("*.safetensors"))
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key][0] = bad
    save_file(tensors, weights)
    line = one_error_line(cli("generate", "x", "--model", tiny_sd, "--steps", "1", "--lora", lora, "--out",
                              tmp_path / "o.png"))
    assert str(weights) in line and key in line and "NaN or infinite" in line
