"""Packaging: one package `editrt` whose sub-packages live in the top-level folders, plus the CMake build
of the native ops (CMakeLists.txt -> kernels/_editrt_native*.so, loaded by editrt.kernels.cleanup).

The native build never fails the install: without CMake, a compiler or torch it prints one line and the
Python (scipy) path runs instead. `python setup.py build_native` (or `pip install -e .` again) rebuilds it
after editing kernels/csrc/ (incremental, in build/native). Environment: EDITRT_NATIVE_BUILD=0 skips the
build, EDITRT_CUDA=0 builds the CPU ops only, EDITRT_CUDA_ARCHITECTURES="80;90" picks the GPUs.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Command, Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
NATIVE_BUILD_DIR = ROOT / "build" / "native"


def _torch_facts():
    """(torch's CMake prefix, C++11 ABI flag) of the torch editrt will run with, or None.

    Under pip's build isolation torch is not importable here; the interpreter itself, started without the
    isolation's path settings, still sees the environment's own torch.
    """
    code = "import torch; print(torch.utils.cmake_prefix_path); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
    try:
        import torch

        return torch.utils.cmake_prefix_path, int(torch._C._GLIBCXX_USE_CXX11_ABI)
    except ImportError:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        lines = done.stdout.split()
        return (lines[0], int(lines[1])) if done.returncode == 0 and len(lines) == 2 else None


class CMakeExtension(Extension):
    """A library built by CMakeLists.txt (a torch.ops library, not a Python module)."""

    def __init__(self, name: str):
        super().__init__(name, sources=[], optional=True)


class BuildExt(build_ext):
    """build_ext for the CMake library: configure once, build incrementally in build/native, copy the .so."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        target = Path(self.get_ext_fullpath(ext.name))
        try:
            reason = self._build_cmake(target)
        except (OSError, subprocess.CalledProcessError) as e:
            reason = f"the CMake build failed ({e})"
        if reason:
            print(f"editrt: native ops not built: {reason}; the Python (scipy) clean-up will run", file=sys.stderr)

    def _build_cmake(self, target: Path):
        if os.environ.get("EDITRT_NATIVE_BUILD", "1") == "0":
            return "EDITRT_NATIVE_BUILD=0"
        cmake = shutil.which("cmake")
        if cmake is None:
            return "cmake not found"
        facts = _torch_facts()
        if facts is None:
            return "torch is not importable"
        prefix, abi = facts
        configure = [cmake, "-S", str(ROOT), "-B", str(NATIVE_BUILD_DIR), f"-DCMAKE_PREFIX_PATH={prefix}",
                     "-DCMAKE_BUILD_TYPE=Release", f"-DEDITRT_CXX11_ABI={abi}",
                     f"-DEDITRT_CUDA={'OFF' if os.environ.get('EDITRT_CUDA', '1') == '0' else 'ON'}"]
        if os.environ.get("EDITRT_CUDA_ARCHITECTURES"):
            configure.append(f"-DEDITRT_CUDA_ARCHITECTURES={os.environ['EDITRT_CUDA_ARCHITECTURES']}")
        if shutil.which("ninja") and not (NATIVE_BUILD_DIR / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja"]
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(NATIVE_BUILD_DIR), "--parallel", str(os.cpu_count() or 2)], check=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        # A new file renamed over the old one: processes that have the old library mapped keep a valid copy.
        partial = target.with_name(target.name + ".partial")
        shutil.copyfile(NATIVE_BUILD_DIR / "libeditrt_native.so", partial)
        os.replace(partial, target)
        return None


    def copy_extensions_to_source(self):
        """In-place (editable) copies, renamed over the old library like `_build_cmake` does."""
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            if os.path.exists(regular_file):
                partial = f"{inplace_file}.partial"
                shutil.copyfile(regular_file, partial)
                os.replace(partial, inplace_file)


class BuildNative(Command):
    """`python setup.py build_native`: (re)build the native ops into kernels/ of this checkout."""

    description = "build the native ops (CMakeLists.txt) into kernels/ of the source tree"
    user_options = []

    def initialize_options(self):
        """No options (distutils' Command interface requires the method)."""

    def finalize_options(self):
        """No options to finalise."""

    def run(self):
        self.reinitialize_command("build_ext", inplace=1)
        self.run_command("build_ext")


DEPLOY = [  # tests/deploy and `editrt serve --ray`: Ray Serve, and tritonclient against a real tritonserver
    "ray[serve]>=2.40",
    "tritonclient[http,grpc]>=2.50",
]
SERVE = [  # editrt serve: FastAPI on uvicorn
    "fastapi>=0.110",
    "uvicorn>=0.29",
    "python-multipart>=0.0.9",  # multipart uploads
    "websockets>=12",  # uvicorn's WebSocket protocol
    "prometheus_client>=0.17",  # /metrics (multiprocess-safe under Ray Serve replicas)
]

setup(
    name="editrt",
    version="0.1.0",
    description="Low-latency inference runtime for diffusion-based spatial image editing",
    python_requires=">=3.10",
    packages=[
        "editrt",
        "editrt.models",
        "editrt.kernels",
        "editrt.export",
        "editrt.runtime",
        "editrt.runtime.server",
        "editrt.runtime.server.routers",
        "editrt.bench",
    ],
    package_dir={
        "editrt": "editrt",
        "editrt.models": "models",
        "editrt.kernels": "kernels",
        "editrt.export": "export",
        "editrt.runtime": "runtime",
        "editrt.bench": "bench",
    },
    package_data={
        "editrt": ["configs/*.json", "assets/*"],
        "editrt.runtime.server": ["static/*"],  # the editor page: plain HTML/CSS/JS, no build step
    },
    install_requires=[
        # A range, so the package installs beside an existing CUDA torch (tested: 2.11 on the GPU machine,
        # 2.14.1 on the development/CI machines, whose pip is capped at the wheels on their disk).
        "torch>=2.4",
        "torchvision>=0.19",
        "diffusers>=0.32",
        "transformers>=4.45",
        "segment-anything>=1.0",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pillow>=10",
        "scipy>=1.10",
        "triton>=3.0",
        "onnx>=1.16",
        "onnxscript>=0.1",
        "onnxruntime>=1.18",
        "tqdm>=4.60",
        "matplotlib>=3.7",  # editrt bench --plot
    ],
    extras_require={
        "tensorrt": ["tensorrt>=10.0,<12"],  # export/tensorrt.py is written against the 10.x and 11.x API
        "serve": SERVE,
        "deploy": [*SERVE, *DEPLOY],
        "gpu": ["onnxruntime-gpu>=1.18"],
        "watermark": ["invisible-watermark>=0.2"],
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "peft>=0.13",  # oracle for LoRA fusion (diffusers' load_lora_weights needs it)
            "scikit-image>=0.22",  # real photographs for tests
            "invisible-watermark>=0.2",
            *SERVE,
            *DEPLOY,
            "httpx>=0.27",  # tests/server, bench/serve_load.py, examples/client.py
            "playwright>=1.40",  # tests/server/test_browser.py drives Debian's /usr/bin/chromium
            "schemathesis>=4.0",  # tests/server/test_fuzz.py: no 5xx on any input the OpenAPI schema allows
            "hypothesis>=6.100",
            "psutil>=5.9",  # bench/serve_load.py: the server's RSS over time
        ],
    },
    entry_points={"console_scripts": ["editrt=editrt.cli:main"]},
    ext_modules=[CMakeExtension("editrt.kernels._editrt_native")],
    cmdclass={"build_ext": BuildExt, "build_native": BuildNative},
)
