"""The roofline cross-check runs on the CPU at a reduced size, so it cannot rot between GPU runs (nothing timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "unet_roofline.py"


def test_unet_roofline_reports_the_count_the_rates_and_the_kernel_split(tmp_path):
    out = tmp_path / "roofline.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--size", "reduced", "--no-compile", "--iters", "1",
                          "--batch", "2", "--json", str(out)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert (result["batch"], result["unet_latents"]) == (2, 4)
    assert result["gflop_per_step"] > 0 and result["matmul_tflops"] > 0
    eager = result["eager"]
    # The rate is the count over the time, up to the rounding of both (0.1 GFLOP, three digits).
    assert abs(eager["tflops"] - result["gflop_per_step"] / eager["ms_per_step"]) <= 0.02 * eager["tflops"]
    split = result["eager_kernels"]
    assert 0 < split["matmul_share"] <= 1 and split["top_kernels"]
    assert "compiled" not in result
