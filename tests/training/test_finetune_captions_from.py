"""--captions-from FILE.jsonl: several captions per image, one drawn per sample from the seed and epoch alone."""

from __future__ import annotations

import dataclasses
import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from sdcli.training.data import Item, discover, epoch_batches
from sdcli.training.inputs import TrainingInputs

from conftest import one_error_line


def _captioned(tmp_path, make_images):
    data = tmp_path / "data"
    make_images(data, n=4)
    rows = [{"file_name": f"data/img0{i}.png", "captions": [f"shape {i} one", f"shape {i} two", f"shape {i} three"]}
            for i in range(3)]  # the fourth keeps its own .txt caption
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, tmp_path / "captions.jsonl"


def test_each_sample_draws_one_of_its_captions_from_the_seed_and_epoch(tiny_sd, tmp_path, make_images):
    from sdcli.pipeline import load_pipeline

    data, captions = _captioned(tmp_path, make_images)
    examples = discover(data, captions_from=captions).examples
    assert examples[0].captions == ["shape 0 one", "shape 0 two", "shape 0 three"] and examples[3].captions is None
    groups = [[0, 1, 2, 3]]
    drawn = [epoch_batches(groups, epoch, 7, True, 0.2, 2, several_captions=True) for epoch in range(4)]
    assert drawn[1] == epoch_batches(groups, 1, 7, True, 0.2, 2, several_captions=True)  # a pure function
    # Runs without --captions-from draw their order, flips and dropout exactly as before.
    plain = epoch_batches(groups, 1, 7, True, 0.2, 2)
    assert [[dataclasses.replace(it, pick=None) for it in b] for b in drawn[1]] == plain

    pipe = load_pipeline(tiny_sd, device="cpu").pipe
    live = TrainingInputs(pipe, examples, resolution=16, center_crop=True, device="cpu", cache_latents=False,
                          cache_text=False)
    cached = TrainingInputs(pipe, examples, resolution=16, center_crop=True, device="cpu", cache_latents=False,
                            cache_text=True)
    cached.build_cache(flip=False)
    trained = {live.prompt_of(it) for epoch in range(10) for batch in epoch_batches(groups, epoch, 7, True, 0.0, 2,
                                                                                     several_captions=True)
               for it in batch if it.index == 0}
    assert trained == {"shape 0 one", "shape 0 two", "shape 0 three"}  # every caption takes its turn
    items = [Item(0, pick=0), Item(0, pick=1), Item(3, pick=5)]
    assert [live.prompt_of(it) for it in items] == ["shape 0 one", "shape 0 two", examples[3].caption]
    a = live.batch(items, torch.Generator().manual_seed(0)).cond["encoder_hidden_states"]
    b = cached.batch(items, torch.Generator().manual_seed(0)).cond["encoder_hidden_states"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[0], a[1])


def test_a_run_with_several_captions_resumes_bit_identically(tiny_sd, tmp_path, make_images, make_config):
    from sdcli.training import finetune

    data, captions = _captioned(tmp_path, make_images)
    settings = dict(captions_from=captions, max_steps=4, batch_size=2, checkpoint_every=0, seed=2)
    whole = finetune(make_config(data, tmp_path / "whole", tiny_sd, **settings))

    def press_ctrl_c(info):
        if info.step == 1:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        finetune(make_config(data, tmp_path / "split", tiny_sd, **settings), callback=press_ctrl_c)
    resumed = finetune(make_config(data, tmp_path / "split", tiny_sd, resume="latest", **settings))
    assert resumed.losses == whole.losses[2:]
    a, b = (load_file(str(tmp_path / run / "pytorch_lora_weights.safetensors")) for run in ("whole", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("line,expected", [
    ('{"file_name": "data/img00.png", "captions": []}', "line 1: expected"),
    ('{"file_name": "data/nothere.png", "captions": ["x"]}', "names"),
])
def test_a_bad_captions_file_is_one_line(cli, tmp_path, make_images, line, expected):
    make_images(tmp_path / "data", n=2)
    (tmp_path / "c.jsonl").write_text(line + "\n")
    result = cli("finetune", "--data", tmp_path / "data", "--out", tmp_path / "o", "--captions-from",
                 tmp_path / "c.jsonl", "--quiet")
    assert expected in one_error_line(result) and "--captions-from" in one_error_line(result)
