"""DeepSpeed ZeRO (stages 1, 2 and 3) through accelerate, written to and resumed from sdcli's own checkpoints.

`accelerate launch --config_file F` with ``distributed_type: DEEPSPEED`` puts the ZeRO settings in each
process's environment (or names a DeepSpeed JSON config); `plugin` reads them as accelerate does and fills
in what sdcli's flags decide where the config says "auto" (the micro-batch, gradient accumulation, clipping
and precision), refusing, in one line, a config that says otherwise. sdcli makes the optimizer and its
schedule, so a config's own is refused, as is what only works with DeepSpeed's own optimizers (offload).

ZeRO keeps the fp32 copy of each trained weight and its Adam moments in flat partitions, one per process
(stage 3 cuts the weights themselves too). A checkpoint still holds what it holds without DeepSpeed: each
trained tensor whole, gathered one at a time and written by the main process, and the optimizer in torch
AdamW's state-dict layout (per parameter ``exp_avg``, ``exp_avg_sq``, ``step``). On resume each process cuts
the whole tensors back into its partitions, the fp32 copy and the weights it trains with alike, so the run
continues bit for bit. Precision: the weights stay float32 and --mixed-precision bf16 runs the forward
under autocast (DeepSpeed's ``torch_autocast``), as it does without DeepSpeed.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from sdcli.errors import UsageError

NAME = "DeepSpeed (accelerate's distributed_type: DEEPSPEED)"
# "auto" keys DeepSpeed can size itself (accelerate would derive them from a `hidden_size` diffusers' models
# do not have): left to DeepSpeed's defaults.
DEEPSPEED_DEFAULTS = ("zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
                      "zero_optimization.stage3_param_persistence_threshold")


def available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def plugin(cfg: Any, world: int) -> Any:
    """accelerate's DeepSpeedPlugin for this launch, with sdcli's values where its config says "auto"; a
    config that disagrees with sdcli's flags, or asks for what sdcli cannot checkpoint, is refused here."""
    if not available():
        raise UsageError(f"accelerate's config asks for {NAME}, which is not installed: "
                         "pip install 'sdcli[deepspeed]' (or pip install deepspeed)")
    from accelerate.utils import DeepSpeedPlugin

    source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    where = f"DeepSpeed config {source}" if source != "none" else "accelerate's deepspeed_config"
    try:
        made = DeepSpeedPlugin()
    except (OSError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"{where}: {first}") from None
    made.zero3_init_flag = False  # diffusers' models load whole; ZeRO-3 partitions them when prepared
    ds = made.deepspeed_config
    stage = made.get_value("zero_optimization.stage", 0)
    if stage not in (1, 2, 3):
        raise UsageError(f"{where}: zero_optimization.stage {stage}; sdcli trains with ZeRO stage 1, 2 or 3 "
                         "(without sharding, launch plain data parallel: distributed_type: MULTI_GPU)")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise UsageError(f"{where} has {'an' if section == 'optimizer' else 'a'} {section} section; sdcli makes "
                             "its own (from --lr, --weight-decay, --lr-scheduler): remove it from the config")
    for part in ("offload_optimizer", "offload_param"):
        device = made.get_value(f"zero_optimization.{part}.device", "none")
        if device not in (None, "none"):
            raise UsageError(f"{where}: zero_optimization.{part}.device {device}; sdcli does not offload yet "
                             "(DeepSpeed's offload needs its own compiled optimizer): set it to none")
    for half in ("fp16", "bf16"):
        if str(made.get_value(f"{half}.enabled", False)).lower() == "true":
            raise UsageError(f"{where} enables {half}, which keeps the trained weights in half precision; sdcli "
                             f"keeps them in float32 and mixes precision by autocast: remove {half}.enabled and "
                             "pass --mixed-precision bf16")
    if cfg.mixed_precision == "fp16":
        raise UsageError(f"--mixed-precision fp16 with {NAME}: without its loss scaling float16 gradients "
                         "underflow; use --mixed-precision bf16")
    ours = {
        "train_micro_batch_size_per_gpu": (cfg.batch_size, "--batch-size"),
        "gradient_accumulation_steps": (cfg.gradient_accumulation, "--gradient-accumulation"),
        "train_batch_size": (cfg.batch_size * cfg.gradient_accumulation * world,
                             "--batch-size × --gradient-accumulation × processes"),
        "gradient_clipping": (float(cfg.max_grad_norm), "--max-grad-norm"),
    }
    for key, (value, flag) in ours.items():
        theirs = made.get_value(key)
        if theirs not in (None, "auto") and float(theirs) != float(value):
            raise UsageError(f"{where} sets {key}: {theirs}, but {flag} is {value:g}: set it to auto (sdcli fills "
                             f"in its own) or to {value:g}")
        ds[key] = value
    for key in DEEPSPEED_DEFAULTS:
        node, leaf = made.hf_ds_config.find_config_node(key)
        if node is not None and node.get(leaf) == "auto":
            del node[leaf]
    # Checkpoints are sdcli's: the weights are gathered whole by `model_state`, never by DeepSpeed's own saving.
    node, leaf = made.hf_ds_config.find_config_node("zero_optimization.stage3_gather_16bit_weights_on_model_save")
    if node is not None and node.get(leaf) == "auto":
        node[leaf] = False
    left = _autos(ds)
    if left:
        raise UsageError(f"{where}: {left[0]} is auto, which sdcli has no value for: set it")
    return made


