"""How much does sdcli add on top of diffusers? Run by hand:

    python benchmarks/generate_bench.py                 # a small random pipeline built on the spot
    python benchmarks/generate_bench.py --model PATH    # any model sdcli can load
    python benchmarks/generate_bench.py --json out.json

Prints (a) `sdcli --help` wall time, (b) the wall time from the shell to a written PNG with the bundled
model (a fresh `sdcli generate` process: imports, load, 25 steps, save; target <= 5 s on a 2-core CPU)
and (c) the denoising time of sdcli's generation path against a direct call of the same diffusers
pipeline (same model, steps, seed, guidance), interleaved, as medians of several runs and their ratio.
Target: overhead <= 3 %.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def command_time(args: list[str], runs: int) -> float:
    """Median wall time of ``sdcli ARGS`` in a fresh process, as a user's shell runs it."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sdcli", *args], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def shell_to_png_time(runs: int) -> float:
    """Median wall time of one bundled-model image (25 steps, guidance 7.5) from a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        return command_time(["generate", "a large red circle in the top left corner on a black background",
                             "--out", tmp, "--overwrite", "-q"], runs)


def small_pipeline(folder: Path) -> str:
    """A random pipeline big enough that the UNet, not Python, dominates: 64x64 images, 32x32 latents."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from sdcli.testing import _text_encoder, _tokenizer

    torch.manual_seed(0)
    tok = _tokenizer(folder / "tok", 77)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 128), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=16)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=_text_encoder(len(tok)), tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipe")
    return str(folder / "pipe")


def small_sd3_pipeline(folder: Path) -> str:
    """A random SD3 pipeline where the transformer dominates: 64x64 images, 32x32 latents in 2x2 patches."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from sdcli.testing import _flow_vae, _t5_encoder, _text_encoder, _tokenizer, write_t5_tokenizer

    torch.manual_seed(0)
    tok, tok2 = _tokenizer(folder / "tok", 77), _tokenizer(folder / "tok2", 77)
    t5 = write_t5_tokenizer(folder / "t5")
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=32, num_attention_heads=4,
        caption_projection_dim=128, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=32,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flow_vae(0.0609, 1.5035),
        text_encoder=_text_encoder(len(tok), projection=True), tokenizer=tok,
        text_encoder_2=_text_encoder(len(tok2), projection=True), tokenizer_2=tok2,
        text_encoder_3=_t5_encoder(len(t5)), tokenizer_3=t5,
    )
    pipe.save_pretrained(folder / "sd3")
    return str(folder / "sd3")


LONG_PROMPT = ", ".join(["a red circle on a black background in the top left corner"] * 8)  # ~100 tokens


def against_diffusers(model: str, steps: int, runs: int, size: int | None = None, prompt: str = "a red circle",
                      inpaint: Path | None = None) -> dict:
    """Median seconds of sdcli's generation path and of a direct diffusers call on the same pipeline, interleaved.

    ``inpaint`` (a folder) makes it an inpainting run: sdcli's task with its composite against diffusers'
    inpainting pipeline on the same image and mask.
    """
    import torch
    from PIL import Image

    from sdcli.generation import Engine, Settings, plan

    extra: dict = {}
    if inpaint is not None:
        Image.new("RGB", (size, size), (120, 40, 40)).save(inpaint / "init.png")
        mask = Image.new("L", (size, size), 0)
        mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
        mask.save(inpaint / "mask.png")
        extra = {"init_image": str(inpaint / "init.png"), "mask": str(inpaint / "mask.png"), "strength": 1.0}
    s = Settings(prompts=[prompt], model=model, steps=steps, guidance=[7.5], seeds=[0], width=size, height=size,
                 **extra)
    jobs = plan(s, distributed=False).jobs
    loaded = Engine.load(s)
    pipe = loaded.pipe
    call: dict = {"width": size, "height": size} if size else {}
    if inpaint is not None:
        from diffusers import AutoPipelineForInpainting

        pipe = AutoPipelineForInpainting.from_pipe(pipe)
        pipe.set_progress_bar_config(disable=True)
        call.update(image=Image.open(inpaint / "init.png"), mask_image=Image.open(inpaint / "mask.png"), strength=1.0)

    def direct() -> None:
        pipe(prompt, num_inference_steps=steps, guidance_scale=7.5,
             generator=torch.Generator("cpu").manual_seed(0), output_type="np", **call)

    def ours() -> None:
        list(loaded.images(s, jobs, on_step=lambda n: None))

    direct(), ours()  # warm-up
    t_direct, t_ours = [], []
    for _ in range(runs):  # interleaved so drift hits both alike
        t0 = time.perf_counter(); direct(); t_direct.append(time.perf_counter() - t0)  # noqa: E702
        t0 = time.perf_counter(); ours(); t_ours.append(time.perf_counter() - t0)  # noqa: E702
    d, o = statistics.median(t_direct), statistics.median(t_ours)
    return {"device": loaded.device, "diffusers_seconds": round(d, 4), "sdcli_seconds": round(o, 4),
            "ratio": round(o / d, 4)}


def tiny_family_against_diffusers(model: str, steps: int, runs: int, call: dict, size: int = 32, **settings) -> dict:
    """Median seconds of sdcli's generation path and of the same pipeline's own call, interleaved, for a tiny
    pipeline of a family with its own guidance (``call``: what diffusers is given; ``settings``: sdcli's)."""
    import torch

    from sdcli.generation import Engine, Settings, plan

    s = Settings(prompts=["a red circle"], model=model, steps=steps, seeds=[0], width=size, height=size, **settings)
    jobs = plan(s, distributed=False).jobs
    loaded = Engine.load(s)
    pipe = loaded.pipe

    def direct() -> None:
        pipe(prompt="a red circle", num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0),
             output_type="np", width=size, height=size, **call)

    def ours() -> None:
        list(loaded.images(s, jobs, on_step=lambda n: None))

    direct(), ours()  # warm-up
    t_direct, t_ours = [], []
    for _ in range(runs):
        t0 = time.perf_counter(); direct(); t_direct.append(time.perf_counter() - t0)  # noqa: E702
        t0 = time.perf_counter(); ours(); t_ours.append(time.perf_counter() - t0)  # noqa: E702
    d, o = statistics.median(t_direct), statistics.median(t_ours)
    return {"diffusers_seconds": round(d, 4), "sdcli_seconds": round(o, 4), "ratio": round(o / d, 4)}


