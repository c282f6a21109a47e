"""Stable Diffusion 1.5's architecture with random weights, no download: how fast is sdcli? Run by hand:

    python benchmarks/gpu_bench.py                     # full size (512 px, 25 steps) on CUDA; reduced on CPU
    python benchmarks/gpu_bench.py --size reduced      # force the small version (what CPU runs)
    python benchmarks/gpu_bench.py --json bench.json
    python benchmarks/gpu_bench.py --batch 1 --compile-modes reduce-overhead --lora-steps 0

For plain diffusers defaults, sdcli's defaults, and sdcli with --compile in each --compile-mode
(first-call compile time reported apart), at each batch size, prints seconds per image and UNet iterations per second (medians, runs
interleaved), the UNet's achieved TFLOP/s (FLOPs counted with torch.utils.flop_counter) against the
card's peak, peak GPU memory for one image with sdcli's defaults and with --cpu-offload, and LoRA
fine-tuning steps per second with peak memory.
Targets on a GPU: sdcli defaults never slower than plain diffusers; --compile >= 1.3x plain diffusers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

# Dense fp16/bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
               "4090": 165.0, "3090": 71.0, "T4": 65.0, "V100": 125.0}

SD15 = {
    "unet": dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                 attention_head_dim=8),
    "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                sample_size=512, scaling_factor=0.18215),
    "text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 projection_dim=768, hidden_act="quick_gelu"),
    "resolution": 512,
}
# The same topology, narrower and smaller, so a CPU run takes minutes, not hours.
REDUCED = {
    "unet": {**SD15["unet"], "block_out_channels": (64, 128, 256, 256), "cross_attention_dim": 256, "sample_size": 16,
             "layers_per_block": 1},
    "vae": {**SD15["vae"], "block_out_channels": (32, 64, 128, 128), "layers_per_block": 1, "sample_size": 128},
    "text": {**SD15["text"], "hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4,
             "num_hidden_layers": 4, "projection_dim": 256},
    "resolution": 128,
}


def build(spec: dict, folder: Path) -> str:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdcli.testing import write_clip_tokenizer

    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(folder / "tok")))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=len(tok) - 2,
                                        eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1, **spec["text"]))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(in_channels=3, out_channels=3, **spec["vae"]), text_encoder=text, tokenizer=tok,
        unet=UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"]),
        scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "sd15")
    return str(folder / "sd15")


def free_gpu() -> None:
    """Return what dropped pipelines held to the card, so the next measurement starts clean."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Timer:
    """Steps per second from a step callback's timestamps (UNet it/s while denoising, steps/s while training)."""

    def __init__(self, device: str):
        self.device, self.marks = device, []

    def __call__(self, *_args):
        sync(self.device)
        self.marks.append(time.perf_counter())
        return {}

    def its(self) -> float:
        return (len(self.marks) - 1) / (self.marks[-1] - self.marks[0])


def run_diffusers(pipe, steps: int, res: int, device: str, batch: int = 1) -> tuple[float, float, int]:
    import numpy as np
    import torch

    timer = Timer(device)
    sync(device)
    t0 = time.perf_counter()
    images = pipe("a red circle", num_inference_steps=steps, height=res, width=res, guidance_scale=7.5,
                  num_images_per_prompt=batch, generator=torch.Generator("cpu").manual_seed(0),
                  callback_on_step_end=timer, output_type="np").images
    sync(device)
    seconds = time.perf_counter() - t0
    if not np.isfinite(images).all():  # sdcli's own path raises on NaN; plain diffusers would only warn
        raise SystemExit("plain diffusers produced NaN")
    return seconds / len(images), timer.its(), len(images)


def run_sdcli(loaded, settings, device: str) -> tuple[float, float, int]:
    """Seconds per image, UNet it/s and images made for one call (every seed of ``settings`` in one batch)."""
    from sdcli.generation import plan_jobs

    timer = Timer(device)
    sync(device)
    t0 = time.perf_counter()
    items = list(loaded.images(settings, plan_jobs(settings, list(settings.seeds)), on_step=timer))
    sync(device)
    return (time.perf_counter() - t0) / len(items), timer.its(), len(items)


