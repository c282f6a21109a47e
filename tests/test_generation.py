"""The maths `generate` promises, checked against a hand-written denoising loop."""

from __future__ import annotations

import numpy as np
import pytest

from sdcli.errors import UsageError
from sdcli.generation import Settings, check_settings, parse_floats, parse_seeds, plan_jobs, resolve_seeds


def hand_loop(pipe, prompt: str, seed: int, steps: int, mode: str, g: float = 0.0) -> np.ndarray:
    """DDIM by hand over the pipeline's own UNet: mode 'cfg' (ε_u + g(ε_c − ε_u)), 'cond' or 'uncond'."""
    import torch
    from diffusers import DDIMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt=None)
    latents = randn_tensor((1, 4, 8, 8), generator=[torch.Generator("cpu").manual_seed(seed)], dtype=cond.dtype)
    latents = latents * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.scale_model_input(latents, t)
            if mode == "cfg":
                eps_u, eps_c = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
                eps = eps_u + g * (eps_c - eps_u)
            else:
                eps = pipe.unet(x, t, encoder_hidden_states=cond if mode == "cond" else uncond).sample
            latents = sched.step(eps, t, latents).prev_sample
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()[0]
    return np.round(image * 255).astype(np.int16)


@pytest.fixture(scope="module")
def loaded(tiny_sd):
    from sdcli.generation import Engine

    return Engine.load(Settings(prompts=["x"], model=tiny_sd, scheduler="ddim"))


def sdcli_image(loaded, g: float, seed: int = 5, steps: int = 4) -> np.ndarray:

    s = Settings(prompts=["a red circle"], steps=steps, guidance=[g], seeds=[seed], scheduler="ddim")
    (item,) = list(loaded.images(s, plan_jobs(s, [seed])))
    return np.asarray(item.image, dtype=np.int16)


@pytest.mark.parametrize("g", [3.0, 7.5])
def test_guided_prediction_is_uncond_plus_g_times_difference(loaded, g):
    ours = sdcli_image(loaded, g)
    theirs = hand_loop(loaded.pipe, "a red circle", 5, 4, "cfg", g)
    assert np.abs(ours - theirs).max() <= 1  # rounding only


def test_guidance_one_is_the_conditional_prediction_alone(loaded):
    ours = sdcli_image(loaded, 1.0)
    assert np.abs(ours - hand_loop(loaded.pipe, "a red circle", 5, 4, "cond")).max() <= 1
    # ...and guidance really matters: at 7.5 the image is a different one.
    assert np.abs(sdcli_image(loaded, 7.5) - ours).max() > 2


def test_guidance_zero_is_the_unconditional_prediction(loaded):
    # diffusers would use the conditional prediction for any g <= 1; the formula says ε_uncond at g = 0.
    ours = sdcli_image(loaded, 0.0)
    assert np.abs(ours - hand_loop(loaded.pipe, "a red circle", 5, 4, "uncond")).max() <= 1
    assert np.abs(ours - hand_loop(loaded.pipe, "a red circle", 5, 4, "cond")).max() > 2


def test_parse_and_plan():
    assert parse_floats("1, 3,7.5", "--guidance") == [1.0, 3.0, 7.5]
    with pytest.raises(UsageError, match="'abc' is not a number"):
        parse_floats("1,abc", "--guidance")
    assert parse_seeds("4,5") == [4, 5] and parse_seeds(None) is None
    with pytest.raises(UsageError, match="whole number"):
        parse_seeds("1.5")
    s = Settings(prompts=["a", "b"], guidance=[1, 7.5], seeds=[10], num_images=3)
    seeds = resolve_seeds(s)
    assert seeds == [10, 11, 12]
    jobs = plan_jobs(s, seeds)
    assert len(jobs) == 12
    # Prompt, then guidance, then seed: jobs with one guidance value are neighbours (they batch together).
    assert [(j.prompt, j.values["guidance"], j.seed) for j in jobs[:4]] == [("a", 1, 10), ("a", 1, 11), ("a", 1, 12), ("a", 7.5, 10)]


@pytest.mark.parametrize("change,message", [
    ({"steps": 0}, "--steps must be at least 1"),
    ({"guidance": [-1.0]}, "--guidance must be between 0 and 1000, got -1"),
    ({"guidance_rescale": [1.5]}, "--guidance-rescale must be between 0 and 1"),
    ({"seeds": [1, 2], "num_images": 2}, "either a list of seeds or --num-images"),
    ({"scheduler": "eulr"}, "unknown scheduler 'eulr'"),
    ({"prompts": []}, "no prompt given"),
])
def test_check_settings_names_the_bad_value(change, message):
    s = Settings(prompts=["x"])
    for k, v in change.items():
        setattr(s, k, v)
    with pytest.raises(UsageError, match=message):
        check_settings(s)


def test_batches_give_the_same_images_as_one_at_a_time(loaded):

    def run(batch_size):
        s = Settings(prompts=["a", "b"], steps=2, guidance=[4.0], seeds=[1], batch_size=batch_size, scheduler="ddim")
        return [np.asarray(i.image, np.int16) for i in loaded.images(s, plan_jobs(s, [1]))]

    one, two = run(1), run(2)
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert np.abs(a - b).max() <= 1
    assert np.abs(one[0] - one[1]).max() > 0
