"""Many prompts across processes: `torchrun`/`accelerate launch` split the jobs, one summary at the end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _launcher(name: str) -> list[str]:
    exe = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if name == "torchrun":
        return [exe, "--standalone", "--nproc_per_node", "2"]
    # --multi_gpu starts two gloo processes without a GPU; --cpu with --num_processes 2 would start one.
    return [exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_share_the_prompts_without_clashing(tiny_sd, tmp_path, launcher):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    out = tmp_path / "out"
    res = subprocess.run(
        [*_launcher(launcher), "-m", "sdcli", "generate", "a", "b", "c", "d", "e",
         "--model", tiny_sd, "--seed", "3", "--steps", "2", "--out", str(out), "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    records = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["prompt"] for r in records) == ["a", "b", "c", "d", "e"]
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [f"{i:05d}-3.png" for i in range(5)]
    # accelerate's split gave each process a share, and the main process summed them up once.
    assert res.stderr.count("5 images from 2 processes (per process: 3, 2)") == 1
