"""torch's CPU threads on an idle and on a busy machine: what `--threads` auto picks, against fixed counts.

    python benchmarks/threads_bench.py --runs 3

Each case is a fresh `sdcli generate` with the bundled model (--num-images 4, 25 steps), its wall time the
median of --runs runs, cases interleaved. "busy" runs a second process that keeps one core spinning
throughout, as a compile, a browser or a second job would. Images are compared across cases: the thread
count must not change a pixel.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {  # name -> (extra args, extra environment)
    "auto": ([], {}),
    "torch default (2)": (["--threads", str(os.cpu_count())], {}),
    "1 thread": (["--threads", "1"], {}),
    "2 threads, OMP_WAIT_POLICY=PASSIVE": (["--threads", str(os.cpu_count())], {"OMP_WAIT_POLICY": "PASSIVE"}),
}


def run(args: list[str], env: dict[str, str], out: Path) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "sdcli", "generate", "a large red circle in the top left corner on a black background",
           "--num-images", "4", "--seed", "1", "--out", str(out), "-q", *args]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, **env}, capture_output=True)
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(out.glob("*.png")))).hexdigest()[:12]
    return seconds, digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    digests = set()
    for load in ("idle", "busy"):
        burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
        try:
            time.sleep(1.0 if burner else 0)
            times: dict[str, list[float]] = {name: [] for name in CASES}
            for _ in range(args.runs):
                for name, (extra, env) in CASES.items():
                    with tempfile.TemporaryDirectory() as tmp:
                        seconds, digest = run(extra, env, Path(tmp))
                    times[name].append(seconds)
                    digests.add(digest)
            results[load] = {name: round(statistics.median(t), 2) for name, t in times.items()}
        finally:
            if burner:
                burner.kill()
    print(f"{'case':36} {'idle s':>8} {'busy s':>8}")
    for name in CASES:
        print(f"{name:36} {results['idle'][name]:8.2f} {results['busy'][name]:8.2f}")
    print(f"identical images across cases: {len(digests) == 1}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "identical": len(digests) == 1, "cpus": os.cpu_count()},
                                        indent=2))


if __name__ == "__main__":
    main()
