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
                          "--batch", "1,2", "--lora-steps", "2", "--no-compile", "--bisect", "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert json.loads(res.stdout[res.stdout.index("{"):]) == result
    assert result["size"] == "reduced" and result["resolution"] == 128
    rows = {(r["variant"], r["batch"]): r for r in result["rows"]}
    variants = ("diffusers", "sdcli", "diffusers call, sdcli's pipe", "sdcli, no channels-last",
                "sdcli, plain prompt syntax", "diffusers, again")
    assert set(rows) == {(v, b) for v in variants for b in (1, 2)}
    assert all(len(r["unet_it_per_s_each_run"]) == 1 for r in rows.values())  # --runs 1: each run's rate kept
    for b in (1, 2):
        ours, base = rows["sdcli", b], rows["diffusers", b]
        assert ours["s_per_image"] > 0 and ours["unet_it_per_s"] > 0 and ours["tflops"] > 0
        assert ours["speedup_vs_diffusers"] == pytest.approx(ours["unet_it_per_s"] / base["unet_it_per_s"], abs=0.002)
    # Twice the latents per step: twice the FLOPs per UNet iteration.
    per_it = {b: rows["sdcli", b]["tflops"] / rows["sdcli", b]["unet_it_per_s"] for b in (1, 2)}
    assert per_it[2] == pytest.approx(2 * per_it[1], rel=0.02)
    assert result["lora_steps"] == 2 and result["lora_steps_per_s"] > 0