def _autos(tree: dict[str, Any], prefix: str = "") -> list[str]:
    found = []
    for key, value in tree.items():
        if isinstance(value, dict):
            found += _autos(value, f"{prefix}{key}.")
        elif value == "auto" and f"{prefix}{key}" not in ("fp16.enabled", "bf16.enabled"):
            found.append(f"{prefix}{key}")
    return found


def set_precision(made: Any, mixed_precision: str) -> None:
    """--mixed-precision as DeepSpeed's torch autocast: float32 weights, the forward in bf16 (as accelerate's own
    autocast does without DeepSpeed). accelerate's half-precision sections are off."""
    made.set_mixed_precision("no")
    if mixed_precision == "bf16":
        made.deepspeed_config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}


def enable_on_cpu(accelerator: Any, made: Any) -> None:
    """accelerate turns DeepSpeed on for GPUs only; DeepSpeed's CPU accelerator runs ZeRO over gloo as well, so
    the state accelerate would have built on a GPU is set here (as `sharding.enable_on_cpu` does for FSDP)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    made.select(_from_accelerator_state=True)
    accelerator.state.deepspeed_plugins = made
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    accelerator.state.distributed_type = DistributedType.DEEPSPEED
    accelerator.deepspeed_engine_wrapped = None
    init_comm()


def loads_whole(made: Any) -> None:
    """accelerate tells transformers that ZeRO-3 is on, so that its models load already partitioned; sdcli loads
    the pipeline whole (the frozen text encoders too) and ZeRO-3 cuts only what it prepares."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    made.dschf = None


def quiet(cpu: bool) -> None:
    """DeepSpeed logs to stdout, where sdcli writes only its results: to stderr, warnings and worse only. Installed,
    it is imported by any training run (accelerate's unwrap_model looks for its engine), so this runs for all of
    them; on the CPU it is told so, or it warns that it found no GPU."""
    import contextlib
    import logging
    import sys

    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            from deepspeed.utils import logger
    except Exception:  # noqa: BLE001 - a broken install fails where DeepSpeed is asked for, not every run
        return
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.__stdout__):
            handler.setStream(sys.stderr)
    logger.setLevel(logging.WARNING)


def init_comm() -> None:
    """DeepSpeed's collectives over the process group accelerate made (gloo on the CPU). Its CPU backend would
    first compile a shared-memory op with the C++ compiler (a minute, once per machine) that only its inference
    all-reduce uses: marked unavailable, so training needs no compiler and starts at once."""
    import contextlib
    import sys

    import deepspeed.comm
    import deepspeed.ops

    # DeepSpeed probes which ops compile on first access and keeps the dict it made; one set here is kept instead.
    ops = vars(deepspeed.ops).setdefault("__compatible_ops__", {})
    ops["deepspeed_shm_comm"] = False
    with contextlib.redirect_stdout(sys.stderr):
        deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def is_engine(model: Any) -> bool:
    """Whether ``model`` is what accelerate's prepare made of a model under DeepSpeed."""
    return type(model).__name__ == "DeepSpeedEngine"


