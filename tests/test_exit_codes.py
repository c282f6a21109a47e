"""Exit codes mean one thing each: 2 the command line is wrong whatever is on disk (a bad value, an impossible
combination); 1 the command line is fine but a model, data or output it names is missing, damaged or in the way."""

from __future__ import annotations

import pytest


def _one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize("compare", [",", " , ,", ""])
def test_compare_that_names_no_schedule_is_refused_not_the_default_shown(cli, compare):
    result = cli("inspect-schedule", "--compare", compare)
    assert result.exit_code == 2 and result.stdout == ""
    assert f"error: --compare {compare!r} names no schedule" in _one_line(result)


def test_compare_ignores_empty_items_between_names(cli):
    result = cli("inspect-schedule", "--compare", "cosine,,sdxl,", "--at", "0", "-q")
    assert result.exit_code == 0, result.stderr
    assert "cosine" in result.stdout and "sdxl" in result.stdout


@pytest.mark.parametrize("args,code,words", [
    # usage: the values themselves are wrong
    (["generate", "x", "--model", "{model}", "--steps", "0"], 2, "--steps must be at least 1"),
    (["generate", "x", "--model", "{model}", "--seed", "1,2", "--num-images", "2"], 2, "not both"),
    # model, data, output: a path names something missing or in the way
    (["generate", "x", "--model", "{model}", "--lora", "no-such-lora"], 1, "--lora: no such file or folder"),
    (["generate", "x", "--model", "{model}", "--prompt-file", "no-such.txt"], 1, "--prompt-file: no such file"),
    (["generate", "x", "--model", "no-such-folder/"], 1, "no-such-folder"),
    (["finetune", "--data", "{data}", "--model", "{model}", "--out", "a-file"], 1, "is a file, not a folder"),
])
def test_each_kind_of_error_has_its_exit_code(cli, tiny_sd, dataset, args, code, words):
    from pathlib import Path

    Path("a-file").write_text("x")
    result = cli(*[a.format(model=tiny_sd, data=dataset) for a in args])
    assert result.exit_code == code, result.stderr
    assert words in _one_line(result)


def test_resume_from_a_checkpoint_with_unreadable_state_is_a_data_error(cli, tiny_sd, dataset, tmp_path):
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "sdcli_state.json").write_text("{")
    result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", tmp_path / "run", "--resume", "latest",
                 "--max-steps", "6", "-q")
    assert result.exit_code == 1, result.stderr
    line = _one_line(result)
    assert line.startswith(f"error: checkpoint {checkpoint} is damaged: unreadable sdcli_state.json")
    assert line.endswith("holds no earlier one; start again without --resume")
