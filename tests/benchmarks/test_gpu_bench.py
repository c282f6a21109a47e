"""The GPU benchmark runs end to end on the CPU at a reduced size, so it cannot rot between GPU runs.

Nothing here is timed: the figures only have to exist and be consistent with each other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_bench.py"


@pytest.mark.slow
def test_gpu_bench_reports_every_figure_at_reduced_size(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(BENCH), "--size", "reduced", "--steps", "2", "--runs", "1",
                          "--lora-steps", "2", "--no-compile", "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert json.loads(res.stdout[res.stdout.index("{"):]) == result
    assert result["size"] == "reduced" and result["resolution"] == 128
    for variant in ("diffusers", "sdcli"):
        figures = result[variant]
        assert figures["s_per_image"] > 0 and figures["unet_it_per_s"] > 0 and figures["tflops"] > 0
    ratio = result["sdcli"]["unet_it_per_s"] / result["diffusers"]["unet_it_per_s"]
    assert result["sdcli"]["speedup_vs_diffusers"] == pytest.approx(ratio, abs=0.002)
    assert result["lora_steps"] == 2 and result["lora_steps_per_s"] > 0
