"""`sdcli finetune --config FILE`: every option a key, declared once; flags win; a run's record replays."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import one_error_line

LORA = "pytorch_lora_weights.safetensors"

# A typical LoRA run, as flags and as the same settings in a file (with a dataset table, an alias and a
# comma string where the flag takes one); the file's rank is overridden by a flag.
FLAGS = ("--rank", "2", "--lr", "1e-3", "--max-steps", "2", "--batch-size", "2", "--checkpoint-every", "0",
         "--seed", "5", "--flip", "--lora-targets", "to_q,to_v", "--caption-extension", ".caption", "--quiet")
TOML = '''
rank = 16
lr = 1e-3
max-steps = 2
batch_size = 2
checkpoint_every = 0
seed = 5
flip = true
lora_targets = "to_q,to_v"
quiet = true

[[datasets]]
folder = "{data}"
num_repeats = 2
caption_extension = ".caption"
'''


def _data(tmp_path, make_images):
    data = tmp_path / "data"
    for path in make_images(data, n=3, captions="txt"):
        path.with_suffix(".txt").rename(path.with_suffix(".caption"))
    return data


def test_a_config_file_trains_as_its_flags_do_flags_win_and_a_record_replays(cli, tiny_sd, tmp_path, make_images):
    data = _data(tmp_path, make_images)
    (tmp_path / "train.toml").write_text(TOML.format(data=data))
    flags = cli("finetune", "--data", f"{data}:2", "--model", tiny_sd, "--out", tmp_path / "flags", *FLAGS)
    assert flags.exit_code == 0, flags.stderr
    from_file = cli("finetune", "--config", tmp_path / "train.toml", "--model", tiny_sd, "--out", tmp_path / "file",
                    "--rank", "2")
    assert from_file.exit_code == 0, from_file.stderr
    replay = cli("finetune", "--config", tmp_path / "flags" / "training_settings.json", "--out", tmp_path / "again")
    assert replay.exit_code == 0, replay.stderr

    expected = load_file(str(tmp_path / "flags" / LORA))
    assert all(v.shape[0] == 2 or v.shape[1] == 2 for v in expected.values())  # rank 2, the flag's
    for run in ("file", "again"):
        got = load_file(str(tmp_path / run / LORA))
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), run
    settings = json.loads((tmp_path / "file" / "training_settings.json").read_text())["config"]
    assert settings["data"] == [f"{data}:2"] and settings["caption_extension"] == ".caption"


def test_print_config_writes_the_effective_settings_which_read_back_the_same(cli, tmp_path, no_pipeline_loads):
    (tmp_path / "data").mkdir()
    (tmp_path / "train.toml").write_text(TOML.format(data=tmp_path / "data"))
    first = cli("finetune", "--config", tmp_path / "train.toml", "--out", tmp_path / "o", "--seed", "9",
                "--print-config")
    assert first.exit_code == 0, first.stderr
    import tomllib

    printed = tomllib.loads(first.stdout)
    assert printed["seed"] == 9 and printed["rank"] == 16 and printed["learning_rate"] == 1e-3
    assert printed["data"] == [f"{tmp_path / 'data'}:2"] and printed["lora_targets"] == ["to_q", "to_v"]
    assert printed["ema_decay"] == 0.9999  # defaults too: the whole effective config
    (tmp_path / "printed.toml").write_text(first.stdout)
    again = cli("finetune", "--config", tmp_path / "printed.toml", "--print-config")
    assert again.stdout == first.stdout
    assert not no_pipeline_loads and not (tmp_path / "o").exists()


def test_a_yaml_file_reads_as_the_toml_one(tmp_path):
    from sdcli.training import config_file

    (tmp_path / "a.toml").write_text(TOML.format(data="photos"))
    (tmp_path / "a.yaml").write_text("rank: 16\nlr: 0.001\nmax-steps: 2\nbatch_size: 2\ncheckpoint_every: 0\n"
                                     "seed: 5\nflip: true\nlora_targets: to_q,to_v\nquiet: true\n"
                                     "datasets:\n  - folder: photos\n    num_repeats: 2\n"
                                     "    caption_extension: .caption\n")
    assert config_file.read(tmp_path / "a.yaml") == config_file.read(tmp_path / "a.toml")


@pytest.mark.parametrize("text,expected", [
    ("rnak = 4", "unknown key 'rnak' (did you mean 'rank'?)"),
    ("learning_rat = 1e-4", "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
    ('rank = "4"', "rank must be a whole number, got str '4'"),
    ("flip = 1", "flip must be true or false, got int 1"),
    ("validation_prompt = 3", "validation_prompt must be a list of strings, got int 3"),
    ('adapter = "lorax"', "adapter must be one of 'lora', 'dora', 'loha', 'lokr', got 'lorax'"),
    ("rank = 0", "--rank must be at least 1, got 0"),  # the flag's own range check
    ("rank = = 4", "is not valid TOML"),
    ('[[datasets]]\nfolder = "a"\ncaption_extension = ".a"\n[[datasets]]\nfolder = "b"\ncaption_extension = ".b"',
     "datasets[2]: caption_extension '.b' differs from datasets[1]'s '.a'; sdcli reads one caption_extension"),
    ('[[datasets]]\nfolder = "a"\nrepeat = 2', "datasets[1]: unknown dataset key 'repeat' (did you mean 'repeats'?)"),
    ('[[datasets]]\nfolder = "a"\nrank = 2', "unknown dataset key 'rank'; it is set for the whole run"),
])
def test_a_config_file_mistake_is_one_line_naming_the_key(cli, tmp_path, no_pipeline_loads, text, expected):
    (tmp_path / "data").mkdir()
    (tmp_path / "bad.toml").write_text(text + "\n")
    result = cli("finetune", "--config", tmp_path / "bad.toml", "--data", tmp_path / "data", "--out", tmp_path / "o")
    assert expected in one_error_line(result, 2)
    assert not no_pipeline_loads