def partitioned(model: Any) -> bool:
    """Whether ZeRO-3 has cut the weights of ``model`` (the module, past the engine)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _cut(p: Any) -> bool:
    """A ZeRO-3 parameter that holds only its partition (small ones are kept whole: ``ds_persist``)."""
    return hasattr(p, "ds_id") and not getattr(p, "ds_persist", False)


def _whole(p: Any, keep: bool) -> Any:
    """The weight ``p`` whole, on the CPU where ``keep``; a collective for a cut ZeRO-3 parameter."""
    if not _cut(p):
        return p.detach().cpu().clone() if keep else None
    return _gather(p.ds_tensor, p, keep)


def _gather(part: Any, p: Any, keep: bool) -> Any:
    """A ZeRO-3 partition of ``p`` (its weight, EMA or Adam moment) gathered from every process into the shape
    of ``p``: the partitions are consecutive slices of the flattened tensor, the last one padded."""
    import torch
    import torch.distributed as dist

    group = getattr(p, "ds_process_group", None)
    part = part.detach().flatten()
    chunks = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
    dist.all_gather(chunks, part, group=group)
    return torch.cat(chunks)[: p.ds_numel].view(p.ds_shape).cpu() if keep else None


def _partition(full: Any, p: Any) -> Any:
    """This process's slice of ``full`` (a whole tensor shaped like ``p``), padded as ZeRO-3 pads the last."""
    import torch
    import torch.distributed as dist

    size = p.ds_tensor.numel()
    start = dist.get_rank(getattr(p, "ds_process_group", None)) * size
    flat = full.detach().flatten()
    piece = flat[start:start + size]
    if piece.numel() < size:
        piece = torch.cat([piece, flat.new_zeros(size - piece.numel())])
    return piece


def trained(models: list[Any]) -> list[Any]:
    """The trained parameters in the order the optimizer was given them."""
    return [p for model in models for p in model.parameters() if p.requires_grad]


def local_views(params: list[Any]) -> list[Any]:
    """What EMA, the weights' norm and validation's weight swap work on: under ZeRO-3 each cut parameter's own
    partition (a parameter sharing its storage, so the EMA's copy goes into the weights the next forward
    gathers); the parameters themselves otherwise."""
    import torch

    return [torch.nn.Parameter(p.ds_tensor, requires_grad=True) if _cut(p) else p for p in params]


# ---------------------------------------------------------------- checkpoints


def model_state(model: Any, names: set[str] | None, keep: bool) -> dict[str, Any]:
    """The module's weights (only ``names``, if given) whole on the CPU where ``keep``; every process calls it."""
    params = dict(model.named_parameters())
    state = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if names is not None and key not in names:
            continue
        whole = _whole(params[key], keep) if key in params else (value.detach().cpu().clone() if keep else None)
        if keep:
            state[key] = whole
    return state


def load_model_state(model: Any, full: Any, strict: bool) -> None:
    """Whole tensors (a checkpoint's) into the weights and, for the trained ones, ZeRO's fp32 copy of them."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    params = dict(model.named_parameters())
    mine = model.state_dict(keep_vars=True)
    if strict and set(full.keys()) != set(mine.keys()):
        missing = sorted(set(mine) - set(full)) or sorted(set(full) - set(mine))
        raise KeyError(f"{missing[0]} does not match the model")
    for key in full.keys():
        if key not in mine:
            raise KeyError(f"unexpected {key}")
        value = full[key]
        p = params.get(key)
        if p is None:  # a buffer
            mine[key].data.copy_(value)
            continue
        if _cut(p) or hasattr(p, "ds_id"):
            piece = _partition(value, p)
            p.ds_tensor.data.copy_(piece)
            if not _cut(p):
                p.data.copy_(value)
            if p.requires_grad:
                safe_set_local_fp32_param(p, piece)
        else:
            p.data.copy_(value)
            if p.requires_grad:
                safe_set_full_fp32_param(p, value.to(p.device))


def _zero_optimizer(optimizer: Any) -> Any:
    """ZeRO's optimizer, past accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _flat_partitions(zero: Any) -> list[Any]:
    """The fp32 flat partitions the inner torch optimizer steps (its state is keyed by them)."""
    return list(getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups)


