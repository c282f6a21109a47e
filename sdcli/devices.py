"""Which device and dtype a run uses: "auto" settled for this machine, and what it cannot do refused in one line."""

from __future__ import annotations

from sdcli.errors import UsageError


def resolve_device(device: str = "auto") -> str:
    import torch

    device = getattr(device, "value", device)
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is available here")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: Apple MPS is not available here")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    dtype = getattr(dtype, "value", dtype)
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype == "float16" and device == "cpu":
        raise UsageError("--dtype float16 is not supported on CPU; use float32 or bfloat16")
    if dtype == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        # Pre-Ampere cards (T4, V100) emulate bfloat16 slowly or not at all.
        raise UsageError(f"--dtype bfloat16: {torch.cuda.get_device_name()} does not support it; use float16 or float32")
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
