"""The one place for names every layer above the kernels shares: dtypes and devices.

    resolve_dtype("fp16") -> torch.float16      (also "float16", "half", or a torch.dtype)
    dtype_name(torch.bfloat16) -> "bf16"
    resolve_device("cuda:1") -> torch.device    (a clear error when CUDA is absent)
    default_dtype(device) -> "fp16" on CUDA, "fp32" elsewhere
"""
from __future__ import annotations

import torch

from editrt.errors import InputError
from editrt.models.dtype_names import DTYPE_ALIASES, DTYPE_NAMES

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16), strict=True))
DTYPE_CHOICES = tuple(DTYPES) + tuple(DTYPE_ALIASES)
_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_dtype(dtype, name: str = "dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _NAMES:
            raise InputError(f"{name}: expected one of {', '.join(DTYPES)}, got {dtype}", field=name)
        return dtype
    key = DTYPE_ALIASES.get(dtype, dtype)
    if key not in DTYPES:
        raise InputError(f"{name}: expected one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}", field=name)
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return _NAMES.get(dtype, str(dtype).replace("torch.", ""))


def resolve_device(device, name: str = "device") -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"{name}: expected cpu, cuda or cuda:N, got {device!r}", field=name) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{name} {device}: CUDA is not available on this machine", field=name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"{name} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)", field=name)
    elif device.type != "cpu":
        raise InputError(f"{name}: expected cpu, cuda or cuda:N, got {str(device)!r}", field=name)
    return device


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device) -> str:
    return "fp16" if torch.device(device).type == "cuda" else "fp32"
