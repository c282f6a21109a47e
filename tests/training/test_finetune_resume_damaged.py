"""`finetune --resume` from a checkpoint with a damaged file: one line naming it and the earlier checkpoints, exit 1."""

from __future__ import annotations

import shutil

import pytest

from conftest import train_config, write_images

QUICK = ("--batch-size", "2", "--lr", "1e-2", "--checkpoint-every", "1")


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def trained(tiny_sd, tmp_path_factory):
    """A real 2-step run with a checkpoint after each step, made once; tests damage copies of it."""
    from sdcli.training import finetune

    root = tmp_path_factory.mktemp("damaged")
    data = write_images(root / "data")[0].parent
    finetune(train_config(data, root / "run", tiny_sd, max_steps=2, checkpoint_every=1, learning_rate=1e-2))
    assert sorted(p.name for p in (root / "run" / "checkpoints").iterdir()) == [
        "checkpoint-000001", "checkpoint-000002"]
    return root / "run"


@pytest.fixture
def two_checkpoints(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "run")


@pytest.mark.parametrize("damage", [
    ("optimizer.bin", 0.5),
    ("scheduler.bin", 0.0),
    ("random_states_0.pkl", 0.5),  # accelerate would skip it quietly, and the resume would not be exact
    ("model.safetensors", 0.9),
])
def test_a_truncated_checkpoint_file_is_one_line_naming_it_and_the_earlier_checkpoint(
        cli, tiny_sd, trained, tmp_path, damage):
    name, keep = damage
    out = tmp_path / f"copy-{name}"
    shutil.copytree(trained, out)
    newest = out / "checkpoints" / "checkpoint-000002"
    _truncate(newest / name, keep)

    result = cli("finetune", "--data", trained.parent / "data", "--model", tiny_sd, "--out", out, "--max-steps", "3",
                 *QUICK, "-q", "--resume", "latest")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1, result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 1
    assert lines[0].startswith(f"error: checkpoint {newest} is damaged: {name} is truncated or unreadable; ")
    assert f"--resume {out / 'checkpoints' / 'checkpoint-000001'}" in lines[0]
    assert "holds checkpoint-000001, checkpoint-000002" in lines[0]
    # Nothing was trained or overwritten: the damaged checkpoint is still the newest.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000001", "checkpoint-000002"]


def test_a_missing_file_in_the_only_checkpoint_says_to_start_again(cli, tiny_sd, trained, two_checkpoints):
    shutil.rmtree(two_checkpoints / "checkpoints" / "checkpoint-000001")
    newest = two_checkpoints / "checkpoints" / "checkpoint-000002"
    (newest / "optimizer.bin").unlink()
    result = cli("finetune", "--data", trained.parent / "data", "--model", tiny_sd, "--out", two_checkpoints,
                 "--max-steps", "3",
                 *QUICK, "-q", "--resume", str(newest))
    assert result.exit_code == 1, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith(f"error: checkpoint {newest} is damaged: ") and "optimizer.bin" in line
    assert line.endswith("holds no earlier one; start again without --resume")


def test_an_intact_checkpoint_passes_the_check(trained):
    from sdcli.training.checkpoints import damaged_files

    assert damaged_files(trained / "checkpoints" / "checkpoint-000002") == []
