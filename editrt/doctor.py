"""`editrt doctor`: what the runtime sees on this machine, and an ahead-of-time build of the kernels.

    editrt doctor                      versions, GPU, ONNX Runtime providers, native ops, kernel dispatch
    editrt doctor --arch sm_90         compile every kernel config the launchers can pick, for Hopper,
                                       at the editors' real shapes, with no GPU: registers, shared
                                       memory, spills, blocks per SM, load widths (editrt.kernels.aot)
    editrt doctor ... --json F         the same as JSON (written atomically)

Exit codes: 0 fine; 1 the --arch build has problems (a compile error, a spill, a config whose
shared memory exceeds the architecture's per-block limit); 2 bad input.

The launches come from the launchers' own argument builders and config lists
(`dual_attention.aot_launches`, `slic.aot_assign_launches`, `slic.aot_stats_launches`), and the
attention operands are built by the fused processor's own head-split functions
(models/attention.py) on meta tensors, so the doctor compiles exactly what a run would.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from editrt.errors import InputError

# SD-1.5 element decoder (paper 001): 8 heads at widths 320 / 640 / 1280 -> D = 40 / 80 / 160,
# at the query lengths of a 512 x 512 image's 64 x 64 latent and its down-sampled levels;
# 77 text tokens and 256 element tokens; batch 2 under classifier-free guidance.
ATTENTION_SHAPES = [(4096, 40), (1024, 80), (256, 160), (64, 160)]
ATTENTION_HEADS, ATTENTION_BATCH, TEXT_TOKENS, ELEMENT_TOKENS = 8, 2, 77, 256
# SLIC partition (paper 001, Sec. 3): a 16 x 16 grid of SAM queries, 256 x 256 low-res mask logits
# (fp32: SAM runs in fp32), labels at 512 x 512.
SLIC_ELEMENTS, SLIC_LOGITS_HW, SLIC_LABELS_HW = 256, (256, 256), (512, 512)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", metavar="SM", help="compile the kernels ahead of time for sm_80, sm_89 or sm_90")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")


def _check_arch(arch: str) -> str:
    from editrt.kernels.aot import ARCHES

    if arch not in ARCHES:
        raise InputError(f"--arch: expected one of {', '.join(sorted(ARCHES))}, got {arch!r}")
    return arch


# --------------------------------------------------------------------------------------------
# What the runtime sees
# --------------------------------------------------------------------------------------------


def _version(module_name: str) -> str | None:
    try:
        return getattr(importlib.import_module(module_name), "__version__", "unknown")
    except ImportError:
        return None


def _native_ops() -> dict:
    try:
        cleanup = importlib.import_module("editrt.kernels.cleanup")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("editrt"):
            return {"status": "not built", "cpu": False, "cuda": False, "error": None}
        raise
    status = dict(cleanup.native_status())
    status["status"] = "loaded" if status.get("cpu") or status.get("cuda") else "not loaded"
    return status


def environment() -> dict:
    """Versions, GPU and backends as this process sees them."""
    import torch

    from editrt.kernels import autotune_cache
    from editrt.kernels._triton_utils import interpreter_active, triton_disabled

    info: dict = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                  "cuda_available": torch.cuda.is_available(), "gpus": []}
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    for i in range(torch.cuda.device_count() if info["cuda_available"] else 0):
        props = torch.cuda.get_device_properties(i)
        info["gpus"].append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                             "memory_gib": round(props.total_memory / 2**30, 1),
                             "smem_per_block_optin": getattr(props, "shared_memory_per_block_optin", None)})
    info["triton"] = _version("triton")
    info["triton_dispatch"] = ("disabled (EDITRT_DISABLE_TRITON=1)" if triton_disabled() else
                               "interpreter (TRITON_INTERPRET=1)" if interpreter_active() else
                               "compiled on CUDA tensors" if info["cuda_available"] else "reference (no CUDA)")
    try:
        from editrt.kernels.aot import triton_bin_dir

        out = subprocess.run([os.path.join(triton_bin_dir(), "ptxas"), "--version"], capture_output=True, text=True)
        release = [line for line in out.stdout.splitlines() if "release" in line]
        info["ptxas"] = release[0].split(",", 1)[-1].strip() if out.returncode == 0 and release else None
    except OSError:
        info["ptxas"] = None
    try:
        import onnxruntime

        info["onnxruntime"] = {"version": onnxruntime.__version__, "providers": onnxruntime.get_available_providers()}
    except ImportError:
        info["onnxruntime"] = None
    info["tensorrt"] = _version("tensorrt")
    info["native_ops"] = _native_ops()
    info["autotune_cache"] = str(autotune_cache.cache_root() / "autotune")
    return info


def format_environment(info: dict) -> str:
    ort = info["onnxruntime"]
    native = info["native_ops"]
    lines = [
        f"python        {info['python']}",
        f"torch         {info['torch']} (CUDA {info['torch_cuda'] or 'none'}, cuDNN {info['cudnn'] or 'none'})",
        f"CUDA          {'available' if info['cuda_available'] else 'not available'}",
    ]
    for gpu in info["gpus"]:
        lines.append(f"GPU {gpu['index']}         {gpu['name']} (compute capability {gpu['capability']}, "
                     f"{gpu['memory_gib']} GiB)")
    lines += [
        f"triton        {info['triton'] or 'not installed'} (ptxas: {info['ptxas'] or 'not found'})",
        f"kernels       {info['triton_dispatch']}",
        f"onnxruntime   {ort['version'] + ' providers: ' + ', '.join(ort['providers']) if ort else 'not installed'}",
        f"tensorrt      {info['tensorrt'] or 'not installed'}",
        f"native ops    {native['status']}" + (f" (cpu: {native['cpu']}, cuda: {native['cuda']})"
                                               if native["status"] != "not built" else "")
        + (f"; error: {native['error']}" if native.get("error") else ""),
        f"autotune      {info['autotune_cache']}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Ahead-of-time build
# --------------------------------------------------------------------------------------------


def kernel_launches(arch: str) -> list:
    """Every (kernel, config, shape) the launchers can pick on `arch` at the editors' real shapes."""
    import torch

    from editrt.kernels import dual_attention, slic
    from editrt.kernels.aot import ARCHES
    from editrt.models.attention import split_dual_query_heads, split_heads

    limits = ARCHES[arch]
    launches = []
    B, H = ATTENTION_BATCH, ATTENTION_HEADS
    for M, D in ATTENTION_SHAPES:
        for dtype in (torch.float16, torch.bfloat16):
            inner = H * D
            meta = dict(device="meta", dtype=dtype)
            q_a, q_b = split_dual_query_heads(torch.empty(B, M, 2 * inner, **meta), H)
            k_a, v_a = (split_heads(torch.empty(B, TEXT_TOKENS, inner, **meta), H) for _ in range(2))
            k_b, v_b = (split_heads(torch.empty(B, ELEMENT_TOKENS, inner, **meta), H) for _ in range(2))
            out = torch.empty(B, M, 2 * inner, **meta)
            shape = f"B={B} H={H} M={M} D={D} N_a={TEXT_TOKENS} N_b={ELEMENT_TOKENS}"
            launches += dual_attention.aot_launches(q_a, k_a, v_a, q_b, k_b, v_b, out, limits.smem_per_block, shape)
    N, (h, w), (Hl, Wl) = SLIC_ELEMENTS, SLIC_LOGITS_HW, SLIC_LABELS_HW
    launches += slic.aot_assign_launches(N, h, w, Hl, Wl, torch.float32, f"N={N} {h}x{w} -> {Hl}x{Wl}")
    launches += slic.aot_stats_launches(N, Hl, Wl, f"N={N} labels {Hl}x{Wl}")
    return launches


