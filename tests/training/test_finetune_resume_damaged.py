"""`finetune --resume` from a checkpoint with a damaged file: one line naming it and the earlier checkpoints, exit 1;
from one whose files would run code (never unpickled without --allow-pickle), or one made for another model."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import one_error_line, train_config, write_images

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
    ("optimizer.safetensors", 0.5),
    ("optimizer.json", 0.5),
    ("scheduler.json", 0.0),
    ("random_states_0.json", 0.5),  # skipped quietly, the resume would not be exact
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
    (newest / "optimizer.safetensors").unlink()
    result = cli("finetune", "--data", trained.parent / "data", "--model", tiny_sd, "--out", two_checkpoints,
                 "--max-steps", "3",
                 *QUICK, "-q", "--resume", str(newest))
    assert result.exit_code == 1, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith(f"error: checkpoint {newest} is damaged: ") and "optimizer.safetensors" in line
    assert line.endswith("holds no earlier one; start again without --resume")


def test_an_intact_checkpoint_passes_the_check(trained):
    from sdcli.training.checkpoints import damaged_files

    assert damaged_files(trained / "checkpoints" / "checkpoint-000002") == []


# ---------------------------------------------------------------- files that would run code


class _RunsCode:
    """Unpickling this runs a shell command that leaves ``marker`` behind."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(file, marker):
    import torch

    torch.save(_RunsCode(marker), file)  # a zip archive like accelerate's, so it passes the truncation check


def _as_pickled(ckpt):
    """Rewrite a checkpoint into the layout sdcli wrote before checkpoint format 2 (accelerate's save_state:
    pickled optimizer, scheduler, EMA and RNG); a checkpoint already in it is left as it is."""
    import torch

    from sdcli.training import checkpoints

    state = json.loads((ckpt / checkpoints.STATE_FILE).read_text())
    if state.pop("format", None) is None:
        return
    names = {"optimizer": "optimizer.bin", "scheduler.bin": None, "scheduler": "scheduler.bin",
             "ema": "custom_checkpoint_0.pkl", "random_states_0": "random_states_0.pkl"}
    for stem, name in names.items():
        if name is None or not (ckpt / f"{stem}.json").exists():
            continue
        tree = checkpoints.read_tree(ckpt, stem)
        if stem == "random_states_0":
            tree = {"step": tree["step"], "random_state": tree["python"], "numpy_random_seed": tree["numpy"],
                    "torch_manual_seed": tree["torch"]}
        torch.save(tree, ckpt / name)
        (ckpt / f"{stem}.json").unlink()
        (ckpt / f"{stem}.safetensors").unlink()
    (ckpt / checkpoints.STATE_FILE).write_text(json.dumps(state))


@pytest.fixture(scope="module")
def trained_ema(tiny_sd, tmp_path_factory):
    """A 1-step LoRA run with EMA: its EMA state is the file accelerate unpickled with weights_only=False."""
    from sdcli.training import finetune

    root = tmp_path_factory.mktemp("ema")
    data = write_images(root / "data")[0].parent
    finetune(train_config(data, root / "run", tiny_sd, max_steps=1, checkpoint_every=1, ema=True))
    return root / "run"


def _resume(cli, tiny_sd, run, out, *extra):
    return cli("finetune", "--data", run.parent / "data", "--model", tiny_sd, "--out", out, "--max-steps", "2",
               "--batch-size", "2", "--lr", "1e-3", "--checkpoint-every", "1", "--ema", "-q",
               "--resume", out / "checkpoints" / "checkpoint-000001", *extra)


@pytest.mark.parametrize("name", ["optimizer.safetensors", "optimizer.json", "scheduler.json", "ema.json",
                                  "ema.safetensors", "random_states_0.json", "model.safetensors"])
def test_a_state_file_replaced_by_a_pickle_is_refused_naming_it_and_never_run(cli, tiny_sd, trained_ema, tmp_path,
                                                                              name):
    out = shutil.copytree(trained_ema, tmp_path / "run")
    ckpt = out / "checkpoints" / "checkpoint-000001"
    marker = tmp_path / "ran"
    _plant(ckpt / name, marker)
    line = one_error_line(_resume(cli, tiny_sd, trained_ema, out), 1)
    assert name in line and str(ckpt) in line
    assert not marker.exists()  # nothing in the checkpoint was unpickled


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"])
def test_a_pickled_checkpoint_is_refused_without_allow_pickle_before_anything_loads(cli, tiny_sd, trained_ema,
                                                                                     tmp_path, name):
    out = shutil.copytree(trained_ema, tmp_path / "run")
    ckpt = out / "checkpoints" / "checkpoint-000001"
    _as_pickled(ckpt)
    marker = tmp_path / "ran"
    _plant(ckpt / name, marker)
    line = one_error_line(_resume(cli, tiny_sd, trained_ema, out), 1)
    first = sorted(p.name for p in ckpt.iterdir() if p.suffix in (".bin", ".pkl"))[0]
    assert line.startswith(f"error: checkpoint file {ckpt / first} is a pickle") and "--allow-pickle" in line
    assert not marker.exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-000001"]  # nothing trained


def test_with_allow_pickle_an_older_pickled_checkpoint_resumes_as_before(cli, tiny_sd, trained_ema, tmp_path):
    out = shutil.copytree(trained_ema, tmp_path / "run")
    _as_pickled(out / "checkpoints" / "checkpoint-000001")
    result = _resume(cli, tiny_sd, trained_ema, out, "--allow-pickle")
    assert result.exit_code == 0, result.stderr
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    # The new checkpoint is in the format that needs no pickle.
    assert not [p for p in (out / "checkpoints" / "checkpoint-000002").iterdir() if p.suffix in (".bin", ".pkl")]


# ---------------------------------------------------------------- a checkpoint of another model


@pytest.fixture(scope="module")
def other_models(tiny_models, tmp_path_factory):
    from sdcli.testing import save_tiny_pipeline

    root = tmp_path_factory.mktemp("others")
    return {"sd2": tiny_models["sd2"], "sdxl": tiny_models["sdxl"],
            "sd1, other weights": str(save_tiny_pipeline(root / "sd1-seed1", "sd1", seed=1))}


# A checkpoint from before the family and fingerprint were recorded (recorded=False) is told apart only by its
# weights' shapes: sdxl's differ from sd1's; sd2's and other sd1 weights' LoRA layers do not, so nothing can.
@pytest.mark.parametrize("other,recorded", [("sd2", True), ("sdxl", True), ("sd1, other weights", True),
                                            ("sdxl", False)])
def test_a_checkpoint_of_another_model_says_so_naming_both(cli, tiny_sd, trained, other_models, tmp_path, other,
                                                            recorded):
    from sdcli.training.checkpoints import STATE_FILE

    out = shutil.copytree(trained, tmp_path / "run")
    ckpt = out / "checkpoints" / "checkpoint-000002"
    if not recorded:
        state = json.loads((ckpt / STATE_FILE).read_text())
        del state["family"], state["model_fingerprint"]
        (ckpt / STATE_FILE).write_text(json.dumps(state))
    model = other_models[other]
    result = cli("finetune", "--data", trained.parent / "data", "--model", model, "--out", out, "--max-steps", "3",
                 *QUICK, "-q", "--resume", "latest")
    line = one_error_line(result, 2)
    assert "made for another model" in line and "damaged" not in line
    assert tiny_sd in line and f"--model {model}" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000001", "checkpoint-000002"]
