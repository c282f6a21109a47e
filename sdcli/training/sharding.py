"""Training with sharded weights: FSDP2 through accelerate, chosen the way accelerate users choose it.

`accelerate config` (or `accelerate launch --config_file F` with ``distributed_type: FSDP``) sets
``ACCELERATE_USE_FSDP``; sdcli reads the same variables, so there is no sdcli flag for it. Under FSDP2
each process holds a shard of every trained parameter (a DTensor) and of its optimizer state. What sdcli
writes is still one thing, whatever the launch: checkpoints in format 2 (`sdcli.training.checkpoints`) hold
the full tensors, gathered here on every process and written by the main one, and the trained weights are
a plain copy of the denoiser gathered onto the main process and saved in diffusers' layout.

DeepSpeed ZeRO (``distributed_type: DEEPSPEED``) is accelerate's other sharding backend; what differs
there (its config, its partitioned optimizer) is in `sdcli.training.zero`; the checkpoints and the saved
weights are the same files.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

from sdcli.distributed import requested, shards  # noqa: F401 - the backend asked for; callers find them here too
from sdcli.errors import UsageError


def check(cfg: Any) -> None:
    """Refuse, before anything loads, what the requested backend cannot shard."""
    from sdcli.distributed import world_size

    backend = requested()
    if backend is None or (world_size() < 2 and not (backend == "deepspeed" and _gpu(cfg))):
        return  # one process: accelerate shards nothing, whatever its config says (DeepSpeed on a GPU aside)
    if backend == "deepspeed":
        from sdcli.training import zero

        _refuse(cfg, "DeepSpeed (accelerate's distributed_type: DEEPSPEED)", "DeepSpeed trains one model per run")
        zero.plugin(cfg, world_size())  # its config against sdcli's flags, before anything loads
        return
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise UsageError(f"accelerate's config asks for FSDP version {version}; sdcli shards with FSDP2: set "
                         "fsdp_version: 2 in the config (or pass --fsdp_version 2 to accelerate launch)")
    _refuse(cfg, "FSDP (accelerate's distributed_type: FSDP)", "accelerate's FSDP2 shards one model per run")


def _gpu(cfg: Any) -> bool:
    """Whether the run will train on a GPU, where accelerate runs DeepSpeed even in one process."""
    from sdcli.devices import resolve_device

    return (cfg.device if cfg.device != "auto" else resolve_device("auto")) != "cpu"


def _refuse(cfg: Any, backend: str, one_model: str) -> None:
    refused = [
        (cfg.train_text_encoder, "--train-text-encoder",
         f"{one_model}, and this trains the text encoder too"),
        (bool(cfg.quantize), f"--quantize {cfg.quantize}", "a quantized base cannot be sharded; train it on one GPU"),
        (cfg.use_8bit_adam, "--use-8bit-adam", "bitsandbytes' optimizer cannot step sharded parameters"),
        (cfg.compile, "--compile", "accelerate compiles the model as it shards it, which sdcli does not "
                                  "support yet; drop --compile"),
    ]
    for on, flag, why in refused:
        if on:
            raise UsageError(f"{flag} with {backend}: {why}")


def enable_on_cpu(accelerator: Any) -> None:
    """accelerate turns FSDP on for GPUs only; on the CPU (gloo) FSDP2 works too, so the state accelerate
    would have built on a GPU is set here: the plugin it reads from the same variables, and the type."""
    if requested() != "fsdp" or accelerator.num_processes < 2 or accelerator.is_fsdp2:
        return
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)  # as accelerate does on a GPU
    accelerator.state.fsdp_plugin = plugin
    # Each AcceleratorState() accelerate makes later copies PartialState's fields over its own: both say FSDP.
    # (Its collectives treat FSDP as they treat MULTI_CPU; a barrier naming the rank works on gloo as well.)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def local(tensor: Any) -> Any:
    """This process's shard of a sharded tensor; a plain tensor as it is."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _walk(tree: Any, leaf: Callable[[Any], Any]) -> Any:
    if isinstance(tree, dict):
        return {k: _walk(v, leaf) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_walk(v, leaf) for v in tree)
    return leaf(tree)


