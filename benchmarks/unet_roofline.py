"""Cross-check of gpu_bench.py's TFLOP/s: the UNet alone against the card's own matmul, and where its time goes.

gpu_bench.py divides FLOPs counted by torch.utils.flop_counter by the time between step callbacks. This script
checks both halves without the pipeline around them:
  * the card's achievable tensor-core rate: a square float16 matmul (n = 8192), timed with CUDA events;
  * one guided step of SD 1.5's UNet (2 x batch latents, 512 px), eager and compiled as sdcli compiles it
    (channels-last, q/k/v fused, torch.compile in the given mode), timed with CUDA events over --iters calls;
  * torch.profiler's kernel time for a few compiled calls, split into matmul/convolution kernels and the rest,
    against the wall time of the same calls (kernel time far below wall time means launch-bound; a UNet rate
    above the matmul's means the count or the timing is wrong).

    python benchmarks/unet_roofline.py --batch 4 --json roofline.json              # on a GPU
    python benchmarks/unet_roofline.py --size reduced --no-compile --iters 1       # the CPU check the tests run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_bench import REDUCED, SD15, peak_for, sync, unet_flops  # noqa: E402

# Kernel names of the tensor-core work: cuBLAS/cuBLASLt/CUTLASS GEMMs, cuDNN convolutions, Triton matmul
# templates, flash/memory-efficient attention. Everything else (norms, activations, copies) is "other".
MATMUL_KERNELS = ("gemm", "conv", "cutlass", "xmma", "sm90", "sm80", "nvjet", "cudnn", "mm", "flash", "fmha",
                  "attention", "wgrad", "dgrad")


def sig(x: float) -> float:
    return float(f"{x:.3g}")


def timed(fn, iters: int, device: str) -> float:
    """Median seconds of one call of ``fn``, CUDA events on a GPU, the wall clock elsewhere."""
    import statistics

    import torch

    fn()  # warm-up (and, compiled, graph capture)
    times = []
    for _ in range(iters):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_tflops(device: str, dtype, n: int, iters: int) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, iters, device) / 1e12


def kernel_split(fn, calls: int, device: str) -> dict:
    """Profiled kernel time of ``calls`` calls: total, matmul-like share, and the wall time they took."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        wall = time.perf_counter() - t0
    # Self time: each kernel (on the CPU, each operator) counted once, not again in what called it.
    kernels = [(e.self_device_time_total if cuda else e.self_cpu_time_total, e.key) for e in prof.key_averages()
               if e.device_type == kind]
    total = sum(us for us, _ in kernels)
    mm = sum(us for us, name in kernels if any(k in name.lower() for k in MATMUL_KERNELS))
    top = sorted(kernels, reverse=True)[:8]
    return {"calls": calls, "wall_ms_per_call": sig(wall * 1e3 / calls), "kernel_ms_per_call": sig(total / 1e3 / calls),
            "matmul_share": round(mm / total, 3) if total else None,
            "top_kernels": [{"name": name[:90], "ms_per_call": round(us / 1e3 / calls, 3)} for us, name in top]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("sd15", "reduced"), default="sd15")
    parser.add_argument("--batch", type=int, default=4, help="images per step (the UNet sees twice as many)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--mode", default="reduce-overhead", help="torch.compile mode on CUDA")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--matmul-n", type=int, default=8192)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch
    from diffusers import UNet2DConditionModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    spec = SD15 if args.size == "sd15" else REDUCED
    torch.manual_seed(0)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"]).to(device, dtype).eval()
    lat_size = spec["resolution"] // 8
    n = 2 * args.batch
    lat = torch.randn(n, 4, lat_size, lat_size, device=device, dtype=dtype)
    ctx = torch.randn(n, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    t = torch.full((n,), 500, device=device)
    flops = unet_flops(unet, spec["resolution"], device, dtype, args.batch)
    peak = peak_for(device)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "size": args.size, "batch": args.batch, "unet_latents": n, "gflop_per_step": round(flops / 1e9, 1),
              "peak_tflops": peak}

    def report(**values) -> None:
        result.update(values)
        print(json.dumps(values), file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))

    mm = matmul_tflops(device, dtype, args.matmul_n if device == "cuda" else 512, args.iters)
    report(matmul_tflops=sig(mm))
    unet.to(memory_format=torch.channels_last)

    def step(net):
        with torch.no_grad():
            return net(lat, t, encoder_hidden_states=ctx).sample

    seconds = timed(lambda: step(unet), args.iters, device)
    report(eager={"ms_per_step": round(seconds * 1e3, 3), "tflops": sig(flops / seconds / 1e12)})
    report(eager_kernels=kernel_split(lambda: step(unet), 5 if device == "cuda" else 1, device))
    if not args.no_compile:
        unet.fuse_qkv_projections()
        compiled = torch.compile(unet, mode=args.mode if device == "cuda" else "default")
        t0 = time.perf_counter()
        step(compiled)
        step(compiled)
        compile_s = time.perf_counter() - t0
        seconds = timed(lambda: step(compiled), args.iters, device)
        report(compiled={"mode": args.mode, "compile_s": round(compile_s, 1), "ms_per_step": round(seconds * 1e3, 3),
                         "tflops": sig(flops / seconds / 1e12)})
        report(compiled_kernels=kernel_split(lambda: step(compiled), 5 if device == "cuda" else 1, device))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
