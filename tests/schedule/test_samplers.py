"""AUTOMATIC1111's and ComfyUI's names for samplers and σ spacings, read through sdcli's one table."""

from __future__ import annotations

import pytest

from sdcli.errors import UsageError
from sdcli.schedule.samplers import SCHEDULERS, make_scheduler, settle

# (sampler, --sigmas) as a user of AUTOMATIC1111 or ComfyUI writes them -> what sdcli runs.
NAMED = [
    (("Euler a", "default"), ("euler-ancestral", "default")),
    (("euler_ancestral", "normal"), ("euler-ancestral", "normal")),
    (("DPM++ 2M Karras", "Automatic"), ("dpm++2m-karras", "default")),
    (("DPM++ 2M", "Karras"), ("dpm++2m-karras", "default")),
    (("dpmpp_2m", "karras"), ("dpm++2m-karras", "default")),
    (("dpmpp_2m", "default"), ("dpm++2m", "default")),
    (("dpmpp_2m_sde_gpu", "default"), ("dpm++2m-sde", "default")),
    (("DPM++ 2M SDE Karras", "default"), ("dpm++2m-sde-karras", "default")),
    (("LMS Karras", "default"), ("lms", "karras")),
    (("DPM2 a", "Exponential"), ("dpm2-ancestral", "exponential")),
    (("  UniPC ", "SGM Uniform"), ("unipc", "sgm_uniform")),
    (("uni_pc_bh2", "simple"), ("unipc", "simple")),
    (("PLMS", "DDIM"), ("pndm", "ddim_uniform")),
    (("Automatic", "Uniform"), (None, "normal")),
    (("dpm++2m-karras", "exponential"), ("dpm++2m-karras", "exponential")),  # an explicit spacing wins
]


@pytest.mark.parametrize("asked,runs", NAMED, ids=[" + ".join(a) for a, _ in NAMED])
def test_a1111_and_comfyui_names_are_sdclis_samplers(asked, runs):
    assert settle(*asked) == runs


@pytest.fixture(scope="module")
def sd_config():
    from sdcli.testing import build_tiny_pipeline

    return build_tiny_pipeline("sd1").scheduler.config


@pytest.mark.parametrize("name", [n for spec in SCHEDULERS.values() for n in (spec.name, spec.a1111, *spec.comfyui)])
def test_every_name_the_table_lists_builds_its_scheduler(name, sd_config):
    from sdcli.schedule.samplers import spec_for

    sampler, sigmas = settle(name)
    sched = make_scheduler(name, sd_config)
    assert spec_for(sched).a1111 == SCHEDULERS[sampler].a1111
    assert sched.config == make_scheduler(sampler, sd_config, sigmas=sigmas).config


def test_a_comfyui_timestep_schedule_is_diffusers_timestep_spacing(sd_config):
    config = sd_config
    for sigmas, spacing in [("normal", "linspace"), ("sgm_uniform", "trailing"), ("ddim_uniform", "leading")]:
        ours = make_scheduler("dpm++2m-karras", config, sigmas=sigmas)
        theirs = make_scheduler("dpm++2m", config, timestep_spacing=spacing)
        ours.set_timesteps(7)
        theirs.set_timesteps(7)
        assert ours.timesteps.tolist() == theirs.timesteps.tolist()  # the Karras spacing replaced, as --sigmas does


@pytest.mark.parametrize("asked,says", [
    (("dpmpp_sde", "default"), "unknown scheduler 'dpmpp_sde'"),
    (("Euler q", "default"), "unknown scheduler 'Euler q'"),
    (("euler", "kl_optimal"), "--sigmas 'kl_optimal': diffusers has no such schedule"),
    (("euler", "Align Your Steps"), "--sigmas 'Align Your Steps': diffusers has no such schedule"),
    (("euler", "polynomial"), "--sigmas 'polynomial': not a σ spacing"),
])
def test_a_name_no_diffusers_sampler_has_is_refused_by_name(asked, says):
    with pytest.raises(UsageError) as caught:
        settle(*asked)
    assert str(caught.value).startswith(says) and "\n" not in str(caught.value)
