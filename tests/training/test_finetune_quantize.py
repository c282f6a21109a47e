"""QLoRA: a LoRA fine-tuned on a quantized frozen base (torchao's int8 weight-only on the CPU), saved in float32,
loading in plain diffusers on the unquantized model; exact resume stays exact."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import one_error_line
from sdcli.training import finetune

pytest.importorskip("torchao")

QLORA = dict(quantize="int8", max_steps=2, learning_rate=5e-2, rank=4)


def test_a_lora_trains_on_an_int8_weight_base_and_loads_on_the_plain_model(tiny_sd, dataset, tmp_path, make_config):
    from diffusers import StableDiffusionPipeline

    from sdcli.generation import Engine, Settings

    out = tmp_path / "out"
    finetune(make_config(dataset, out, tiny_sd, **QLORA))
    settings = json.loads((out / "training_settings.json").read_text())
    assert settings["config"]["quantize"] == "torchao:int8-weight"  # the backend the CPU picked, for a resume to pick again
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert lora and all(t.dtype == torch.float32 for t in lora.values())
    assert any(("lora.up" in k or "lora_B" in k) and t.abs().max() > 0 for k, t in lora.items())  # it learned

    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np",
                    generator=torch.Generator().manual_seed(1)).images[0]

    plain = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    before = image(plain)
    plain.load_lora_weights(str(out))
    after = image(plain)
    quantized = Engine.load(Settings(model=tiny_sd, quantize="int8-weight")).pipe
    quantized.load_lora_weights(str(out))
    on_base = image(quantized)
    assert np.abs(after - before).max() > 0.01  # the LoRA changes the plain model's image...
    assert np.abs(after - on_base).max() < np.abs(after - before).max() / 2  # ...as it does the quantized one's


def test_qlora_ctrl_c_then_resume_ends_with_the_same_lora(tiny_sd, dataset, tmp_path, make_config):
    settings = dict(QLORA, max_steps=3, batch_size=2)
    finetune(make_config(dataset, tmp_path / "whole", tiny_sd, **settings))

    def press_ctrl_c(info):
        if info.step == 1:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        finetune(make_config(dataset, tmp_path / "split", tiny_sd, **settings), callback=press_ctrl_c)
    finetune(make_config(dataset, tmp_path / "split", tiny_sd, resume="latest", **settings))
    a, b = (load_file(str(tmp_path / run / "pytorch_lora_weights.safetensors")) for run in ("whole", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra,words", [
    (("--quantize", "int8", "--full"), "--quantize int8 with --full: full fine-tuning of quantized"),
    (("--quantize", "nf4"), "--quantize nf4: bitsandbytes's nf4 needs a CUDA GPU"),
    (("--quantize", "int4"), "--quantize int4: unknown quantization"),
])
def test_quantize_that_cannot_train_here_is_refused_before_loading(cli, tiny_sd, dataset, tmp_path, extra, words,
                                                                    no_pipeline_loads):
    result = cli("finetune", "--data", dataset, "--out", tmp_path / "o", "--model", tiny_sd, "--max-steps", "1",
                 *extra)
    assert words in one_error_line(result, 2) and not no_pipeline_loads
