"""`sdcli schedulers`: the sampler names `--scheduler` accepts."""

from __future__ import annotations

import json as jsonlib

from sdcli.options import Json


def schedulers_cmd(json: Json = False) -> None:
    """List the samplers --scheduler accepts, with their diffusers class."""
    from sdcli.schedule.samplers import describe

    rows = describe()
    if json:
        print(jsonlib.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    cwidth = max(len(r["class"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['class']:<{cwidth}}  {r['description']}")
