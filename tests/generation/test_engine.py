"""The engine: one loaded model serving many requests, each leaving the pipeline as it found it."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import paths_of, pixels

from sdcli.generation import Engine, Settings, Step


def _embedding(path, seed: int = 0) -> str:
    import torch
    from safetensors.torch import save_file

    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(seed))}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def inputs(tiny_sd, tmp_path_factory):
    from sdcli.testing import save_random_lora

    root = tmp_path_factory.mktemp("engine-inputs")
    return {"lora": str(save_random_lora(tiny_sd, root / "lora", seed=1)),
            "embedding": _embedding(root / "mystyle.safetensors")}


# Two requests that differ in everything a request may change: sampler, LoRA and scale, embedding, size and a
# prompt that edits itself between steps.
def _requests(inputs):
    return {
        "a": dict(prompt="a mystyle [red:blue:0.5] circle", flags=["--scheduler", "euler", "--lora",
                  f"{inputs['lora']}:0.7", "--embedding", inputs["embedding"], "-W", "32", "-H", "48"],
                  settings=dict(scheduler="euler", loras=[(inputs["lora"], 0.7)],
                                embeddings=[(inputs["embedding"], "mystyle")], width=32, height=48)),
        "b": dict(prompt="a [blue|green] square", flags=["--scheduler", "dpm++2m", "--lora", f"{inputs['lora']}:-1.5",
                  "-W", "48", "-H", "32"],
                  settings=dict(scheduler="dpm++2m", loras=[(inputs["lora"], -1.5)], width=48, height=32)),
        "plain": dict(prompt="a red circle", flags=[], settings={}),
    }


def _settings(req, seed: int = 4) -> Settings:
    return Settings(prompts=[req["prompt"]], steps=3, seeds=[seed], **req["settings"])


def _pixels(made) -> np.ndarray:
    return np.asarray(made.image.convert("RGB"), np.int16)


def test_requests_on_one_engine_give_what_a_fresh_generate_gives(cli, tiny_sd, inputs, tmp_path):
    requests = _requests(inputs)
    fresh = {}
    for name, req in requests.items():
        (path,) = paths_of(cli("generate", req["prompt"], "--model", tiny_sd, "--steps", "3", "--seed", "4",
                               *req["flags"], "--out", tmp_path / name))
        fresh[name] = pixels(path)
    assert not np.array_equal(fresh["a"][:32, :32], fresh["plain"][:32, :32])  # the requests do differ

    engine = Engine.load(Settings(model=tiny_sd))
    pipe = engine.pipe
    scheduler, tokenizer, rows = pipe.scheduler, pipe.tokenizer, pipe.text_encoder.get_input_embeddings().weight
    # a, b, plain, then a again: each as fresh, whatever came before it on this pipeline.
    for name in ("a", "b", "plain", "a"):
        (made,) = engine.generate(_settings(requests[name]))
        assert np.array_equal(_pixels(made), fresh[name]), name
        assert [lo["scale"] for lo in made.record["loras"]] == [s for _p, s in requests[name]["settings"].get("loras", [])]
    # The loaded pipeline is as it was: its scheduler, tokenizer and token table, and no LoRA layers.
    assert pipe.scheduler is scheduler and pipe.tokenizer is tokenizer
    assert pipe.text_encoder.get_input_embeddings().weight.shape == rows.shape
    assert not any(pipe.get_list_adapters().values())
    assert not any("peft" in type(m).__module__ for net in (pipe.unet, pipe.text_encoder) for m in net.modules())


def test_a_cancelled_request_stops_within_one_step_and_the_next_is_unaffected(tiny_sd, inputs):
    engine = Engine.load(Settings(model=tiny_sd))
    plain = _requests(inputs)["plain"]
    (before,) = engine.generate(_settings(plain))

    calls = []
    handle = engine.pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    cancel, steps = threading.Event(), []

    def on_step(step: Step) -> None:
        steps.append(step)
        if step.index == 1:
            cancel.set()

    try:
        made = engine.generate(Settings(prompts=["a red circle"], steps=10, seeds=[1, 2, 3]), on_step=on_step,
                               cancel=cancel)
    finally:
        handle.remove()
    assert made == [] and [s.index for s in steps] == [0, 1]
    assert len(calls) == 2  # two steps of ten ran (one UNet call a step: the guided batch is one call)
    # The tiny SD's PNDM runs one warm-up step more than the ten asked.
    assert steps[0].total == 10 + 1 and steps[0].images == 1 and steps[0].latents is not None
    assert steps[0].sigma is None or steps[0].sigma > steps[1].sigma
    (after,) = engine.generate(_settings(plain))
    assert np.array_equal(_pixels(after), _pixels(before))


def test_every_step_reaches_the_callback_with_x0_when_asked(tiny_sd):
    engine = Engine.load(Settings(model=tiny_sd))
    s = Settings(prompts=["a red circle"], steps=3, seeds=[1], scheduler="euler", hires_scale=1.5)
    seen: list[Step] = []
    (made,) = list(engine.images(s, engine.plan(s).jobs, on_step=seen.append, x0=True))
    # Hires fix's second pass continues the count: one Step for each of the request's steps.
    assert [step.index for step in seen] == list(range(len(seen))) and len(seen) == seen[0].total == 3 + 1
    assert all(step.x0 is not None and step.x0.shape == step.latents.shape for step in seen)
    assert made.image.size == (24, 24)  # tiny sd makes 16x16; hires 1.5x


# PNDM runs one step more than asked (its PLMS warm-up), Heun 2·steps − 1; an img2img pass skips the first ones by
# its strength and the scheduler's order; hires fix adds its second pass.
@pytest.mark.parametrize("sampler,task,steps", [
    ("pndm", {}, 3 + 1), ("heun", {}, 2 * 3 - 1),
    ("pndm", {"strength": 0.5}, 4 - 2), ("heun", {"strength": 0.5}, 5 - 2 * 2),
    ("pndm", {"hires_scale": 1.5, "hires_strength": 0.5}, (3 + 1) + (4 - 2)),
])
def test_step_total_counts_the_steps_the_sampler_runs(tiny_sd, tmp_path, sampler, task, steps):
    from PIL import Image

    if "strength" in task:
        Image.new("RGB", (16, 16), "red").save(tmp_path / "init.png")
        task = {**task, "init_image": str(tmp_path / "init.png")}
    engine = Engine.load(Settings(model=tiny_sd))
    s = engine.plan(Settings(prompts=["a red circle"], steps=3, seeds=[1], scheduler=sampler, **task)).settings
    seen: list[Step] = []
    list(engine.images(s, engine.plan(s).jobs, on_step=seen.append))
    assert [(step.index, step.total) for step in seen] == [(i, steps) for i in range(steps)]
    assert engine.denoising_steps(s) == steps  # what the CLI's bar and serve's progress count to


@pytest.mark.parametrize("sampler", ["euler-ancestral", "dpm2-ancestral", "ddpm", "dpm++2m-sde-karras"])
def test_asking_for_x0_leaves_a_stochastic_sampler_on_its_seed(tiny_sd, sampler):
    # A pipeline passes the generator to a scheduler's step only if the step's signature names it: the tap that
    # keeps x̂0 (trajectories, a server's preview) must not hide it, or the noise comes from the global RNG.
    engine = Engine.load(Settings(model=tiny_sd))
    s = Settings(prompts=["a red circle"], steps=2, seeds=[3], scheduler=sampler)
    (plain,) = engine.images(s, engine.plan(s).jobs)
    (tapped,) = engine.images(s, engine.plan(s).jobs, x0=True)
    assert np.array_equal(_pixels(tapped), _pixels(plain))


def test_a_request_that_fails_leaves_the_pipeline_as_it_was(tiny_sd, inputs, tmp_path):
    from sdcli.errors import ModelError

    engine = Engine.load(Settings(model=tiny_sd))
    (before,) = engine.generate(_settings(_requests(inputs)["plain"]))
    import torch
    from safetensors.torch import save_file

    # A LoRA loads, then an embedding of the wrong width fails: the LoRA must not stay behind.
    save_file({"emb_params": torch.zeros(1, 16)}, str(tmp_path / "narrow.safetensors"))
    bad = Settings(prompts=["x"], steps=1, seeds=[1], loras=[(inputs["lora"], 1.0)],
                   embeddings=[(str(tmp_path / "narrow.safetensors"), "narrow")])
    with pytest.raises(ModelError, match="16 wide"):
        list(engine.images(bad, [j for j in engine.plan(bad).jobs]))
    assert not any(engine.pipe.get_list_adapters().values())
    (after,) = engine.generate(_settings(_requests(inputs)["plain"]))
    assert np.array_equal(_pixels(after), _pixels(before))


def test_a_request_for_another_model_or_device_is_refused_in_one_line(tiny_models):
    from sdcli.errors import UsageError

    engine = Engine.load(Settings(model=tiny_models["sd1"]))
    with pytest.raises(UsageError, match=r"^--model .*sdxl: this engine was loaded with"):
        engine.generate("x", model=tiny_models["sdxl"], steps=1)
    with pytest.raises(UsageError, match=r"^--dtype bfloat16: this engine was loaded with 'auto'"):
        engine.generate("x", dtype="bfloat16", steps=1)
    # Its own model, however named, is fine.
    assert len(engine.generate("x", model=tiny_models["sd1"] + "/", steps=1, seeds=[1])) == 1


def test_the_python_api_loads_once_and_generates_many(tmp_path):
    from sdcli.api import load

    engine = load("bundled:shapes", device="cpu")
    made = engine.generate("a red circle", seeds=[1, 2], steps=2, guidance=3)
    assert [m.record["seed"] for m in made] == [1, 2] and made[0].record["guidance"] == 3.0
    assert made[0].image.size == (64, 64) and made[0].record["model"] == "bundled:shapes"
    assert not np.array_equal(_pixels(made[0]), _pixels(made[1]))
    # The same request again on the same engine: the same images.
    again = engine.generate("a red circle", seeds=[1, 2], steps=2, guidance=3)
    assert all(np.array_equal(_pixels(x), _pixels(y)) for x, y in zip(made, again))
