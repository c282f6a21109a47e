"""Aspect-ratio buckets, --data DIR:N repeats and caption options: sizes, assignment, the table, and the
one-line refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import one_error_line

from sdcli.errors import DataError, UsageError
from sdcli.training.buckets import aspect_error, assign, bucket_sizes, nearest, own_size
from sdcli.training.config import FinetuneConfig, parse_data
from sdcli.training.data import Item, discover

QUICK = ("--max-steps", "2", "--batch-size", "2", "--checkpoint-every", "0", "--lr", "1e-2")


def error_line(result, code: int) -> str:
    """The one error line of a run refused once the model is known (after the line naming the processes)."""
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(line.startswith(("finetune:", "error:", "warning:")) for line in result.stderr.splitlines()
               if line.strip()), result.stderr
    return errors[0]


def mixed(root: Path, make_images, sizes=((16, 16), (24, 16), (16, 24), (32, 12))) -> Path:
    """One captioned image of each size in ``root``, each in a folder named after its size."""
    for w, h in sizes:
        make_images(root / f"{w}x{h}", n=1, size=(w, h))
    return root


# ---------------------------------------------------------------------------
# Sizes and assignment


def test_sd_buckets_cover_512_squared_in_steps_of_64_both_ways():
    sizes = bucket_sizes(512, 64, 256, 1024)
    assert (512, 512) in sizes and (384, 640) in sizes and (256, 1024) in sizes and (704, 320) in sizes
    assert set(sizes) == {(h, w) for w, h in sizes}  # both orientations
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024
        assert w * h <= 512 * 512
        assert (w + 64) * h > 512 * 512 or w * (h + 64) > 512 * 512 or max(w, h) == 1024  # as large as it can be
    assert len(sizes) == 17
    # A tiny test model: 4 px steps around 16x16.
    assert bucket_sizes(16, 4, 8, 32) == [(8, 24), (8, 28), (8, 32), (12, 20), (16, 16), (20, 12), (24, 8), (28, 8),
                                          (32, 8)]


def test_nearest_bucket_is_by_log_aspect_ratio_so_portrait_and_landscape_match():
    sizes = bucket_sizes(512, 64, 256, 1024)
    # 0.525 lies between 320x704 (0.455) and 384x640 (0.6): nearer 0.455 by difference, nearer 0.6 by ratio.
    assert nearest(sizes, (525, 1000)) == (384, 640) and nearest(sizes, (1000, 525)) == (640, 384)
    assert nearest(sizes, (3000, 2000)) == (640, 384) and nearest(sizes, (1000, 1000)) == (512, 512)
    assert aspect_error((1000, 525), (640, 384)) == pytest.approx(abs(math.log(1000 / 525) - math.log(640 / 384)))


def test_no_upscale_gives_small_images_their_own_size_and_skips_the_tiniest(tmp_path, make_images):
    root = mixed(tmp_path / "data", make_images, sizes=((40, 40), (12, 12), (10, 18), (6, 20)))
    report = discover(root)
    warnings = []
    layout = assign(report, 16, 4, 8, 32, upscale=False, warn=warnings.append)
    sizes = {e.path.parent.name: s for e, s in zip(report.examples, layout.sizes)}
    # 40x40 covers 16x16; 12x12 keeps 12x12; 10x18 (nearest 12x20) floors to 8x16, never above it; 6x20 would be
    # 4 px wide.
    assert sizes == {"40x40": (16, 16), "12x12": (12, 12), "10x18": (8, 16)}
    assert own_size((10, 18), 16, 4, 32) == (8, 16) and own_size((40, 40), 16, 4, 32) == (16, 16)
    assert layout.own == 2 and layout.upscaled == 0
    assert warnings == ["warning: skipping 6x20/img00.png: 6x20 is smaller than the smallest bucket (8 px a side) "
                        "and --no-upscale keeps it from being enlarged"]
    assert report.skipped[-1][0] == "6x20/img00.png"
    with pytest.raises(DataError, match=r"^6x20/img00\.png: 6x20 is smaller than the smallest bucket"):
        assign(discover(root), 16, 4, 8, 32, upscale=False, strict=True)
    upscaled = assign(discover(root), 16, 4, 8, 32)
    assert upscaled.upscaled == 3 and upscaled.own == 0  # 12x12, 10x18 and 6x20 are enlarged instead


def test_table_groups_and_record(tmp_path, make_images):
    root = mixed(tmp_path / "data", make_images)
    report = discover([(root / "16x16", 1), (root / "24x16", 3), (root / "16x24", 1), (root / "32x12", 2)])
    layout = assign(report, 16, 4, 8, 32)
    assert layout.sizes == [(16, 16), (20, 12), (12, 20), (24, 8)]
    assert layout.groups() == [[2], [0], [1, 1, 1], [3, 3]]  # by size, each example as often as it repeats
    assert layout.lines() == [
        "buckets: 4 sizes in use of 9 offered (area up to 16x16, sides 8-32 in steps of 4)",
        "       size  images  per epoch  mean aspect error",
        "      12x20       1          1  11.1%",
        "      16x16       1          1  0.0%",
        "      20x12       1          3  11.1%",
        "       24x8       1          2  12.5%",
    ]
    record = layout.record()
    assert record["table"][2] == {"size": [20, 12], "images": 1, "per_epoch": 3, "mean_aspect_error": 0.1111}
    assert record["offered"][0] == [8, 24] and record["step"] == 4
    square = assign(discover(root), 16, 4, enabled=False)
    assert set(square.sizes) == {(16, 16)} and square.lines() == ["buckets: off, every image cropped to 16x16"]


@pytest.mark.parametrize(("spec", "expected"), [
    ("photos", ("photos", 1)), ("photos:20", ("photos", 20)), ("C:\\photos", ("C:\\photos", 1)),
    ("C:\\photos:3", ("C:\\photos", 3)), ("D:/data", ("D:/data", 1)), ("a:b/c:5", ("a:b/c", 5)),
])
def test_data_repeat_counts_and_windows_drives(spec, expected):
    folder, repeats = parse_data(spec)
    assert (str(folder), repeats) == (str(Path(expected[0])), expected[1])


def test_an_existing_folder_with_a_colon_is_taken_whole(tmp_path):
    (tmp_path / "shots:2024").mkdir()
    assert parse_data(str(tmp_path / "shots:2024")) == (tmp_path / "shots:2024", 1)


@pytest.mark.parametrize(("suffix", "message"), [
    (":0", "the repeat count must be at least 1, got 0"),
    (":-2", "the repeat count must be at least 1, got -2"),
    (":abc", "(DIR:N, a whole number), got 'abc'"),
    (":1.5", "(DIR:N, a whole number), got '1.5'"),
    (":", "(DIR:N, a whole number), got ''"),
])
def test_bad_repeat_count_is_one_line_exit_2_and_writes_nothing(cli, tiny_sd, dataset, tmp_path, suffix, message):
    out = tmp_path / "out"
    result = cli("finetune", "--data", dataset, "--data", f"{dataset}{suffix}", "--model", tiny_sd, "--out", out,
                 *QUICK)
    assert message in one_error_line(result, 2) and f"--data {dataset}{suffix}:" in result.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------
# End to end


def test_mixed_aspect_run_prints_and_records_the_bucket_table(cli, tiny_sd, tmp_path, make_images):
    root = mixed(tmp_path / "data", make_images)
    out = tmp_path / "out"
    result = cli("finetune", "--data", root / "16x16", "--data", f"{root / '24x16'}:3", "--data", root / "16x24",
                 "--data", root / "32x12", "--model", tiny_sd, "--out", out, "--epochs", "1", "--batch-size", "2",
                 "--checkpoint-every", "0")
    assert result.exit_code == 0, result.stderr
    err = result.stderr
    assert "  --data: 16x16 1, 24x16 1 ×3, 16x24 1, 32x12 1; 6 an epoch with repeats" in err
    assert ("buckets: 4 sizes in use of 9 offered (area up to 16x16, sides 8-32 in steps of 4)\n"
            "       size  images  per epoch  mean aspect error\n"
            "      12x20       1          1  11.1%\n") in err
    assert err.index("buckets:") < err.index("training LoRA")
    record = json.loads((out / "training_settings.json").read_text())
    assert [row["size"] for row in record["buckets"]["table"]] == [[12, 20], [16, 16], [20, 12], [24, 8]]
    assert record["buckets"]["min_side"] == 8 and record["buckets"]["max_side"] == 32
    assert record["config"]["min_bucket"] == 8 and record["config"]["max_bucket"] == 32
    assert record["config"]["data"][1].endswith("24x16:3")
    assert [f["repeats"] for f in record["data"]["folders"]] == [1, 3, 1, 1]
    # Batch 2 and one size a batch: 1 + 1 + 2 (3 samples) + 1 batches, one optimizer step each.
    assert record["steps"] == 5 and record["data"]["samples_per_epoch"] == 10


def test_resume_with_another_bucket_setting_is_refused_before_anything_is_written(cli, tiny_sd, tmp_path,
                                                                                  make_images):
    root = mixed(tmp_path / "data", make_images)
    out = tmp_path / "out"
    first = cli("finetune", "--data", root, "--model", tiny_sd, "--out", out, "--max-steps", "2", "--batch-size", "1",
                "--checkpoint-every", "1")
    assert first.exit_code == 0, first.stderr
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for change, shown in ((["--no-buckets"], "buckets (True -> False)"), (["--max-bucket", "24"], "max_bucket (32 -> 24)"),
                          (["--no-upscale"], "upscale (True -> False)")):
        again = cli("finetune", "--data", root, "--model", tiny_sd, "--out", out, "--max-steps", "3", "--batch-size",
                    "1", "--resume", "latest", *change)
        line = error_line(again, 2)
        assert "settings differ from the checkpoint's" in line and shown in line
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    again = cli("finetune", "--data", f"{root}:2", "--model", tiny_sd, "--out", out, "--max-steps", "3",
                "--batch-size", "1", "--resume", "latest")
    assert "data (" in error_line(again, 2)  # the repeat count decides every epoch's order too


def test_no_upscale_skips_an_image_too_small_for_any_bucket_naming_it(cli, tiny_sd, tmp_path, make_images):
    root = mixed(tmp_path / "data", make_images, sizes=((16, 16), (24, 16), (12, 12), (6, 20)))
    out = tmp_path / "out"
    result = cli("finetune", "--data", root, "--model", tiny_sd, "--out", out, *QUICK, "--no-upscale")
    assert result.exit_code == 0, result.stderr
    assert ("warning: skipping 6x20/img00.png: 6x20 is smaller than the smallest bucket (8 px a side) and "
            "--no-upscale keeps it from being enlarged") in result.stderr
    assert "      12x12       1          1  0.0%" in result.stderr  # kept small, not enlarged to 16x16
    record = json.loads((out / "training_settings.json").read_text())
    assert record["data"]["images"] == 3 and record["data"]["skipped"][0][0] == "6x20/img00.png"
    strict = cli("finetune", "--data", root, "--model", tiny_sd, "--out", tmp_path / "o2", *QUICK, "--no-upscale",
                 "--strict")
    assert "6x20/img00.png: 6x20 is smaller than the smallest bucket" in error_line(strict, 1)
    assert not (tmp_path / "o2" / "pytorch_lora_weights.safetensors").exists()
    tiny = mixed(tmp_path / "tiny", make_images, sizes=((6, 20), (4, 4)))
    none = cli("finetune", "--data", tiny, "--model", tiny_sd, "--out", tmp_path / "o3", *QUICK, "--no-upscale")
    assert "no image in --data is large enough for a bucket with --no-upscale" in error_line(none, 1)
    assert not list((tmp_path / "o3").glob("*.json"))


@pytest.mark.parametrize(("args", "message"), [
    (["--keep-tokens", "1"], "--keep-tokens keeps tags in place for --shuffle-captions, which was not given"),
    (["--shuffle-captions", "--keep-tokens", "-1"], "--keep-tokens must not be negative"),
    (["--no-buckets", "--min-bucket", "8"], "--min-bucket sizes the aspect-ratio buckets, which --no-buckets turns off"),
    (["--no-buckets", "--no-upscale"], "--no-upscale gives small images a bucket of their own size"),
    (["--min-bucket", "10"], "--min-bucket 10 must be a multiple of 4 for this model"),
    (["--min-bucket", "20"], "--min-bucket 20 is larger than --resolution 16"),
    (["--max-bucket", "12"], "--max-bucket 12 is smaller than --resolution 16"),
    (["--min-bucket", "32", "--max-bucket", "24"], "--min-bucket 32 is larger than --max-bucket 24"),
    (["--caption-extension", ".png"], "--caption-extension must be a file extension like .txt"),
])
def test_bad_bucket_and_caption_options_exit_2_with_one_line(cli, tiny_sd, dataset, tmp_path, args, message):
    result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", tmp_path / "o", *QUICK, *args)
    assert message in error_line(result, 2)
    assert not (tmp_path / "o" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_models_train_on_buckets(tiny_flow_models, tmp_path, make_images, make_config, name):
    from sdcli.training import finetune

    root = mixed(tmp_path / "data", make_images, sizes=((16, 16), (24, 16), (16, 24)))
    out = tmp_path / "out"
    result = finetune(make_config(root, out, tiny_flow_models[name], resolution=16, max_steps=3, batch_size=1))
    assert all(math.isfinite(loss) for loss in result.losses)
    table = json.loads((out / "training_settings.json").read_text())["buckets"]["table"]
    assert len(table) == 3 and all(w * h <= 256 for w, h in (row["size"] for row in table))


# ---------------------------------------------------------------------------
# Inputs: latents of each bucket's shape, SDXL's real size and crop, shuffled captions


def _pipe(path):
    from sdcli.pipeline import load_pipeline

    return load_pipeline(path, device="cpu").pipe


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_cached_bucket_latents_match_the_live_path_and_sdxl_gets_the_real_crop(tiny_models, tmp_path, make_images,
                                                                               family):
    from sdcli.training.inputs import TrainingInputs

    root = tmp_path / "data"
    make_images(root / "tall", n=1, size=(16, 24))
    make_images(root / "wide", n=2, size=(24, 16))
    examples = discover(root).examples  # tall/img00, wide/img00, wide/img01
    pipe = _pipe(tiny_models[family])
    sizes = [(12, 20), (12, 20), (20, 12)]  # wide/img00 gets the other orientation's bucket: a real crop
    made = {cached: TrainingInputs(pipe, examples, sizes=sizes, center_crop=True, device=torch.device("cpu"),
                                   cache_latents=cached, cache_text=cached) for cached in (True, False)}
    made[True].build_cache(flip=True, batch_size=2)
    assert [tuple(m.shape[-2:]) for m in made[True].mean] == [(10, 6), (10, 6), (6, 10)]  # a 2x VAE
    items = [Item(1, flip=True), Item(0, drop=True)]
    a, b = (made[c].batch(items, torch.Generator().manual_seed(3)) for c in (True, False))
    assert a.latents.shape == (2, 4, 10, 6)
    torch.testing.assert_close(a.latents, b.latents, rtol=1e-5, atol=1e-5)
    if family == "sdxl":
        time_ids = a.cond["added_cond_kwargs"]["time_ids"]
        torch.testing.assert_close(time_ids, b.cond["added_cond_kwargs"]["time_ids"])
        # (original h, w, crop top, left, bucket h, w): 24x16 resized to cover 12x20 is 30x20, cropped 9 px in;
        # 16x24 resized to cover it is 13x20, cropped at 0.
        assert time_ids.tolist() == [[16, 24, 0, 9, 20, 12], [24, 16, 0, 0, 20, 12]]
    with pytest.raises(RuntimeError):  # two sizes cannot share a batch, which is why every batch holds one
        made[True].batch([Item(0), Item(2)], torch.Generator().manual_seed(0))


def test_shuffled_captions_are_encoded_each_step_in_the_item_order(tiny_sd, tmp_path, make_images):
    from sdcli.training.data import shuffle_tags
    from sdcli.training.inputs import TrainingInputs

    root = tmp_path / "data"
    make_images(root, n=1)
    (root / "img00.txt").write_text("sks, red, circle, dark, small")
    examples = discover(root).examples
    pipe = _pipe(tiny_sd)
    inputs = TrainingInputs(pipe, examples, resolution=16, center_crop=True, device=torch.device("cpu"),
                            cache_latents=True, cache_text=True, shuffle_captions=True, keep_tokens=1)
    inputs.build_cache(flip=False)
    assert inputs.cache_text is False and inputs.hidden is None  # each order encoded when a step needs it
    orders = {inputs.prompt_of(Item(0, tags=seed)) for seed in range(12)}
    assert len(orders) > 6 and all(o.startswith("sks, ") for o in orders)
    batch = inputs.batch([Item(0, tags=4), Item(0, tags=4, drop=True)], torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = inputs.text.encode([shuffle_tags("sks, red, circle, dark, small", 1, 4), ""])
    torch.testing.assert_close(batch.cond["encoder_hidden_states"], expected)


def test_caption_extension_reads_that_sidecar(tmp_path, make_images):
    root = tmp_path / "data"
    make_images(root, n=2, captions="none")
    (root / "img00.caption").write_text("from the caption file")
    (root / "img00.txt").write_text("ignored")
    report = discover(root, caption_extension=".caption", allow_empty_captions=True)
    assert [e.caption for e in report.examples] == ["from the caption file", None]
    assert report.caption_sources == {".caption": 1, "none": 1} and report.ignored == {".txt": 1}
    with pytest.raises(DataError, match=r"img01.png has no caption \(no img01.caption beside it"):
        discover(root, caption_extension=".caption")


def test_shuffle_captions_run_notes_it_and_long_captions_name_their_folder(tiny_sd, tmp_path, make_images,
                                                                          make_config, capsys):
    from sdcli.training import finetune

    a, b = tmp_path / "a", tmp_path / "b"
    make_images(a, n=2)
    make_images(b, n=2)
    (b / "img01.txt").write_text(", ".join(["red"] * 80))
    finetune(make_config([a, f"{b}:2"], tmp_path / "out", tiny_sd, max_steps=2, quiet=False, shuffle_captions=True,
                         keep_tokens=1))
    err = capsys.readouterr().err
    assert "note: --shuffle-captions encodes captions every step" in err
    assert "cached latents in" in err and "text embeddings" not in err
    assert "warning: 1 caption longer than the text encoder's 77 tokens" in err and "will be cut there: b/img01.png" in err
    assert "data: 4 images in " + str(tmp_path) in err and "a 2, b 2 ×2; 6 an epoch with repeats" in err


def test_config_from_python_takes_a_path_or_a_list():
    one = FinetuneConfig(data=Path("photos"), out=Path("o"))
    one._check_data()
    assert one.data == ["photos"] and one.data_sources == [(Path("photos"), 1)]
    many = FinetuneConfig(data=["photos", "closeups:4"], out=Path("o"))
    assert many.to_json()["data"] == ["photos", "closeups:4"]
    with pytest.raises(UsageError, match="--data closeups:0"):
        FinetuneConfig(data=["closeups:0"], out=Path("o")).check()


def test_several_resolutions_train_each_image_at_each_and_resume_bit_identically(tiny_sd, tmp_path, make_images,
                                                                                make_config):
    import signal

    from safetensors.torch import load_file

    from sdcli.training import finetune

    data = tmp_path / "data"
    make_images(data / "square", n=2)
    make_images(data / "wide", n=2, size=(24, 16))
    # Four batches of 2 an epoch (each image at 8 and at 16 px), so the resumed steps cross into epoch 1.
    settings = dict(resolution=(8, 16), max_steps=5, batch_size=2, flip=True, uncond_prob=0.3, checkpoint_every=0,
                    seed=3)
    whole = finetune(make_config(data, tmp_path / "whole", tiny_sd, **settings))
    record = json.loads((tmp_path / "whole" / "training_settings.json").read_text())
    assert record["config"]["resolution"] == [8, 16] and record["buckets"]["resolution"] == [8, 16]
    table = {tuple(row["size"]): row["per_epoch"] for row in record["buckets"]["table"]}
    assert sum(table.values()) == 8  # 4 images at 2 sizes
    assert any(w * h <= 64 for w, h in table) and any(w * h > 64 for w, h in table)

    def press_ctrl_c(info):
        if info.step == 2:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        finetune(make_config(data, tmp_path / "split", tiny_sd, **settings), callback=press_ctrl_c)
    resumed = finetune(make_config(data, tmp_path / "split", tiny_sd, resume="latest", **settings))
    assert resumed.losses == whole.losses[3:]  # stopped after step 3, where the stop was seen
    a, b = (load_file(str(tmp_path / run / "pytorch_lora_weights.safetensors")) for run in ("whole", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("value,extra,expected", [
    ("8,8", [], "--resolution 8,8 names a size twice"),
    ("8,x", [], "--resolution takes whole numbers of pixels, one or a comma list (512,768,1024), got '8,x'"),
    ("8,99999", [], "--resolution must be between 8 and 16384, got 99999"),
    ("8,16", ["--no-upscale"], "--no-upscale with several --resolution sizes is not supported"),
])
def test_a_resolution_list_is_checked_before_loading(cli, dataset, tmp_path, no_pipeline_loads, value, extra, expected):
    result = cli("finetune", "--data", dataset, "--out", tmp_path / "o", "--resolution", value, *extra)
    assert expected in one_error_line(result, 2)
    assert not no_pipeline_loads
