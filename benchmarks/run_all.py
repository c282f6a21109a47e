"""Every CPU benchmark in one command: a table on stdout and one JSON. Run by hand (never in tests):

    python benchmarks/run_all.py                     # small random pipelines built on the spot
    python benchmarks/run_all.py --runs 7 --json benchmarks/results.json

Runs generate_bench.py (`sdcli --help` wall time, shell-to-PNG with the bundled model, sdcli's generation
against a direct diffusers call) and finetune_bench.py (sdcli finetune against a plain reference loop:
images/s and peak memory), each in its own process, each figure a median of --runs runs. The GPU
benchmark (gpu_bench.py) stays separate: it needs a card to mean anything.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str, args: list[str]) -> dict:
    """Run one benchmark script with --json and return what it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, str(HERE / script), *args, "--json", str(out)], check=True,
                       stdout=sys.stderr)  # their own tables go to stderr; ours is the result
        return json.loads(out.read_text())


def table(gen: dict, ft: dict) -> str:
    rows = [
        ("`sdcli --help` wall", f"{gen['help_seconds']:.2f} s", "", ""),
        ("shell to PNG, bundled model, 25 steps", f"{gen['shell_to_png_seconds']:.2f} s", "", ""),
        (f"generate, {gen['steps']} steps (s/image)", f"{gen['sdcli_seconds']:.3f}", f"{gen['diffusers_seconds']:.3f}",
         f"{gen['ratio']:.3f}"),
        ("generate, prompt past 77 tokens (s/image)", f"{gen['long_prompt_sdcli_seconds']:.3f}",
         f"{gen['long_prompt_diffusers_seconds']:.3f}", f"{gen['long_prompt_ratio']:.3f}"),
        ("inpainting with the composite (s/image)", f"{gen['inpaint_sdcli_seconds']:.3f}",
         f"{gen['inpaint_diffusers_seconds']:.3f}", f"{gen['inpaint_ratio']:.3f}"),
        (f"generate SD3, {gen['steps']} steps (s/image)", f"{gen['sd3_sdcli_seconds']:.3f}",
         f"{gen['sd3_diffusers_seconds']:.3f}", f"{gen['sd3_ratio']:.3f}"),
        (f"finetune {ft['method']} (images/s)", f"{ft['sdcli_images_per_s']:.2f}", f"{ft['reference_images_per_s']:.2f}",
         f"{ft['speedup']:.2f}"),
        (f"finetune {ft['method']} peak memory (MB)", f"{ft['sdcli_peak_mb']:.0f}", f"{ft['reference_peak_mb']:.0f}",
         f"{ft['memory_ratio']:.2f}"),
    ]
    lines = ["| measure | sdcli | baseline | ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (medians)")
    parser.add_argument("--json", type=Path, help="write everything here")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M")
    gen = run("generate_bench.py", ["--runs", str(args.runs)])
    ft = run("finetune_bench.py", ["--runs", str(args.runs)])
    print(table(gen, ft))
    print("baseline: a direct diffusers pipeline call (generate); the per-batch-encoding reference loop (finetune)")
    if args.json:
        machine = {"platform": platform.platform(), "python": platform.python_version(), "date": started}
        args.json.write_text(json.dumps({"machine": machine, "generate": gen, "finetune": ft}, indent=2) + "\n")


if __name__ == "__main__":
    main()