def gathered(tree: Any, keep: bool = True) -> Any:
    """``tree`` (a state dict, an optimizer's or an EMA's state) with every sharded tensor gathered whole, onto
    the CPU one tensor at a time (a GPU never holds more than one whole tensor), where ``keep`` (the process
    that writes), and None elsewhere. A collective: every process calls it with the same tree, and dicts keep
    their order on each."""

    def leaf(value):
        if not _is_dtensor(value):
            return value
        whole = value.full_tensor()
        return whole.cpu() if keep else None

    return _walk(tree, leaf)


def shard_like(full: Any, like: Any) -> Any:
    """``full`` cut the way ``like`` (a sharded parameter) is cut; every process holds ``full``, so no
    message is sent. A plain ``like`` returns ``full`` as it is. ``full`` may be a checkpoint's tensor not
    read yet (`sdcli.training.lazy.Deferred`): read here, so only the shard outlives this call."""
    from sdcli.training.lazy import Deferred

    if isinstance(full, Deferred):
        full = full.take()
    if not _is_dtensor(like) or not hasattr(full, "shape") or tuple(full.shape) != tuple(like.shape):
        return full
    from torch.distributed.tensor import DTensor, distribute_tensor

    cut = distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    # The shard is a view of the whole tensor: a copy of its own lets the whole one go.
    return DTensor.from_local(cut.to_local().clone(), like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def model_state(model: Any, names: set[str] | None, keep: bool = True) -> dict[str, Any]:
    """The model's state dict (only ``names``, if given), whole on the CPU where ``keep``."""
    state = model.state_dict()
    return gathered({k: v for k, v in state.items() if names is None or k in names}, keep)


def load_model_state(model: Any, full: dict[str, Any], strict: bool) -> None:
    mine = model.state_dict()
    model.load_state_dict({k: shard_like(v, mine.get(k)) for k, v in full.items()}, strict=strict)


def optimizer_params(optimizer: Any) -> list[Any]:
    """The parameters in the order torch's optimizer state dict numbers them."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def shard_optimizer_state(state: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """A whole optimizer state (as `gathered` made it) cut like the parameters each entry belongs to."""
    params = optimizer_params(optimizer)
    per_param = state.get("state", {})
    return {**state, "state": {i: {k: shard_like(v, params[int(i)]) for k, v in entry.items()}
                               for i, entry in per_param.items()}}


def shard_ema_state(state: dict[str, Any], params: list[Any]) -> dict[str, Any]:
    shadow = state.get("shadow_params")
    if shadow is None:
        return state
    return {**state, "shadow_params": [shard_like(s, p) for s, p in zip(shadow, params)]}


@contextlib.contextmanager
def plain_copy(accelerator: Any, model: Any, device: Any = "cpu") -> Iterator[Any]:
    """The model itself when nothing is sharded; under FSDP or ZeRO-3, on the main process a plain copy of
    it on ``device`` with the weights gathered whole, and None on the others. Every process must enter it.
    The copy is built on the meta device and takes the gathered tensors as they are: one set of weights."""
    from sdcli.training import zero

    if not is_sharded(model) and not zero.partitioned(model):  # ZeRO 1 and 2 keep whole weights on every process
        yield model
        return
    import torch
    from accelerate import init_empty_weights
    from torch.distributed.fsdp import FSDPModule

    full = (model_state if is_sharded(model) else zero.model_state)(model, None, keep=accelerator.is_main_process)
    if not accelerator.is_main_process:
        del full
        yield None
        return
    # fully_shard gave the model a class of its own (FSDP<Name>); the copy is of the model's class.
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with init_empty_weights(include_buffers=False):
        copy = cls.from_config(model.config)
        peft = getattr(model, "peft_config", None)
        if peft:
            copy.add_adapter(peft["default"])
    copy.load_state_dict(full, strict=True, assign=True)
    copy.to(device)
    copy.train(model.training)
    for a, b in zip(model.parameters(), copy.parameters()):
        b.requires_grad_(a.requires_grad)
    try:
        yield copy
    finally:
        del copy, full
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@contextlib.contextmanager
def swapped(pipe: Any, name: str, model: Any) -> Iterator[None]:
    """``pipe.<name>`` is ``model`` for the duration (the plain copy, to save or render with)."""
    before = getattr(pipe, name)
    if model is before:
        yield
        return
    setattr(pipe, name, model)
    try:
        yield
    finally:
        setattr(pipe, name, before)
