"""Weight memory of each CPU-runnable `--quantize`/GGUF/storage mode against float32, on a tiny Flux transformer.

    python benchmarks/quantize_bench.py [--width 256] [--layers 2] [--runs 3]

Builds a random Flux transformer (``--width`` channels, ``--layers`` double and single blocks: big enough that
its linear layers, which the modes shrink, are most of it), saves it as a pipeline with the tiny test pipeline's
other parts, and loads it through sdcli once per mode. For each: the transformer's weight bytes as stored
(`sdcli.quantize.weight_bytes`: a quantized tensor's own data and scales), what `sdcli.memory.weights_bytes`
estimates from the safetensors headers, s/image (median of --runs, 4 steps, 64x64), and the largest pixel
difference from the float32 image. Run by hand; the figures go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

MODES = {  # name -> Settings fields
    "float32": {},
    "bfloat16": {"dtype": "bfloat16"},
    "--storage-dtype float8": {"storage_dtype": "float8"},
    "--quantize int8-weight (torchao)": {"quantize": "int8-weight"},
    "GGUF Q8_0": {"gguf": "Q8_0"},
    "GGUF Q4_0": {"gguf": "Q4_0"},
}


def build(folder: Path, width: int, layers: int) -> Path:
    import torch
    from diffusers import FluxTransformer2DModel

    from sdcli.testing import build_tiny_flow_pipeline

    torch.manual_seed(0)
    pipe = build_tiny_flow_pipeline("flux")
    heads = width // 64
    pipe.transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=layers, attention_head_dim=64,
        num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(16, 24, 24),
        guidance_embeds=True)
    pipe.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    import numpy as np

    from sdcli import memory
    from sdcli.generation import Engine, Settings
    from sdcli.quantize import resolve, weight_bytes
    from sdcli.testing import save_tiny_gguf

    tmp = Path(tempfile.mkdtemp())
    model = build(tmp / "flux", args.width, args.layers)
    params = memory.model_params(str(model))
    rows, reference = [], None
    for name, fields in MODES.items():
        fields = dict(fields)
        qtype = fields.pop("gguf", None)
        gguf = save_tiny_gguf(model, tmp / f"{qtype}.gguf", qtype) if qtype else None
        engine = Engine.load(Settings(model=str(model), denoiser_file=str(gguf) if gguf else None, **fields))
        stored = weight_bytes(engine.pipe.transformer)
        mode = resolve(fields["quantize"], "cpu") if "quantize" in fields else None
        nbytes = 2 if fields.get("dtype") == "bfloat16" else 4
        estimate = memory.weights_bytes({"transformer": params["transformer"]}, nbytes=nbytes, denoiser="transformer",
                                        quantize=mode, storage_float8="storage_dtype" in fields,
                                        denoiser_file_bytes=gguf.stat().st_size if gguf else None)
        times, image = [], None
        for _ in range(args.runs):
            t0 = time.perf_counter()
            made = engine.generate("a red circle", seeds=[1], steps=4, width=64, height=64)[0]
            times.append(time.perf_counter() - t0)
            image = np.asarray(made.image, np.int16)
        reference = image if reference is None else reference
        rows.append((name, stored, estimate, statistics.median(times), int(np.abs(image - reference).max())))
    base = rows[0][1]
    print(f"transformer: width {args.width}, {args.layers}+{args.layers} blocks, "
          f"{params['transformer'].linear + params['transformer'].other:,} parameters "
          f"({params['transformer'].linear:,} in linear layers)")
    print("| mode | weights MB | vs float32 | estimate MB | s/image | max pixel diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, stored, estimate, seconds, diff in rows:
        print(f"| {name} | {stored / 2**20:.2f} | {stored / base:.2f} | {estimate / 2**20:.2f} | {seconds:.3f} | {diff} |")


if __name__ == "__main__":
    main()
