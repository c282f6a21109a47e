"""Several processes (GPUs or machines) through accelerate, only when launched that way.

`accelerate launch`/`torchrun` set WORLD_SIZE; a plain run never imports accelerate here.
"""

from __future__ import annotations

import os
from typing import Any


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def requested() -> str | None:
    """The sharding backend accelerate's launcher asked for ("fsdp", "deepspeed"), from its environment."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return None


def shards() -> int:
    """Into how many shards each trained tensor's memory is cut: the number of processes under FSDP2 and under
    DeepSpeed's ZeRO (whose stages 1 and 2 keep whole weights: the estimate then errs low, never refusing a run
    that fits), else 1."""
    backend = requested()
    fsdp2 = backend == "fsdp" and os.environ.get("FSDP_VERSION", "1") == "2"
    return world_size() if fsdp2 or backend == "deepspeed" else 1


def state() -> Any | None:
    """accelerate's PartialState when more than one process runs, else None."""
    if world_size() <= 1:
        return None
    import torch
    from accelerate import PartialState

    # Without a GPU accelerate forms the (gloo) process group only when told it is on the CPU.
    return PartialState(cpu=not torch.cuda.is_available())


def broadcast(value: Any, st: Any | None) -> Any:
    """The main process's ``value`` on every process (e.g. a random seed all must share)."""
    if st is None:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def gather(items: list[Any], st: Any | None) -> list[Any]:
    """Every process's ``items``, concatenated in process order, on every process."""
    if st is None:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


def close(st: Any | None) -> None:
    """Tear the process group down before the interpreter exits: left to exit, gloo's threads were
    sometimes destroyed while joinable ("terminate called without an active exception", SIGABRT)."""
    if st is None:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
