"""`editrt doctor`: the environment report, and the ahead-of-time Hopper/Ampere build as a CI gate.

The build runs for real (Triton's binder and compile pipeline, the bundled ptxas) with no GPU, in
subprocesses without TRITON_INTERPRET (the suite's conftest turns the interpreter on), sm_90 and
sm_80 in parallel. It fails on any compile error, any spill, or any config whose shared memory
exceeds the architecture's per-block limit, and checks what compiling found in issue 11: the
D = 40 loads and stores vectorise and pipeline (no scalar global access, cp.async present),
and the shared-memory estimate the launcher prunes with is an upper bound of the compiled size.
"""
import argparse
import json
import os
import subprocess
import sys

import pytest

from editrt import doctor
from editrt.errors import InputError
from editrt.kernels import aot, slic
from editrt.kernels import dual_attention as da

CI_ARCHES = ("sm_90", "sm_80")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """{arch: (exit code, JSON report)} of `python -m editrt.doctor --arch ARCH --json F`."""
    tmp = tmp_path_factory.mktemp("doctor")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = {}
    for arch in CI_ARCHES:
        out = tmp / f"{arch}.json"
        proc = subprocess.Popen([sys.executable, "-m", "editrt.doctor", "--arch", arch, "--json", str(out)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs[arch] = (proc, out)
    results = {}
    for arch, (proc, out) in runs.items():
        stdout, stderr = proc.communicate(timeout=900)
        assert out.is_file(), f"{arch}: no report written; stderr:\n{stderr[-3000:]}"
        results[arch] = (proc.returncode, json.loads(out.read_text()), stdout)
    return results


@pytest.mark.parametrize("arch", CI_ARCHES)
def test_every_config_compiles_without_spills_and_fits(builds, arch):
    code, report, stdout = builds[arch]
    build = report["build"]
    assert build["problems"] == [], "\n".join(build["problems"])
    assert code == 0
    limit = aot.ARCHES[arch].smem_per_block
    for k in build["kernels"]:
        assert k["compiled"] and k["spill_stores"] == 0 and k["spill_loads"] == 0, k
        assert k["shared"] <= limit and k["blocks_per_sm"] >= 1, k
    assert "no problems" in stdout and "dual_attention" in stdout  # the printed table


@pytest.mark.parametrize("arch", CI_ARCHES)
def test_the_build_covers_every_kernel_shape_and_dtype(builds, arch):
    kernels = builds[arch][1]["build"]["kernels"]
    attention = [k for k in kernels if k["kernel"] == "dual_attention"]
    seen = {(k["params"]["HEAD_DIM"], k["config"].split()[1]) for k in attention}
    assert seen == {(d, t) for d in (40, 80, 160) for t in ("float16", "bfloat16")}
    shapes = {s for k in attention for s in k["shapes"]}
    assert len(shapes) == len(doctor.ATTENTION_SHAPES)  # 4096/1024/256/64 query rows
    assert len([k for k in kernels if k["kernel"] == "slic_assign"]) == len(slic._GPU_ASSIGN_CONFIGS)
    assert len([k for k in kernels if k["kernel"] == "slic_element_stats"]) == 1
    assert not any(k["params"].get("IEEE_DOT") for k in attention)  # fp32 takes SDPA on CUDA


@pytest.mark.parametrize("arch", CI_ARCHES)
def test_attention_loads_vectorise_and_pipeline(builds, arch):
    """Issue 11: at D = 40 every Q/K/V load and output store was a scalar 2-byte access, no cp.async."""
    for k in builds[arch][1]["build"]["kernels"]:
        if k["kernel"] != "dual_attention":
            continue
        a = k["access"]
        assert a["ld.global.scalar"] == 0 and a["st.global.scalar"] == 0, (k["config"], a)
        assert a["ld.global.v4"] > 0 and a["st.global.v4"] > 0, (k["config"], a)
        assert a["cp.async"] > 0, (k["config"], a)  # K/V tiles are copied asynchronously (pipelined)


@pytest.mark.parametrize("arch", CI_ARCHES)
def test_shared_memory_estimate_bounds_the_compiled_size(builds, arch):
    """The launcher prunes configs with `shared_memory_estimate` (e.g. for sm_89's 99 KB): it must not undercount."""
    for k in builds[arch][1]["build"]["kernels"]:
        if k["kernel"] != "dual_attention":
            continue
        p = k["params"]
        config = da._config(p["BLOCK_M"], p["BLOCK_N"], p["num_warps"], p["num_stages"])
        itemsize = 2  # fp16 / bf16
        assert da.shared_memory_estimate(config, p["HEAD_DIM"], itemsize) >= k["shared"], k["config"]


def test_pruning_keeps_only_configs_that_fit_the_device():
    for D in (40, 80, 160):
        for arch, limits in aot.ARCHES.items():
            configs = da.attention_configs(D, 2, limits.smem_per_block)
            assert configs, (D, arch)
            assert all(da.shared_memory_estimate(c, D, 2) <= limits.smem_per_block for c in configs), (D, arch)
    small = da.attention_configs(160, 2, 99 * 1024)  # sm_89
    assert len(small) < len(da._GPU_CONFIGS[256])


def test_problems_flag_errors_spills_and_oversized_configs():
    ok = aot.CompileReport("k", "c", ["s"], "sm_90", True, registers=100, spill_stores=0, spill_loads=0,
                           shared=1024, fits_shared=True)
    assert aot.problems([ok]) == []
    spill = aot.CompileReport("k", "spilling", ["s"], "sm_90", True, registers=255, spill_stores=8, spill_loads=8,
                              shared=1024, fits_shared=True)
    big = aot.CompileReport("k", "big", ["s"], "sm_90", True, registers=100, spill_stores=0, spill_loads=0,
                            shared=320 * 1024, fits_shared=False)
    broken = aot.CompileReport("k", "broken", ["s"], "sm_90", False, error="CompilationError: x")
    found = aot.problems([ok, spill, big, broken])
    assert len(found) == 3
    assert "spills" in found[0] and "shared memory" in found[1] and "does not compile" in found[2]


def test_occupancy_matches_the_cuda_calculator():
    sm90, sm89 = aot.ARCHES["sm_90"], aot.ARCHES["sm_89"]
    assert sm90.blocks_per_sm(32, 128, 0) == (16, "registers")  # 16 by registers and by threads; first wins
    assert sm90.blocks_per_sm(255, 256, 0) == (1, "registers")  # 8160 -> 8192 registers per warp: 8 warps
    assert sm90.blocks_per_sm(64, 128, 100 * 1024) == (2, "shared memory")  # 228 KB / (100 KB + 1 KB)
    assert sm89.blocks_per_sm(16, 32, 0) == (24, "blocks")
    assert sm89.blocks_per_sm(16, 1024, 0) == (1, "threads")  # 1536 threads per SM


def test_ptxas_parsing_and_access_widths_on_a_real_compile():
    """The PTX parsers and the bundled ptxas on a hand-written kernel with known accesses."""
    ptx = "\n".join([
        ".version 8.8", ".target sm_90a", ".address_size 64",
        ".visible .entry k(.param .u64 p)", "{", ".reg .b64 %rd<3>; .reg .b32 %r<9>;",
        "ld.param.u64 %rd1, [p];",
        "ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];",
        "ld.global.b32 %r5, [%rd1];",
        "st.global.v4.b32 [%rd1], {%r1, %r2, %r3, %r4};",
        "ret;", "}",
    ])
    widths = aot.global_access_widths(ptx)
    assert widths["ld.global.v4"] == 1 and widths["ld.global.scalar"] == 1 and widths["st.global.v4"] == 1
    assert widths["st.global.scalar"] == 0 and widths["cp.async"] == 0
    usage = aot.ptxas_usage(ptx)
    assert usage["spill_stores"] == 0 and usage["registers"] >= 5


def test_environment_report(tmp_path, capsys):
    out = tmp_path / "env.json"
    assert doctor.run(argparse.Namespace(arch=None, json=str(out))) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())["environment"]
    assert data["torch"] in text and "onnxruntime" in text and "native ops" in text
    assert data["onnxruntime"]["providers"] and "CPUExecutionProvider" in data["onnxruntime"]["providers"]
    assert data["native_ops"]["status"] in ("not built", "loaded", "not loaded")
    assert data["cuda_available"] is False and data["gpus"] == []
    assert not list(tmp_path.glob(".env.json.*"))  # atomic write: no temp file left


def test_bad_arch_is_one_line_input_error(tmp_path):
    out = tmp_path / "r.json"
    with pytest.raises(InputError, match="--arch: expected one of sm_80, sm_89, sm_90, got 'sm_75'"):
        doctor.run(argparse.Namespace(arch="sm_75", json=str(out)))
    assert not out.exists()


@pytest.mark.gpu
def test_environment_report_sees_the_gpu():
    import torch

    info = doctor.environment()
    major, minor = torch.cuda.get_device_capability(0)
    assert info["cuda_available"] and info["gpus"][0]["capability"] == f"{major}.{minor}"
    assert info["gpus"][0]["name"] == torch.cuda.get_device_name(0)
    assert info["triton_dispatch"] == "compiled on CUDA tensors"
