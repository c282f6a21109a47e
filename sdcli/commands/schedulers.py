"""`sdcli schedulers`: the sampler names `--scheduler` accepts, and the σ spacings `--sigmas` accepts."""

from __future__ import annotations

import json as jsonlib

from sdcli.options import Json


def schedulers_cmd(json: Json = False) -> None:
    """List the sampler names --scheduler takes (sdcli's, AUTOMATIC1111's, ComfyUI's) and --sigmas' spacings."""
    from sdcli.schedule.samplers import describe, describe_sigmas

    rows, spacings = describe(), describe_sigmas()
    if json:
        print(jsonlib.dumps({"samplers": rows, "sigmas": spacings}, indent=2, ensure_ascii=False))
        return
    table = [("name", "AUTOMATIC1111", "ComfyUI", "diffusers class", "")] + [
        (r["name"], r["a1111"], (r["comfyui"] or ["-"])[0], r["class"], r["description"]) for r in rows]
    _print(table)
    print()
    _print([("--sigmas", "AUTOMATIC1111", "ComfyUI", "diffusers", "")] + [
        (r["sigmas"], r["a1111"], r["comfyui"] or "-",
         f"timestep_spacing={r['timestep_spacing']}" if r["timestep_spacing"] else
         ("the sampler's own" if r["sigmas"] == "default" else f"use_{r['sigmas']}_sigmas"), "")
        for r in spacings])


def _print(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)).rstrip())