def unet_flops(unet, res: int, device: str, dtype, batch: int = 1) -> float:
    """FLOPs of one guided step: the UNet on 2 x batch latents (conditional and unconditional)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    lat = torch.randn(2 * batch, 4, res // 8, res // 8, device=device, dtype=dtype)
    ctx = torch.randn(2 * batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(lat, torch.full((2 * batch,), 500, device=device), encoder_hidden_states=ctx)
    return float(counter.get_total_flops())


def peak_for(device: str) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def lora_bench(model: str, res: int, device: str, steps: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from sdcli.training import FinetuneConfig, finetune

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        rng = np.random.default_rng(0)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)).save(data / f"{i}.png")
            (data / f"{i}.txt").write_text(f"a picture number {i}")
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        timer = Timer(device)
        t0 = time.perf_counter()
        # sdcli's defaults: fp16 mixed precision and channels-last on CUDA, float32 elsewhere.
        cfg = FinetuneConfig(data=data, model=model, out=Path(tmp) / "out", max_steps=steps, batch_size=2,
                             resolution=res, checkpoint_every=0, quiet=True)
        finetune(cfg, callback=timer)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    # Steps/s between the first and the last step: the load, the cache and the first step's warm-up are apart.
    rate = timer.its() if len(timer.marks) > 1 else steps / seconds
    return {"lora_steps": steps, "lora_seconds_total": round(seconds, 2), "lora_steps_per_s": round(rate, 3),
            "lora_peak_gpu_gib": round(peak, 2) if peak else None}


def memory_bench(model: str, res: int, steps: int, device: str) -> dict:
    """Peak GPU memory for one image with sdcli's defaults and with --cpu-offload, each pipeline loaded alone."""
    import torch

    from sdcli.generation import Engine, Settings

    out = {}
    for name, offload in (("sdcli", False), ("sdcli --cpu-offload", True)):
        torch.cuda.reset_peak_memory_stats()
        settings = Settings(prompts=["a red circle"], model=model, steps=steps, seeds=[0], width=res, height=res,
                            cpu_offload=offload)
        loaded = Engine.load(settings)
        seconds, _its, _n = run_sdcli(loaded, settings, device)
        out[name] = {"peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                     "first_image_s": round(seconds, 3)}
        loaded = None  # noqa: F841
        free_gpu()  # before the next variant (or the LoRA run) loads
    return out


def measure(variants: dict, runs: int, batch: int) -> dict:
    """Median seconds per image and UNet it/s of each variant, runs interleaved after one warm-up call each.

    Every call must have made ``batch`` images: a per-image time divided by the wrong count is the error this
    benchmark once made (sdcli's batch-4 rows timed one image and divided by four)."""
    for fn in variants.values():
        fn()
    times: dict = {k: [] for k in variants}
    names = list(variants)
    for r in range(runs):  # each round starts one variant later, so none always runs first (a warmer card, say)
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(variants[k]())
    for k, v in times.items():
        if any(n != batch for _s, _its, n in v):
            raise SystemExit(f"{k} made {[n for *_x, n in v]} images per call, not {batch}")
    return {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v), [round(r[1], 2) for r in v])
            for k, v in times.items()}


