"""`sdcli finetune` from the command line: results on stdout, one-line errors, and what generate loads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from conftest import OTHER_PIPELINES, as_other_pipeline, one_error_line

QUICK = ("--max-steps", "2", "--batch-size", "2", "--checkpoint-every", "0", "--lr", "1e-2")


def _error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_every_declared_setting_is_an_option_of_finetune_with_its_help():
    import typer.main

    from sdcli.cli import app
    from sdcli.declare import declared
    from sdcli.training.config import FinetuneConfig

    command = typer.main.get_command(app).commands["finetune"]
    params = {p.name: p for p in command.params}
    for d in declared(FinetuneConfig):
        assert d.name in params, d.name
        assert params[d.name].help == d.opt.help
    # Every field is declared, and the command adds only how it prints its result and where its settings come
    # from (a --config file, whose keys are the same declarations), never a second spelling.
    assert [d.name for d in declared(FinetuneConfig)] == [f.name for f in dataclasses.fields(FinetuneConfig)]
    assert set(params) - {d.name for d in declared(FinetuneConfig)} == {"json", "config", "print_config"}


def test_missing_out_is_a_usage_error_naming_it(cli, tmp_path):
    result = cli("finetune", "--data", tmp_path)
    assert result.exit_code == 2 and "Missing option '--out'" in result.stderr


def test_cli_trains_and_prints_the_output_folder(cli, tiny_sd, dataset, tmp_path):
    out = tmp_path / "out"
    result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", out, *QUICK, "--flip")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert "data: 4 images" in result.stderr and "world size 1" in result.stderr
    assert "step 2/2" in result.stderr  # plain progress lines when stderr is not a terminal
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    again = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", out, *QUICK, "--json", "--quiet")
    assert again.exit_code == 1 and _error_lines(again) == [
        f"error: --out {out} is not empty; pass --overwrite to replace it or --resume latest to continue"]
    record = json.loads(cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", out, *QUICK, "--json",
                            "--quiet", "--overwrite").stdout)
    assert record["steps"] == 2 and record["weights"].endswith("pytorch_lora_weights.safetensors")


def test_overwrite_removes_what_a_previous_run_wrote_and_nothing_else(cli, tiny_sd, dataset, tmp_path):
    out = tmp_path / "out"
    run = ("finetune", "--data", dataset, "--model", tiny_sd, "--out", out, *QUICK[:-4], "--checkpoint-every", "1",
           "-q")
    assert cli(*run).exit_code == 0
    before = (out / "pytorch_lora_weights.safetensors").read_bytes()
    # The user's own files, some under names sdcli writes in other runs (a full run's unet/, --log-with's logs/).
    for name in ("notes.txt", "unet/weights.bin", "logs/events.txt"):
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text("mine")
    result = cli(*run, "--overwrite", "--seed", "5")
    assert result.exit_code == 0, result.stderr
    for name in ("notes.txt", "unet/weights.bin", "logs/events.txt"):
        assert (out / name).read_text() == "mine", name
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() != before  # the previous run's, replaced
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000001", "checkpoint-000002"]


@pytest.mark.parametrize("theirs", [["README.md"], ["loss.csv", "checkpoints/mine.txt"],
                                    ["pytorch_lora_weights.safetensors"]])
def test_overwrite_refuses_to_write_over_files_no_sdcli_run_recorded(cli, tiny_sd, dataset, tmp_path, monkeypatch,
                                                                      theirs):
    from conftest import one_error_line
    from sdcli import pipeline

    out = tmp_path / "out"
    for name in theirs:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("mine")
    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    line = one_error_line(cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", out, *QUICK[:-4],
                              "--checkpoint-every", "1", "--overwrite"), 1)
    assert all(Path(name).parts[0] in line for name in theirs) and "--overwrite" in line
    for name in theirs:
        assert (out / name).read_text() == "mine"


@pytest.mark.parametrize("code", ["ENOSPC", "EROFS", "EDQUOT"])
@pytest.mark.parametrize("where", ["checkpoint", "weights"])
def test_a_disk_that_fills_or_turns_read_only_mid_write_is_one_line_and_leaves_nothing_half_written(
        cli, tiny_sd, dataset, tmp_path, monkeypatch, where, code):
    import errno
    import os

    from conftest import one_error_line
    from sdcli.training import checkpoints, outputs

    out = tmp_path / "out"

    def fail(folder, name):
        (Path(folder) / name).write_bytes(b"half")  # part of a file, then the disk says no
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), str(Path(folder) / name))

    if where == "checkpoint":
        monkeypatch.setattr(checkpoints, "write_tree", lambda folder, stem, tree: fail(folder, f"{stem}.json"))
    else:
        monkeypatch.setattr(outputs, "save_lora", lambda *a, into, **k: fail(into, outputs.LORA_FILE))
    line = one_error_line(cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", out, *QUICK[:-2],
                              "--checkpoint-every", "1", "-q"), 1)
    assert os.strerror(getattr(errno, code)).lower() in line.lower() and str(out) in line
    left = [p.relative_to(out).as_posix() for p in out.rglob("*")]
    assert not [p for p in left if ".tmp" in p], left
    assert outputs.LORA_FILE not in left
    if where == "checkpoint":
        assert not checkpoints.checkpoint_dirs(out)
    else:  # the weights could not be written, but the training is saved and the line says how to continue
        assert checkpoints.checkpoint_dirs(out)[-1].name == "checkpoint-000002" and "--resume latest" in line


def test_an_out_name_past_the_file_systems_limit_is_one_line(cli, tiny_sd, dataset, tmp_path, monkeypatch):
    from conftest import one_error_line
    from sdcli import pipeline

    long = tmp_path / ("d" * 300)
    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    line = one_error_line(cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", long, *QUICK), 1)
    assert line.startswith(f"error: --out {long}") and "300 bytes" in line
    assert all(len(p.name) < 256 for p in tmp_path.iterdir())  # nothing made


def test_an_out_whose_kohya_file_name_would_pass_the_limit_is_refused_before_training(cli, tiny_sd, dataset,
                                                                                       tmp_path):
    from conftest import one_error_line

    out = tmp_path / ("k" * 250)  # a valid folder name; the kohya file adds ".safetensors"
    line = one_error_line(cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", out, *QUICK, "-q"), 1)
    assert "--out" in line and "262 bytes" in line
    assert not out.exists() or not list(out.iterdir())
    ok = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", out, *QUICK, "--lora-format", "diffusers")
    assert ok.exit_code == 0, ok.stderr  # a run that writes no kohya file is fine there


def _corrupt(root):
    path = root / "img01.png"
    path.write_bytes(path.read_bytes()[:40])


def _uncaptioned(root):
    (root / "img02.txt").unlink()


def _escaping(root):
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "../../etc/x.png", "text": "x"}) + "\n")


def _latin1_caption(root):
    (root / "img02.txt").write_bytes("a green triangle, déjà vu".encode("latin-1"))


def _empty(root):
    for p in root.iterdir():
        p.unlink()


@pytest.mark.parametrize(
    ("damage", "extra", "message"),
    [
        (_corrupt, ["--strict"], "img01.png: unreadable"),
        (_uncaptioned, [], "img02.png has no caption"),
        (_escaping, [], "metadata.jsonl line 1: file_name '../../etc/x.png' points outside --data"),
        (_empty, [], "no usable images (png, jpg, webp) in"),
        (_latin1_caption, [], "img02.txt is not UTF-8 text: byte 19 (0xe9) cannot be decoded; save it as UTF-8"),
    ],
    ids=["corrupt-strict", "no-caption", "escaping-path", "empty", "latin-1-caption"],
)
def test_bad_data_is_one_line_naming_it_and_exit_1(cli, tiny_sd, dataset, tmp_path, damage, extra, message):
    damage(dataset)
    result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", tmp_path / "out", *QUICK, *extra)
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("finetune:", "warning"))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def test_corrupt_image_without_strict_is_skipped_with_a_warning(cli, tiny_sd, dataset, tmp_path):
    _corrupt(dataset)
    result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", tmp_path / "out", *QUICK)
    assert result.exit_code == 0, result.stderr
    assert "warning: skipping img01.png: unreadable" in result.stderr and "data: 3 images" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--uncond-prob", "1.5"], "--uncond-prob must be between 0 and 1, got 1.5"),
        (["--epochs", "2"], "give --max-steps or --epochs, not both"),
        (["--resolution", "18"], "--resolution 18 must be a multiple of 4"),
        (["--lora-targets", "to_nothing"], "--lora-targets to_nothing: no such modules"),
        (["--resume", "latest"], "--resume latest: no checkpoint in"),
        (["--mixed-precision", "fp16", "--device", "cpu"], "--mixed-precision fp16 needs a GPU"),
    ],
)
def test_bad_options_exit_2_with_one_line(cli, tiny_sd, dataset, tmp_path, args, message):
    result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", tmp_path / "o", *QUICK, *args)
    assert result.exit_code == 2, result.stderr
    assert len(_error_lines(result)) == 1 and message in _error_lines(result)[0]


# Every number finetune takes is checked against the range declared with it (`sdcli.declare.Range`), before the
# model loads: NaN, inf and 1e308 pass an `x > 0` test and used to train to NaN weights and say "wrote".
@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--lr", "inf", "--learning-rate must be a finite number, got inf"),
    ("--lr", "nan", "--learning-rate must be a finite number, got nan"),
    ("--lr", "1e308", "--learning-rate must be positive and at most 1"),
    ("--lr", "-1e-4", "--learning-rate must be positive"),
    ("--learning-rate", "0", "--learning-rate must be positive"),
    ("--lora-alpha", "nan", "--lora-alpha must be a finite number"),
    ("--lora-alpha", "1e300", "--lora-alpha must be positive and at most 10000"),
    ("--noise-offset", "inf", "--noise-offset must be a finite number"),
    ("--noise-offset", "1e9", "--noise-offset must be between 0 and 1"),
    ("--resolution", "0", "--resolution must be between 8 and 16384"),
    ("--resolution", "-64", "--resolution must be between 8 and 16384"),
    ("--resolution", "1000000000", "--resolution must be between 8 and 16384"),
    ("--rank", "0", "--rank must be at least 1"),
    ("--mode-scale", "5", "--mode-scale must be between -1 and 1.75"),
    ("--logit-mean", "nan", "--logit-mean must be a finite number"),
    ("--logit-std", "0", "--logit-std must be positive"),
    ("--logit-std", "inf", "--logit-std must be a finite number"),
    ("--snr-gamma", "nan", "--snr-gamma must be a finite number"),
    ("--snr-gamma", "1e308", "--snr-gamma must be positive and at most 10000"),
    ("--debiased-snr-floor", "inf", "--debiased-snr-floor must be a finite number"),
    ("--ema-decay", "nan", "--ema-decay must be a finite number"),
    ("--ema-decay", "1", "--ema-decay must be between 0 and 1"),
    ("--weight-decay", "inf", "--weight-decay must be a finite number"),
    ("--max-grad-norm", "nan", "--max-grad-norm must be a finite number"),
    ("--uncond-prob", "nan", "--uncond-prob must be a finite number"),
    ("--prior-loss-weight", "inf", "--prior-loss-weight must be a finite number"),
    ("--distilled-guidance", "1e308", "--distilled-guidance must be between 0 and 100"),
    ("--validation-guidance", "nan", "--validation-guidance must be a finite number"),
    ("--validation-split", "nan", "--validation-split must be a finite number"),
    ("--seed", "-1", "--seed must be between 0 and 9223372036854775807"),
    ("--min-bucket", "100000", "--min-bucket must be between 8 and 16384"),
    ("--batch-size", "0", "--batch-size must be at least 1"),
])
def test_numbers_out_of_their_declared_range_are_refused_before_loading(cli, dataset, tmp_path, flag, value, message):
    # No model at all: the refusal comes before anything looks for one.
    result = cli("finetune", "--data", dataset, "--model", tmp_path / "no-such-model", "--out", tmp_path / "o",
                 *QUICK, flag, value)
    assert result.exit_code == 2, result.stderr
    assert _error_lines(result) == [f"error: {message}"] or message in _error_lines(result)[0], result.stderr
    assert len(_error_lines(result)) == 1 and not (tmp_path / "o").exists()


def test_every_number_finetune_takes_declares_its_range():
    # The class, not the cases: a numeric option added later without a range fails here.
    import typing

    from sdcli.declare import declared
    from sdcli.training.config import FinetuneConfig

    numeric = [d for d in declared(FinetuneConfig)
               if {int, float} & set(typing.get_args(d.type) or (d.type,)) and d.type is not bool]
    assert len(numeric) > 25
    assert [d.flag for d in numeric if d.opt.range is None] == []


def test_validation_or_class_folder_overlapping_the_data_is_refused(cli, tiny_sd, dataset, tmp_path, make_images):
    # --data is read with its subfolders: a validation folder inside it would be trained on, and a class folder
    # holding it would caption the instance images with the class prompt.
    inside = make_images(Path(dataset) / "held-out", 2)[0].parent
    result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", tmp_path / "o", *QUICK,
                 "--validation-data", inside)
    assert result.exit_code == 2, result.stderr
    assert len(_error_lines(result)) == 1 and "--validation-data" in _error_lines(result)[0] and "overlaps --data" in _error_lines(result)[0]
    result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", tmp_path / "o", *QUICK,
                 "--class-data", Path(dataset).parent, "--class-prompt", "a shape", "--num-class-images", "1")
    assert result.exit_code == 2, result.stderr
    assert "--class-data" in _error_lines(result)[0] and "overlaps --data" in _error_lines(result)[0]
    assert not (tmp_path / "o").exists()


def test_generate_with_the_lora_matches_plain_diffusers(cli, tiny_sd, dataset, tmp_path):
    import torch
    from diffusers import DiffusionPipeline

    out = tmp_path / "lora"
    assert cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", out, *QUICK).exit_code == 0
    png = tmp_path / "gen.png"
    result = cli("generate", "a red circle", "--model", tiny_sd, "--lora", out, "--seed", "3", "--steps", "3",
                 "--guidance", "7.5", "--out", png, "--quiet")
    assert result.exit_code == 0, result.stderr
    pipe = DiffusionPipeline.from_pretrained(tiny_sd)
    reference = np.asarray(pipe("a red circle", num_inference_steps=3, guidance_scale=7.5,
                                generator=torch.Generator("cpu").manual_seed(3)).images[0])
    pipe.load_lora_weights(str(out))
    expected = pipe("a red circle", num_inference_steps=3, guidance_scale=7.5,
                    generator=torch.Generator("cpu").manual_seed(3)).images[0]
    produced = np.asarray(Image.open(png).convert("RGB"))
    assert np.array_equal(produced, np.asarray(expected))
    assert not np.array_equal(produced, reference)  # and the LoRA did change the picture


def test_full_output_is_a_model_for_generate_and_epochs_set_the_length(cli, tiny_sd, dataset, tmp_path):
    out = tmp_path / "full"
    result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", out, "--full", "--epochs", "2",
                 "--batch-size", "2", "--checkpoint-every", "0", "--random-crop", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 4  # 4 images / batch 2 = 2 steps an epoch
    png = tmp_path / "from-full.png"
    made = cli("generate", "a red circle", "--model", out, "--seed", "1", "--steps", "2", "--out", png, "--quiet")
    assert made.exit_code == 0, made.stderr
    assert Image.open(png).size == (16, 16)


@pytest.mark.parametrize("class_name", OTHER_PIPELINES)
def test_a_pipeline_class_of_no_family_is_one_line_before_data_or_weights_load(cli, tiny_sd, dataset, tmp_path,
                                                                              no_pipeline_loads, class_name):
    folder = as_other_pipeline(tiny_sd, tmp_path / "other", class_name)
    line = one_error_line(cli("finetune", "--data", dataset, "--model", folder, "--out", tmp_path / "out", *QUICK), 1)
    assert f"--model {folder} is a {class_name}; sdcli works with Stable Diffusion" in line
    assert no_pipeline_loads == [] and not (tmp_path / "out").exists()