def attention_notes() -> list[str]:
    from editrt.kernels.dual_attention import head_dim_chunks, padded_mma_fraction

    notes = []
    for D in sorted({d for _, d in ATTENTION_SHAPES}):
        d0, d1 = head_dim_chunks(D)
        notes.append(f"dual_attention D={D}: dots on {d0}+{d1} columns, MMA work on padding "
                     f"{100 * padded_mma_fraction(D):.1f}% (one power-of-two block: {100 * (1 - D / (1 << (D - 1).bit_length())):.1f}%)")
    notes.append("dual_attention fp32 on CUDA: runs the SDPA pair, not Triton (nothing to compile)")
    return notes


def build_report(arch: str) -> dict:
    """Compile everything for `arch` in this process (needs Triton without its interpreter)."""
    from editrt.kernels import aot

    reports = aot.check_launches(kernel_launches(arch), arch,
                                 progress=lambda s: print(f"compiling {s}", file=sys.stderr, flush=True))
    return {"arch": arch, "limits": aot.ARCHES[arch].__dict__, "kernels": [r.as_dict() for r in reports],
            "problems": aot.problems(reports), "notes": attention_notes()}


def _build_report_in_subprocess(arch: str) -> dict:
    """The kernels were imported under TRITON_INTERPRET=1 (interpreted functions, interpreter
    configs): compile in a fresh interpreter-free process instead."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="editrt-doctor-") as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "editrt.doctor", "--arch", arch, "--json", str(out), "--quiet"]
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL)
        if not out.is_file():
            raise RuntimeError(f"the doctor's compile process failed (exit {done.returncode})")
        return json.loads(out.read_text())


def arch_report(arch: str) -> dict:
    from editrt.kernels._triton_utils import interpreter_active

    return _build_report_in_subprocess(arch) if interpreter_active() else build_report(arch)


def format_arch_report(report: dict) -> str:
    limits = report["limits"]
    head = (f"{report['arch']}: {limits['smem_per_block'] // 1024} KB shared memory per block, "
            f"{limits['smem_per_sm'] // 1024} KB per SM, {limits['regs_per_sm']} registers, "
            f"{limits['max_threads_per_sm']} threads, {limits['max_blocks_per_sm']} blocks per SM")
    rows = [("kernel", "config", "shapes", "regs", "spill", "smem KB", "blocks/SM", "limit", "ld.v4/scalar", "cp.async")]
    for k in report["kernels"]:
        if not k["compiled"]:
            rows.append((k["kernel"], k["config"], str(len(k["shapes"])), "ERROR", k["error"] or "", "", "", "", "", ""))
            continue
        a = k["access"]
        rows.append((k["kernel"], k["config"], str(len(k["shapes"])), str(k["registers"]),
                     f"{k['spill_stores']}/{k['spill_loads']}", f"{k['shared'] / 1024:.1f}", str(k["blocks_per_sm"]),
                     k["occupancy_limiter"], f"{a['ld.global.v4']}/{a['ld.global.scalar']}", str(a["cp.async"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    verdict = ["no problems: every config compiles, none spills, all fit shared memory"] if not report["problems"] \
        else [f"PROBLEM {p}" for p in report["problems"]]
    return "\n".join([head, *table, *report["notes"], *verdict])


def _write_json(path: str, data: dict) -> None:
    from editrt.models.files import write_atomic

    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"))


def run(args: argparse.Namespace) -> int:
    if args.arch is None:
        info = environment()
        if not getattr(args, "quiet", False):
            print(format_environment(info))
        if args.json:
            _write_json(args.json, {"environment": info})
        return 0
    report = arch_report(_check_arch(args.arch))
    if not getattr(args, "quiet", False):
        print(format_arch_report(report))
    if args.json:
        _write_json(args.json, {"environment": environment(), "build": report})
    return 1 if report["problems"] else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m editrt.doctor` (the compile subprocess; `editrt doctor` is the public entry)."""
    parser = argparse.ArgumentParser(prog="editrt doctor")
    configure_parser(parser)
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quiet and args.arch:  # the subprocess: only the build, as JSON
        report = build_report(_check_arch(args.arch))
        _write_json(args.json, report)
        return 1 if report["problems"] else 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
