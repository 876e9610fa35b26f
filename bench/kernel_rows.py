"""Rows for editrt's Triton kernels, taken from `bench/kernel_cases.py`.

`kernel_cases.py` is written beside the kernels. It provides, per kernel, a function returning a
list of specs: dicts with `name`, `shape`, `kernel` (a no-argument callable running the kernel on
inputs it built), `baseline` (the same for the peer) and optionally `flops` / `bytes` per call and
`dtype`. Each spec becomes one case with two rows: the peer (baseline) and `torch+kernels`.

| function | component prefix | peer backend (baseline) |
| --- | --- | --- |
| `dual_attention_cases(device, dtype, quick)` | `dual-attention` | `sdpa`: two scaled_dot_product_attention calls, concatenated, then the same stacked output GEMM |
| `slic_assign_cases(device, quick)` | `slic-assign` | `reference`: `assign_reference` |

The kernels' inputs are fixed inside each spec, so these rows do not rotate inputs. Whether the
`torch+kernels` row is measured is decided by what launched (bench/suite.py): where the kernel path
falls back to the PyTorch reference (a CPU) or runs in Triton's CPU interpreter, the row is skipped.
"""
from __future__ import annotations

import torch

from editrt.bench.cases import BenchContext, Case, Run, dtype_name
from editrt.bench.report import slug

# (function in kernel_cases, component prefix, peer backend, whether it takes a dtype)
FAMILIES = (
    ("dual_attention_cases", "dual-attention", "sdpa", True),
    ("slic_assign_cases", "slic-assign", "reference", False),
)


def _check_output(what: str):
    def check(out) -> None:
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                raise AssertionError(f"{what}: output holds non-finite values")
    return check


def _case_from_spec(spec: dict, prefix: str, peer: str, default_dtype: str) -> Case:
    name = slug(spec["name"])
    component = name if name.startswith(prefix) else f"{prefix}-{name}"
    dtype = spec.get("dtype", default_dtype)
    dtype = dtype_name(dtype) if isinstance(dtype, torch.dtype) else str(dtype)

    def runner(fn, what):
        def build():
            return Run(lambda _: fn(), [None], dtype, _check_output(what), flops=spec.get("flops"),
                       bytes=spec.get("bytes"))
        return build

    return Case(component, str(spec["shape"]),
                {peer: runner(spec["baseline"], f"{component} {peer}"),
                 "torch+kernels": runner(spec["kernel"], f"{component} kernel")},
                baseline=peer, about=f"Triton kernel vs {peer}")


def kernel_cases(ctx: BenchContext) -> list[Case]:
    from editrt.bench import kernel_cases as specs

    cases = []
    for function, prefix, peer, takes_dtype in FAMILIES:
        make = getattr(specs, function)
        if not ctx.selection.may_want_family(prefix):
            continue  # building the specs allocates their inputs: only when asked for
        device = str(ctx.device)
        found = make(device, ctx.dtype, ctx.quick) if takes_dtype else make(device, ctx.quick)
        default_dtype = dtype_name(ctx.dtype) if takes_dtype else "fp32"
        cases += [_case_from_spec(spec, prefix, peer, default_dtype) for spec in found]
    return cases
