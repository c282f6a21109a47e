"""`sdcli serve` warm: the latency of the second and later requests against the denoising alone, and
8 concurrent clients × 4 requests each.

    python benchmarks/serve_bench.py --runs 6 [--model M] [--device cpu] [--json out.json]

A server on 127.0.0.1 (a free port) loads the model once (the bundled one by default). Latency: --runs
txt2img requests (25 steps, 64×64, one image), each followed by the same request made directly on the
server's own engine (`engine.generate`: prompt encoding, denoising, VAE decode, no HTTP, no PNG); the first
request is left out (it warms the caches), and the figure is the median of the rest, with the overhead as
median(HTTP) − median(direct). Load: 8 clients in threads, each sending 4 requests one after the other;
every answer is checked (200, the seed asked, each client's answers in its order) and the queue's length
is sampled throughout, to show it stayed within --max-queue.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--model", default="bundled:shapes")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--each", type=int, default=4)
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import requests

    from sdcli.generation.settings import Settings
    from sdcli.serve.app import running
    from sdcli.serve.config import ServeConfig

    body = dict(prompt="a large red circle in the top left corner on a black background", steps=25, width=64,
                height=64, cfg_scale=7.5)
    config = ServeConfig(models=[args.model], port=0, device=args.device, max_queue=args.max_queue)
    with running(config, log=lambda line: None) as (url, server):
        # 1. Latency: HTTP request against the engine's own call, interleaved.
        http, direct = [], []
        for i in range(args.runs + 1):
            t0 = time.perf_counter()
            answer = requests.post(url + "/sdapi/v1/txt2img", json=body | {"seed": i}, timeout=600)
            answer.raise_for_status()
            http.append(time.perf_counter() - t0)
            engine = server.models.engine
            t0 = time.perf_counter()
            engine.generate(Settings(prompts=[body["prompt"]], steps=25, width=64, height=64, guidance=[7.5],
                                     seeds=[i], negative_prompt=""))
            direct.append(time.perf_counter() - t0)
        http, direct = http[1:], direct[1:]

        # 2. Load: clients × each requests, every answer checked, the queue watched.
        got: dict[int, list[int]] = {c: [] for c in range(args.clients)}
        failures: list[str] = []
        longest, watching = [0], [True]

        def watch() -> None:
            while watching[0]:
                longest[0] = max(longest[0], server.worker.waiting)
                time.sleep(0.005)

        def client(c: int) -> None:
            with requests.Session() as session:
                for i in range(args.each):
                    seed = 1000 * c + i
                    r = session.post(url + "/sdapi/v1/txt2img", json=body | {"seed": seed}, timeout=600)
                    if r.status_code != 200:
                        failures.append(f"client {c} request {i}: {r.status_code} {r.text[:100]}")
                        continue
                    got[c].append(json.loads(r.json()["info"])["seed"])

        watcher = threading.Thread(target=watch)
        watcher.start()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        load_seconds = time.perf_counter() - t0
        watching[0] = False
        watcher.join()
        in_order = all(got[c] == [1000 * c + i for i in range(args.each)] for c in range(args.clients))
        answered = sum(len(v) for v in got.values())
        device = server.models.engine.device

    result = {
        "model": args.model, "device": device, "runs": args.runs,
        "request_s": statistics.median(http), "direct_s": statistics.median(direct),
        "overhead_s": statistics.median(http) - statistics.median(direct),
        "load_requests": args.clients * args.each, "load_answered": answered, "load_failures": failures,
        "load_in_order": in_order, "load_seconds": load_seconds, "load_longest_queue": longest[0],
        "max_queue": args.max_queue,
    }
    print(f"| measure | value |\n|---|---:|")
    print(f"| request, 25 steps 64×64 (median of {args.runs}, after the first) | {result['request_s']:.3f} s |")
    print(f"| the engine's own call, same settings | {result['direct_s']:.3f} s |")
    print(f"| HTTP + queue + PNG overhead | {result['overhead_s']:.3f} s |")
    print(f"| {args.clients} clients × {args.each} requests: answered | {answered} of {args.clients * args.each} "
          f"in {load_seconds:.1f} s |")
    print(f"| each client's answers in its order | {'yes' if in_order else 'NO'} |")
    print(f"| longest queue seen (bound {args.max_queue}) | {longest[0]} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if failures or not in_order or answered != args.clients * args.each:
        sys.exit(1)


if __name__ == "__main__":
    main()
