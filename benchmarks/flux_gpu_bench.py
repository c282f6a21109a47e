"""A FLUX.1-size denoiser on a GPU: each weight mode's s/image and peak memory, sdcli against plain diffusers;
the step caches; QLoRA against bf16 LoRA (the GPU issue's items 2, 3 and 5).

    python benchmarks/flux_gpu_bench.py [--preset flux|tiny] [--stages modes,caches,qlora] [--modes ...]
        [--steps 28] [--size 1024] [--runs 1] [--json out.json]

The device machine reaches no hub, so the model is built here with random weights: FLUX.1-dev's transformer
(19 double and 38 single blocks, 3072 channels, about 11.9B parameters) and Flux's VAE (16 latent channels),
with the tiny test pipeline's CLIP and T5 (the transformer's text projections sized to them: a few thousand of
its parameters). Memory and speed are real; images are not. ``--preset tiny`` builds the same thing at test
size, to check the script on the CPU (every CUDA-only mode is skipped there).

Stage ``modes``: for each mode (bf16; ``--storage-dtype float8``; torchao float8 weight-only; bitsandbytes nf4;
a GGUF Q8_0 file), with and without ``--offload model`` (``--offloads``), plain diffusers loads and runs the
pipeline as its documentation says, then sdcli's engine with the same mode: seconds per image (median of
``--runs`` after one warm-up image) and peak allocated memory from before the load to after the last image.
Stage ``caches``: the bf16 model through sdcli without a cache and with each ``--cache`` mode: s/image and the
largest and mean pixel difference from the uncached image. Stage ``qlora``: ``sdcli finetune`` LoRA at
``--size``, batch 1, a few steps, on the bf16 model and with ``--quantize nf4``: steps/s (from the run's own
loss.csv) and the process's peak allocated memory.

The GGUF file is written here (Q8_0 blocks packed with torch on the device; the gguf package's own packing is
numpy and takes minutes at this size; ``--check-gguf`` compares the two on a small tensor). The gguf package
writes no K-quants, so Q4_K cannot be made offline. Each stage writes its rows to --json as it finishes.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a cabin in a snowy forest at dusk"
MODES = ("bf16", "fp8-storage", "torchao-fp8", "nf4", "gguf-q8_0")
CUDA_ONLY = {"torchao-fp8", "nf4"}  # diffusers' quantizers for these need a CUDA device
CACHES = ("first-block", "taylorseer", "mag")
# FLUX.1-dev's transformer (its config on the Hub), and a test-size twin.
PRESETS = {
    "flux": dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                 axes_dims_rope=(16, 56, 56), vae=(128, 256, 512, 512)),
    "tiny": dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 axes_dims_rope=(4, 6, 6), vae=(32, 32, 32, 32)),
}


def build(folder: Path, preset: str) -> Path:
    """Save a Flux pipeline of ``preset``'s transformer and VAE with random weights (bf16), the tiny test
    pipeline's text encoders, tokenizers and scheduler."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from sdcli.testing import build_tiny_flow_pipeline

    p = dict(PRESETS[preset])
    blocks = p.pop("vae")
    pipe = build_tiny_flow_pipeline("flux")
    t5 = pipe.text_encoder_2.config.d_model
    pooled = pipe.text_encoder.config.projection_dim
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # random init of ~12B parameters: seconds on a GPU, minutes on a CPU
        pipe.transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, out_channels=None,
                                                  joint_attention_dim=t5, pooled_projection_dim=pooled,
                                                  guidance_embeds=True, **p).to(torch.bfloat16)
        pipe.vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=blocks,
                                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                 layers_per_block=2, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                                 use_post_quant_conv=False, sample_size=1024).to(torch.bfloat16)
    pipe.to(torch.bfloat16)
    pipe.save_pretrained(folder, max_shard_size="10GB")
    del pipe
    gc.collect()
    return folder