# The newer flow families' tiny pipelines (`sdcli.testing.build_tiny_new_flow_pipeline`), each called as its model
# card guides it: (sdcli's --guidance, diffusers' arguments).
FAMILY_CALLS = {"chroma": (3.0, {"guidance_scale": 3.0}), "zimage": (4.0, {"guidance_scale": 4.0}),
                "zimage-turbo": (1.0, {"guidance_scale": 0.0}),
                "qwenimage": (4.0, {"true_cfg_scale": 4.0, "negative_prompt": [" "]})}


def family_against_diffusers(family: str, folder: Path, steps: int, runs: int) -> dict:
    """`tiny_family_against_diffusers` for a tiny Chroma, Z-Image or Qwen-Image pipeline, with its own guidance."""
    from sdcli.testing import save_tiny_new_flow_pipeline

    model = str(save_tiny_new_flow_pipeline(folder / family, family))
    guidance, theirs = FAMILY_CALLS[family]
    return {"family": family, **tiny_family_against_diffusers(model, steps, runs, theirs, guidance=[guidance])}


def flux2_families(folder: Path, steps: int, runs: int) -> dict:
    """FLUX.2-dev, Klein (base, CFG; step-distilled) and FLUX.1 Kontext editing a reference, each tiny."""
    import numpy as np
    from PIL import Image

    from sdcli.testing import save_tiny_flux2_pipeline, save_tiny_kontext_pipeline

    ref = folder / "ref.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 80, 3), dtype=np.uint8)).save(ref)
    out = {}
    for kind, scale in (("flux2", 4.0), ("klein", 4.0), ("klein-distilled", 1.0)):
        model = str(save_tiny_flux2_pipeline(folder / kind, kind))
        out[kind] = tiny_family_against_diffusers(model, steps, runs, {"guidance_scale": scale})
        out[f"{kind}-edit"] = tiny_family_against_diffusers(
            model, steps, runs, {"guidance_scale": scale, "image": [Image.open(ref)]}, reference_images=[str(ref)])
    kontext = str(save_tiny_kontext_pipeline(folder / "kontext"))
    out["kontext-edit"] = tiny_family_against_diffusers(
        kontext, steps, runs, {"guidance_scale": 2.5, "image": Image.open(ref), "max_area": 32 * 32},
        reference_images=[str(ref)])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--family", action="append", choices=sorted(FAMILY_CALLS),
                        help="Only compare sdcli with diffusers on this family's tiny pipeline (repeatable).")
    parser.add_argument("--flux2", action="store_true",
                        help="only FLUX.2, FLUX.2 Klein and FLUX.1 Kontext, each tiny, against their own pipelines")
    args = parser.parse_args()
    if args.family:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [family_against_diffusers(f, Path(tmp), args.steps, args.runs) for f in args.family]
        print(json.dumps(rows, indent=2))
        return
    if args.flux2:
        with tempfile.TemporaryDirectory() as tmp:
            found = flux2_families(Path(tmp), args.steps, args.runs)
        for k, v in found.items():
            print(f"{k:22} {v}")
        if args.json:
            args.json.write_text(json.dumps(found, indent=2))
        return

    help_s = command_time(["--help"], args.runs)
    png_s = shell_to_png_time(args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or small_pipeline(Path(tmp))
        sd = against_diffusers(model, args.steps, args.runs)
        # A prompt past 77 tokens: sdcli encodes every chunk (diffusers truncates), the cost of not losing words.
        long = against_diffusers(model, args.steps, args.runs, prompt=LONG_PROMPT)
        # Inpainting: sdcli's task adds the composite that keeps unmasked pixels exact.
        inpaint = against_diffusers(model, args.steps, args.runs, size=64, inpaint=Path(tmp))
        sd3 = against_diffusers(small_sd3_pipeline(Path(tmp)), args.steps, args.runs, size=64)
    result = {
        "help_seconds": round(help_s, 3),
        "shell_to_png_seconds": round(png_s, 3),
        "model": args.model or "small random SD-like pipeline (64x64)",
        "steps": args.steps,
        **sd,
        **{f"long_prompt_{k}": v for k, v in long.items() if k != "device"},
        **{f"inpaint_{k}": v for k, v in inpaint.items() if k != "device"},
        "sd3_model": "small random SD3 pipeline (64x64, 4 MMDiT blocks)",
        **{f"sd3_{k}": v for k, v in sd3.items()},
    }
    for k, v in result.items():
        print(f"{k:22} {v}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
