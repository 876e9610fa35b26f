"""Small helpers shared by the Triton kernel files: when to launch Triton, and the off switch.

Dispatch rule (the same for every kernel in this package):

* ``EDITRT_DISABLE_TRITON=1`` (read at call time) -> always the pure-PyTorch reference;
* CUDA tensors (and not running under the interpreter) -> the compiled Triton kernel;
* ``TRITON_INTERPRET=1`` and CPU tensors -> the Triton kernel through Triton's CPU interpreter
  (this is how the kernels are tested on machines without a GPU);
* anything else -> the reference.

CUDA tensors under ``TRITON_INTERPRET=1`` go to the reference: the interpreter runs kernels with
NumPy on the host, and kernels that reproduce device-specific arithmetic (``slic.assign``) select
their arithmetic by the tensor's device.
"""

from __future__ import annotations

import os

import torch

DISABLE_ENV_VAR = "EDITRT_DISABLE_TRITON"


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (must be set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_disabled() -> bool:
    """True when the user switched the Triton kernels off with EDITRT_DISABLE_TRITON=1."""
    return os.environ.get(DISABLE_ENV_VAR, "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernel (compiled or interpreted) should handle these tensors."""
    if triton_disabled():
        return False
    device_types = {t.device.type for t in tensors}
    if interpreter_active():
        return device_types == {"cpu"}
    return device_types == {"cuda"}


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def shape_str(t: torch.Tensor) -> str:
    """A tensor's shape as the kernels' error messages print it: [2, 8, 4096, 40]."""
    return "[" + ", ".join(str(s) for s in t.shape) + "]"