def write_gguf_q8_0(folder: Path, out: Path) -> Path:
    """The transformer of ``folder`` as a GGUF file in diffusers' tensor names (which diffusers loads as they are):
    2-D weights whose rows split into blocks of 32 as Q8_0, the rest float32."""
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open

    writer = gguf.GGUFWriter(str(out), arch="flux")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for shard in sorted((folder / "transformer").glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.ndim == 2 and t.shape[-1] % 32 == 0:
                    writer.add_tensor(name, q8_0_bytes(t.to(device)),
                                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                else:
                    writer.add_tensor(name, t.float().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def q8_0_bytes(t):
    """GGML's Q8_0 blocks of a 2-D tensor (rows, cols): per 32 values a float16 scale d = max|x| / 127 and 32 int8
    round(x / d) (half away from zero), as uint8 (rows, cols / 32 · 34)."""
    import torch

    x = t.float().reshape(-1, 32)
    d = x.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = (x * inv).abs().add(0.5).floor().mul(torch.sign(x)).to(torch.int8)
    blocks = torch.cat([d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)], dim=1)
    return blocks.reshape(t.shape[0], -1).cpu().numpy()


def check_gguf_packing() -> float:
    """The share of bytes where this packing differs from the gguf package's own, on a random 64x256 tensor."""
    import gguf
    import numpy as np
    import torch

    t = torch.randn(64, 256)
    theirs = gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.Q8_0)
    ours = q8_0_bytes(t)
    return float(np.mean(theirs.view(np.uint8) != ours))


# -- stage: modes ------------------------------------------------------------------------------------------


def diffusers_pipeline(folder: Path, mode: str, offload: bool, gguf_file: Path | None):
    """The pipeline as diffusers' documentation loads it in ``mode``."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    kw: dict = {"torch_dtype": torch.bfloat16}
    if mode == "torchao-fp8":
        from diffusers import PipelineQuantizationConfig, TorchAoConfig
        from torchao.quantization import Float8WeightOnlyConfig

        kw["quantization_config"] = PipelineQuantizationConfig(
            quant_mapping={"transformer": TorchAoConfig(Float8WeightOnlyConfig())})
    elif mode == "nf4":
        from diffusers import BitsAndBytesConfig, PipelineQuantizationConfig

        kw["quantization_config"] = PipelineQuantizationConfig(quant_mapping={"transformer": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)})
    elif mode == "gguf-q8_0":
        from diffusers import GGUFQuantizationConfig

        kw["transformer"] = FluxTransformer2DModel.from_single_file(
            str(gguf_file), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16),
            config=str(folder), subfolder="transformer", torch_dtype=torch.bfloat16)
    pipe = FluxPipeline.from_pretrained(str(folder), **kw)
    if mode == "fp8-storage":
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    if offload:
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdcli_settings(folder: Path, mode: str, offload: bool, gguf_file: Path | None, args, **extra):
    from sdcli.generation import Settings

    fields = {"fp8-storage": {"storage_dtype": "float8"}, "torchao-fp8": {"quantize": "torchao:fp8"},
              "nf4": {"quantize": "bitsandbytes:nf4"},
              "gguf-q8_0": {"denoiser_file": str(gguf_file)}}.get(mode, {})
    return Settings(prompts=[PROMPT], model=str(folder), device=device(), dtype="bfloat16", steps=args.steps,
                    seeds=[0], width=args.size, height=args.size, offload="model" if offload else None,
                    **fields, **extra)


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def timed(fn, runs: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def one_mode(folder: Path, mode: str, offload: bool, gguf_file: Path | None, args) -> dict:
    import torch

    from sdcli.generation import Engine, plan

    row: dict = {"mode": mode, "offload": "model" if offload else "none"}
    reset_peak()
    t0 = time.perf_counter()
    pipe = diffusers_pipeline(folder, mode, offload, gguf_file)
    row["diffusers_load_s"] = round(time.perf_counter() - t0, 1)
    gen = lambda: torch.Generator("cpu").manual_seed(0)  # noqa: E731
    row["diffusers_s"], _ = timed(lambda: pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=3.5,
                                               width=args.size, height=args.size, generator=gen(),
                                               output_type="np"), args.runs)
    row["diffusers_peak_gib"] = peak_gib()
    del pipe
    reset_peak()
    s = sdcli_settings(folder, mode, offload, gguf_file, args)
    t0 = time.perf_counter()
    engine = Engine.load(s)
    row["sdcli_load_s"] = round(time.perf_counter() - t0, 1)
    jobs = plan(s, distributed=False).jobs
    row["sdcli_s"], _ = timed(lambda: list(engine.images(s, jobs, on_step=lambda n: None)), args.runs)
    row["sdcli_peak_gib"] = peak_gib()
    del engine
    reset_peak()
    row["ratio"] = round(row["diffusers_s"] / row["sdcli_s"], 3)  # speed: ≥ 0.98 is the target
    if row["diffusers_peak_gib"]:
        row["memory_ratio"] = round(row["sdcli_peak_gib"] / row["diffusers_peak_gib"], 3)
    for k in ("diffusers_s", "sdcli_s"):
        row[k] = round(row[k], 3)
    return row


# -- stage: caches -----------------------------------------------------------------------------------------


def caches(folder: Path, args) -> list[dict]:
    import numpy as np

    from sdcli.generation import Engine, plan

    s = sdcli_settings(folder, "bf16", False, None, args)
    engine = Engine.load(s)
    rows, reference = [], None
    for cache in (None, *CACHES):
        r = dataclasses.replace(s, step_cache=cache)
        jobs = plan(r, distributed=False).jobs
        seconds, made = timed(lambda: list(engine.images(r, jobs, on_step=lambda n: None)), args.runs)
        image = np.asarray(made[0].image, dtype=np.float32)
        reference = image if reference is None else reference
        diff = np.abs(image - reference)
        rows.append({"cache": cache or "none", "s": round(seconds, 3), "max_diff": float(diff.max()),
                     "mean_diff": round(float(diff.mean()), 3)})
    base = rows[0]["s"]
    for row in rows:
        row["speedup"] = round(base / row["s"], 3)
    return rows


# -- stage: qlora ------------------------------------------------------------------------------------------

PEAK = ("import atexit, sys, torch\n"
        "atexit.register(lambda: print('PEAK_BYTES', torch.cuda.max_memory_allocated() if torch.cuda.is_available() "
        "else 0, file=sys.stderr))\n"
        "from sdcli.cli import main\n"
        "sys.argv = ['sdcli'] + sys.argv[1:]\n"
        "main()\n")


def qlora(folder: Path, tmp: Path, args) -> list[dict]:
    from PIL import Image

    data = tmp / "data"
    data.mkdir(exist_ok=True)
    for i in range(4):
        Image.new("RGB", (args.size, args.size), (40 * i, 90, 160)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a plain colour {i}")
    rows = []
    for name, extra in (("bf16 LoRA", []), ("QLoRA nf4", ["--quantize", "nf4"])):
        if extra and device() != "cuda":
            continue
        out = tmp / name.replace(" ", "-")
        cmd = [sys.executable, "-c", PEAK, "finetune", "--model", str(folder), "--data", str(data), "--out",
               str(out), "--resolution", str(args.size), "--batch-size", "1", "--max-steps", str(args.train_steps),
               "--mixed-precision", "bf16" if device() == "cuda" else "no", "--gradient-checkpointing",
               "--rank", "16", *extra]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        row = {"run": name, "wall_s": round(time.perf_counter() - t0, 1), "exit": done.returncode}
        peak = [ln for ln in done.stderr.splitlines() if ln.startswith("PEAK_BYTES")]
        row["peak_gib"] = round(int(peak[-1].split()[1]) / 2**30, 2) if peak else None
        losses = out / "loss.csv"  # the run's own log: images/s per step, which is steps/s at batch 1
        if losses.exists():
            with losses.open(newline="") as f:
                rates = [float(r["images_per_s"]) for r in csv.DictReader(f) if r.get("images_per_s")]
            row["steps_per_s"] = round(statistics.median(rates[1:] or rates), 3) if rates else None
        if done.returncode:
            row["error"] = done.stderr.strip().splitlines()[-1:] or ""
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="flux")
    parser.add_argument("--stages", default="modes,caches,qlora")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--offloads", default="none,model", help="none, model, or both (comma-separated)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--model", help="A folder made by an earlier run (skips building).")
    parser.add_argument("--json")
    parser.add_argument("--check-gguf", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import diffusers
    import torch

    report: dict = {"torch": torch.__version__, "diffusers": diffusers.__version__, "device": device(),
                    "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "steps": args.steps, "size": args.size}

    def save() -> None:
        print(json.dumps(report, indent=1), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    if args.check_gguf:
        report["q8_0_bytes_differing"] = check_gguf_packing()
    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    folder = Path(args.model) if args.model else build(tmp / "flux", args.preset)
    report["build_s"] = round(time.perf_counter() - t0, 1)
    save()
    stages = args.stages.split(",")
    if "modes" in stages:
        report["modes"] = []
        modes = [m for m in args.modes.split(",") if device() == "cuda" or m not in CUDA_ONLY]
        gguf_file = None
        if "gguf-q8_0" in modes:
            t0 = time.perf_counter()
            gguf_file = write_gguf_q8_0(folder, tmp / "transformer-Q8_0.gguf")
            report["gguf_write_s"] = round(time.perf_counter() - t0, 1)
        for offload in args.offloads.split(","):
            if offload == "model" and device() != "cuda":
                continue
            for mode in modes:
                try:
                    report["modes"].append(one_mode(folder, mode, offload == "model", gguf_file, args))
                except Exception as e:  # a mode that fails is a finding; the others still run
                    report["modes"].append({"mode": mode, "offload": offload, "error": f"{type(e).__name__}: {e}"[:300]})
                save()
    if "caches" in stages:
        report["caches"] = caches(folder, args)
        save()
    if "qlora" in stages:
        report["qlora"] = qlora(folder, tmp, args)
        save()


if __name__ == "__main__":
    main()