def optimizer_state(optimizer: Any, params: list[Any], keep: bool) -> dict[str, Any] | None:
    """The optimizer's state as torch AdamW's ``state_dict()`` would give it for ``params``, every tensor whole
    on the CPU where ``keep`` (None elsewhere); every process calls it."""
    from deepspeed.utils import safe_get_full_optimizer_state, safe_get_local_optimizer_state

    zero = _zero_optimizer(optimizer)
    inner = zero.optimizer
    flats = [inner.state[f] for f in _flat_partitions(zero) if f in inner.state]
    keys = sorted(k for k in (flats[0] if flats else {}) if k != "step")
    per_param = {}
    for i, p in enumerate(params):
        entry = {"step": flats[0]["step"].detach().cpu().clone()} if flats else {}
        for key in keys:
            if hasattr(p, "ds_id"):
                whole = _gather(safe_get_local_optimizer_state(p, key), p, keep)
            else:
                whole = safe_get_full_optimizer_state(p, key)
                whole = whole.detach().cpu().clone() if keep else None
            entry[key] = whole
        if flats:
            per_param[i] = entry
    if not keep:
        return None
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
    first = groups[0] if groups else {}
    return {"state": per_param, "param_groups": [{**first, "params": list(range(len(params)))}]}


def load_optimizer_state(optimizer: Any, params: list[Any], state: dict[str, Any]) -> None:
    """A torch AdamW state dict (whole tensors, as `optimizer_state` wrote) cut into ZeRO's partitions."""
    import torch
    from deepspeed.utils import safe_set_full_optimizer_state, safe_set_local_optimizer_state

    zero = _zero_optimizer(optimizer)
    inner = zero.optimizer
    saved_groups = state.get("param_groups") or [{}]
    for group in inner.param_groups:
        group.update({k: v for k, v in saved_groups[0].items() if k != "params"})
    per_param = state.get("state", {})
    if not per_param:
        return
    if len(per_param) != len(params):
        raise ValueError(f"optimizer state for {len(per_param)} parameters, {len(params)} trained")
    first = next(iter(per_param.values()))
    keys = [k for k in first if k != "step"]
    # A fresh ZeRO optimizer makes its state at its first step: made here (as torch AdamW makes it), to fill.
    for flat in _flat_partitions(zero):
        entry = inner.state[flat]
        entry["step"] = torch.as_tensor(first["step"]).detach().clone().to(torch.float32)
        for key in keys:
            if key not in entry:
                entry[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    if hasattr(zero, "_hp_optimizer_states_linked"):  # ZeRO 1/2: point each weight's fragment at that state
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    for i, p in enumerate(params):
        entry = per_param[i] if i in per_param else per_param[str(i)]
        for key in keys:
            value = torch.as_tensor(entry[key])
            if hasattr(p, "ds_id"):
                safe_set_local_optimizer_state(p, _partition(value, p), key)
            else:
                safe_set_full_optimizer_state(p, value.to(p.device), key)


def ema_state(ema: Any, params: list[Any], keep: bool) -> dict[str, Any] | None:
    """The EMA's state with each average whole (ZeRO-3 keeps only this process's partition of a cut one)."""
    state = ema.state_dict()
    shadow = [_gather(s, p, keep) if _cut(p) else (s.detach().cpu().clone() if keep else None)
              for s, p in zip(state["shadow_params"], params)]
    return {**state, "shadow_params": shadow} if keep else None


def shard_ema_state(state: dict[str, Any], params: list[Any]) -> dict[str, Any]:
    shadow = state.get("shadow_params")
    if shadow is None:
        return state
    from sdcli.training.lazy import taken

    shadow = [taken(s) for s in shadow]
    return {**state, "shadow_params": [_partition(s, p) if _cut(p) else s for s, p in zip(shadow, params)]}
