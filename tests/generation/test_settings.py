"""Each generate setting is declared once; the CLI, the record and the replay all come from that declaration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdcli.declare import Role, declared
from sdcli.generation.settings import Settings, recorded, settings_from_record, sweep_axes
from sdcli.metadata import parse_a1111
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

    from sdcli.embeddings import file_sha256

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
