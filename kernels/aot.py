"""Ahead-of-time compile checks: build a Triton kernel for a GPU architecture with no GPU present.

Used by `editrt doctor --arch sm_90` and its CI test. For one launch (the jitted function, the
exact positional arguments and keyword arguments a launcher passes, with tensors replaced by
`FakeTensor`s that carry only dtype and address alignment) this runs Triton's own binder
(`create_function_from_signature`: the same specialisation of ints == 1, divisibility by 16 and
pointer alignment as a real launch), then `triton.compile(ASTSource(...), target=GPUTarget("cuda",
cc, 32))`: TTIR -> TTGIR -> LLVM -> PTX -> cubin through the bundled ptxas. Nothing is launched.

What it reports per launch:
* registers and spill stores/loads: the bundled ptxas run again on the PTX with `-v` and Triton's
  own flags (-lineinfo, --regAllocOptLevel=2, --fmad=false when fp fusion is off), because
  Triton deletes the ptxas log;
* shared memory: the compiled metadata (`metadata.shared`, the dynamic shared memory a launch asks for);
* blocks per SM: min over the register, shared-memory, thread and block limits of the architecture
  (`ARCHES`), as the CUDA occupancy calculator computes them;
* global memory access widths in the PTX (ld/st.global .v4/.v2/scalar, cp.async), so a test can
  see whether loads vectorise.

Imports nothing of editrt (kernels depend on nothing of ours).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field

import torch


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM resources of one compute capability (CUDA C Programming Guide, "Technical
    Specifications per Compute Capability"; shared memory as the opt-in maximum per block)."""

    name: str
    capability: int
    smem_per_sm: int  # bytes of shared memory per SM (the unified L1/shared carve-out maximum)
    smem_per_block: int  # bytes one block may opt in to (cudaFuncAttributeMaxDynamicSharedMemorySize)
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_blocks_per_sm: int = 32
    max_threads_per_sm: int = 2048
    reserved_smem_per_block: int = 1024  # the runtime reserves 1 KB per resident block (sm_80+)
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256

    def blocks_per_sm(self, registers: int, threads: int, shared: int) -> tuple[int, str]:
        """Resident blocks per SM for a kernel, and which resource limits it."""
        warps = -(-threads // 32)
        regs_per_warp = -(-max(registers, 1) * 32 // self.reg_alloc_unit) * self.reg_alloc_unit
        by_regs = (self.regs_per_sm // regs_per_warp) // warps
        by_smem = self.smem_per_sm // (shared + self.reserved_smem_per_block)
        by_threads = self.max_threads_per_sm // threads
        limits = {"registers": by_regs, "shared memory": by_smem, "threads": by_threads,
                  "blocks": self.max_blocks_per_sm}
        limiter = min(limits, key=limits.get)
        return limits[limiter], limiter


KB = 1024
ARCHES = {
    "sm_80": ArchLimits("sm_80", 80, smem_per_sm=164 * KB, smem_per_block=163 * KB),  # A100
    "sm_89": ArchLimits("sm_89", 89, smem_per_sm=100 * KB, smem_per_block=99 * KB,  # L4, L40, RTX 40
                        max_blocks_per_sm=24, max_threads_per_sm=1536),
    "sm_90": ArchLimits("sm_90", 90, smem_per_sm=228 * KB, smem_per_block=227 * KB),  # H100, H200
}


class FakeTensor:
    """What Triton's binder reads from a tensor argument: its dtype and its address (alignment).

    `address` defaults to 0 (CUDA allocations are 256-byte aligned); views pass their byte offset
    so a misaligned view specialises as it would at launch.
    """

    def __init__(self, dtype: torch.dtype, address: int = 0):
        self.dtype = dtype
        self.address = address

    def data_ptr(self) -> int:
        return self.address

    @classmethod
    def like(cls, t: torch.Tensor) -> FakeTensor:
        """Stand-in for a (meta) tensor view: its dtype and the byte offset of its first element."""
        return cls(t.dtype, t.storage_offset() * t.element_size())


def fake_arguments(args):
    """Replace every torch.Tensor in a launch's positional arguments by a FakeTensor."""
    return [FakeTensor.like(a) if isinstance(a, torch.Tensor) else a for a in args]


@dataclass
class Launch:
    """One launch a launcher can make: the kernel, one config, the shapes that lead to it."""

    kernel: str  # the name the launcher records (editrt.kernels.launches)
    config: str  # e.g. "BLOCK_M=64 BLOCK_N=64 warps=4 stages=3"
    shape: str  # the real shape this launch serves
    fn: object  # the @triton.jit function (JITFunction)
    args: list  # positional arguments, tensors as FakeTensor
    kwargs: dict  # constexprs and compile options (num_warps, num_stages, enable_fp_fusion, ...)
    threads: int = 0


@dataclass
class CompileReport:
    kernel: str
    config: str
    shapes: list[str]
    arch: str
    compiled: bool
    error: str | None = None
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    threads: int | None = None
    blocks_per_sm: int | None = None
    occupancy_limiter: str | None = None
    fits_shared: bool | None = None
    access: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)  # the launch's constexprs and options (JSON-safe ones)

    def as_dict(self) -> dict:
        return asdict(self)


def triton_bin_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _target(limits: ArchLimits):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", limits.capability, 32)


def compile_launch(launch: Launch, limits: ArchLimits):
    """Triton's binder + compile pipeline for `launch` on `limits`' architecture; returns the CompiledKernel."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    jit_fn = launch.fn
    target = _target(limits)
    backend = make_backend(target)
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    return triton.compile(ASTSource(jit_fn, signature, constexprs, attrs), target=target, options=options.__dict__)


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_usage(ptx: str, enable_fp_fusion: bool = True) -> dict:
    """Registers, spills and stack of the PTX's kernel from the bundled ptxas (`-v`, Triton's flags)."""
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory(prefix="editrt-ptxas-") as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [os.path.join(triton_bin_dir(), "ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2",
               *([] if enable_fp_fusion else ["--fmad=false"]), f"--gpu-name={arch}", src,
               "-o", os.path.join(tmp, "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs, spill = _PTXAS_REGS.search(log), _PTXAS_SPILL.search(log)
    return {"registers": int(regs.group(1)), "stack": int(spill.group(1)),
            "spill_stores": int(spill.group(2)), "spill_loads": int(spill.group(3))}


def global_access_widths(ptx: str) -> dict:
    """How the PTX touches global memory: vector widths of loads/stores and async copies."""
    count = lambda pattern: len(re.findall(pattern, ptx))
    return {
        "ld.global.v4": count(r"\bld\.global(?:\.\w+)*\.v4\."),
        "ld.global.v2": count(r"\bld\.global(?:\.\w+)*\.v2\."),
        "ld.global.scalar": count(r"\bld\.global(?:\.(?!v[24]\b)\w+)*\s"),
        "st.global.v4": count(r"\bst\.global(?:\.\w+)*\.v4\."),
        "st.global.v2": count(r"\bst\.global(?:\.\w+)*\.v2\."),
        "st.global.scalar": count(r"\bst\.global(?:\.(?!v[24]\b)\w+)*\s"),
        "cp.async": count(r"\bcp\.async\.(?:ca|cg)\."),
    }


def _compile_key(launch: Launch) -> tuple:
    """Launches that Triton would compile to the same binary (same specialisation and options)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(_target(ARCHES["sm_90"]))
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    _, specialization, options = binder(*launch.args, **launch.kwargs)
    return (launch.kernel, launch.config, repr(specialization), repr(sorted(options.items())))


def check_launches(launches: list[Launch], arch: str, progress=None) -> list[CompileReport]:
    """Compile each distinct launch for `arch`; one report per distinct binary (shapes merged)."""
    limits = ARCHES[arch]
    groups: dict[tuple, list[Launch]] = {}
    for launch in launches:
        groups.setdefault(_compile_key(launch), []).append(launch)
    reports = []
    for same in groups.values():
        launch = same[0]
        report = CompileReport(kernel=launch.kernel, config=launch.config, shapes=[x.shape for x in same],
                               arch=arch, compiled=False, threads=launch.threads,
                               params={k: v for k, v in launch.kwargs.items() if isinstance(v, (int, float, str, bool))})
        if progress:
            progress(f"{arch} {launch.kernel} {launch.config} ({len(same)} shapes)")
        try:
            kernel = compile_launch(launch, limits)
        except Exception as e:  # noqa: BLE001 -- a failed compile is the finding this reports
            lines = [line for line in str(e).strip().splitlines() if line.strip()]
            report.error = f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300]
            reports.append(report)
            continue
        ptx = kernel.asm["ptx"]
        usage = ptxas_usage(ptx, enable_fp_fusion=launch.kwargs.get("enable_fp_fusion", True))
        report.compiled = True
        report.registers = usage["registers"]
        report.spill_stores, report.spill_loads, report.stack = usage["spill_stores"], usage["spill_loads"], usage["stack"]
        report.shared = int(kernel.metadata.shared)
        report.threads = 32 * int(kernel.metadata.num_warps)
        report.fits_shared = report.shared <= limits.smem_per_block
        report.blocks_per_sm, report.occupancy_limiter = limits.blocks_per_sm(report.registers, report.threads,
                                                                              report.shared)
        if not report.fits_shared:
            report.blocks_per_sm, report.occupancy_limiter = 0, "shared memory per block"
        report.access = global_access_widths(ptx)
        reports.append(report)
    return reports


def problems(reports: list[CompileReport]) -> list[str]:
    """What makes a build unacceptable: compile errors, spills, configs that cannot launch."""
    found = []
    for r in reports:
        name = f"{r.arch} {r.kernel} [{r.config}]"
        if not r.compiled:
            found.append(f"{name}: does not compile ({r.error})")
            continue
        if r.spill_stores or r.spill_loads:
            found.append(f"{name}: spills {r.spill_stores} B stores / {r.spill_loads} B loads")
        if not r.fits_shared:
            found.append(f"{name}: needs {r.shared} B shared memory, more than {ARCHES[r.arch].smem_per_block} B per block")
    return found