def rows_for(measured: dict, batch: int, flops: float, peak: float | None) -> list[dict]:
    """One table row per variant, against plain diffusers measured in the same interleaved runs."""
    base = measured["diffusers"][1]
    rows = []
    for k, (s_img, its, each) in measured.items():
        tflops = flops * its / 1e12
        rows.append({"variant": k, "batch": batch, "s_per_image": round(s_img, 4), "unet_it_per_s": round(its, 2),
                     "tflops": float(f"{tflops:.3g}"), "of_peak": round(tflops / peak, 3) if peak else None,
                     "speedup_vs_diffusers": round(its / base, 3), "unet_it_per_s_each_run": each})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=["auto", "full", "reduced"], default="auto")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", default="1,4", help="comma list of images per call")
    parser.add_argument("--lora-steps", type=int, default=20, help="0 skips the LoRA fine-tuning run")
    parser.add_argument("--compile-modes", default="reduce-overhead,default",
                        help="comma list of sdcli --compile-mode values to measure (CUDA; elsewhere one --compile "
                             "variant, which compiles in torch's default mode)")
    parser.add_argument("--no-compile", action="store_true", help="measure no --compile variant")
    parser.add_argument("--bisect", action="store_true",
                        help="more eager variants, to tell where sdcli's defaults differ from plain diffusers: "
                             "diffusers' own call on the pipeline sdcli loaded, sdcli without channels-last, sdcli "
                             "with plain prompt syntax (diffusers encodes the prompt), and plain diffusers twice "
                             "(how far two identical variants differ)")
    parser.add_argument("--save-model", type=Path, help="build the pipeline here and keep it (for finetune_bench)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    modes = [] if args.no_compile else [m for m in args.compile_modes.split(",") if m]

    import torch
    from diffusers import StableDiffusionPipeline

    from sdcli.generation import Engine, Settings
    from sdcli.pipeline import resolve_device, resolve_dtype

    device = resolve_device("auto")
    full = args.size == "full" or (args.size == "auto" and device == "cuda")
    spec = SD15 if full else REDUCED
    res = spec["resolution"]
    dtype = resolve_dtype("auto", device)
    if not device.startswith("cuda"):
        modes = modes[:1]  # --compile-mode applies on CUDA only
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "size": "sd1.5 full" if full else "reduced", "resolution": res, "steps": args.steps,
                    "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__, "rows": [],
                    "compile_first_call_s": {}}

    def save() -> None:  # after every stage, so a run cut short leaves what it measured
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.save_model or Path(tmp)
        model = build(spec, folder)
        # 1. Peak memory with and without --cpu-offload, each pipeline loaded alone (before any other is).
        if device.startswith("cuda"):
            result["memory"] = memory_bench(model, res, args.steps, device)
            save()
        plain = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype).to(device)  # diffusers defaults
        plain.set_progress_bar_config(disable=True)
        settings = {b: Settings(prompts=["a red circle"], model=model, steps=args.steps, seeds=list(range(b)),
                                width=res, height=res, batch_size=b) for b in batches}
        ours = Engine.load(settings[batches[0]])
        peak = peak_for(device)
        flops = {b: unet_flops(ours.pipe.unet, res, device, dtype, b) for b in batches}
        ours_flat = None
        if args.bisect:
            flat = {b: Settings(**{**s.__dict__, "channels_last": False}) for b, s in settings.items()}
            plain_text = {b: Settings(**{**s.__dict__, "prompt_syntax": "plain"}) for b, s in settings.items()}
            ours_flat = Engine.load(flat[batches[0]])

        def eager(b: int) -> dict:
            variants = {"diffusers": lambda: run_diffusers(plain, args.steps, res, device, b),
                        "sdcli": lambda: run_sdcli(ours, settings[b], device)}
            if args.bisect:  # loading and options (sdcli's pipe) apart from sdcli's call; channels-last apart
                variants["diffusers call, sdcli's pipe"] = lambda: run_diffusers(ours.pipe, args.steps, res, device, b)
                variants["sdcli, no channels-last"] = lambda: run_sdcli(ours_flat, flat[b], device)
                variants["sdcli, plain prompt syntax"] = lambda: run_sdcli(ours, plain_text[b], device)
                variants["diffusers, again"] = lambda: run_diffusers(plain, args.steps, res, device, b)  # A/A: the noise
            return variants

        # 2. sdcli's defaults against plain diffusers, every batch size.
        for b in batches:
            result["rows"] += rows_for(measure(eager(b), args.runs, b), b, flops[b], peak)
            save()
        # 3. Each compile mode: its first calls (the compiling) timed, then interleaved with the eager two.
        for mode in modes:
            compiled_settings = {b: Settings(**{**s.__dict__, "compile": True, "compile_mode": mode})
                                 for b, s in settings.items()}
            name = f"sdcli --compile {mode}" if device.startswith("cuda") else "sdcli --compile"
            t0 = time.perf_counter()
            compiled = Engine.load(compiled_settings[batches[0]])
            firsts = {}
            for b in batches:  # a new batch size is a new shape: compiled again
                t1 = time.perf_counter()
                run_sdcli(compiled, compiled_settings[b], device)
                firsts[b] = round(time.perf_counter() - (t0 if b == batches[0] else t1), 1)
            result["compile_first_call_s"][mode] = firsts
            for b in batches:
                variants = {**eager(b), name: lambda b=b: run_sdcli(compiled, compiled_settings[b], device)}
                rows = rows_for(measure(variants, args.runs, b), b, flops[b], peak)
                result["rows"] += [r for r in rows if r["variant"] == name]
                result.setdefault("eager_rerun", []).extend(r for r in rows if r["variant"] != name)
            compiled = variants = None  # noqa: F841
            save()
        plain = ours = ours_flat = None  # noqa: F841
        if device.startswith("cuda"):
            free_gpu()
        if args.lora_steps:
            result.update(lora_bench(model, res, device, args.lora_steps))
    print(json.dumps(result, indent=2), flush=True)
    save()


if __name__ == "__main__":
    main()
