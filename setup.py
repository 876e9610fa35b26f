"""Packaging: one package `editrt` whose sub-packages live in the top-level folders, plus the CMake build
of the native ops (CMakeLists.txt -> kernels/_editrt_native*.so, loaded by editrt.kernels.cleanup).

Layout. `editrt/kernels`, `editrt/models`, `editrt/export`, `editrt/runtime`, `editrt/train` and `editrt/bench` are
symbolic links to the top-level folders, which have no `__init__.py`: `python -m pytest` (or any `python -m` from the
checkout) puts the checkout first on sys.path, and a top-level *regular* package `kernels` would shadow the
PyPI package `kernels` that transformers 5 imports. A folder without `__init__.py` is at most a namespace
portion, which never hides an installed package; `editrt.kernels` is found through the link.

Native build. pip builds editrt before it installs the runtime requirements, so pyproject.toml puts torch in
the build environment; the library is built against the torch that editrt will run with (the target
environment's, when it already has one) and records that torch's version beside it, so a library built
for another torch is reported by `editrt doctor` instead of loaded. A failed build fails the install, with
the reason on the last line; EDITRT_NATIVE_BUILD=0 is the explicit way to install without the native ops
(the Python (scipy) clean-up then runs). `python setup.py build_native` (or `pip install -e .` again)
rebuilds it after editing kernels/csrc/ (incremental, in build/native). EDITRT_CUDA=0 builds the CPU ops
only, EDITRT_CUDA_ARCHITECTURES="80;90" picks the GPUs; without nvcc the CPU ops alone are built.
"""
import json
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
    """(torch's CMake prefix, C++11 ABI flag, version) of the torch editrt will run with, or None.

    The target environment's own torch comes first (the interpreter started without the build isolation's
    path settings sees it): a library must be built against the torch that loads it. In a fresh environment
    that torch is not installed yet, and the build environment's (pyproject.toml: the same requirement, the
    same release pip will install) is used.
    """
    code = ("import torch; print(torch.utils.cmake_prefix_path); print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); "
            "print(torch.__version__)")
    # pip's isolation puts its build environment on PYTHONPATH: that entry goes, the user's own stay.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and "pip-build-env" not in p]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    lines = done.stdout.splitlines()[-3:]  # whatever torch itself prints on import comes first
    if done.returncode == 0 and len(lines) == 3:
        return lines[0].strip(), int(lines[1]), lines[2].strip()
    try:
        import torch
    except ImportError:
        return None
    return torch.utils.cmake_prefix_path, int(torch._C._GLIBCXX_USE_CXX11_ABI), torch.__version__


class NativeBuildError(RuntimeError):
    """The native ops could not be built (the message says why and how to install without them)."""


class CMakeExtension(Extension):
    """A library built by CMakeLists.txt (a torch.ops library, not a Python module)."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class BuildExt(build_ext):
    """build_ext for the CMake library: configure once, build incrementally in build/native, copy the .so."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        if os.environ.get("EDITRT_NATIVE_BUILD", "1") == "0":
            # Without the native ops means without them: a library left by an earlier build would still load.
            target = Path(self.get_ext_fullpath(ext.name))
            for stale in (target, _built_with_path(target)):
                stale.unlink(missing_ok=True)
            print("editrt: native ops not built (EDITRT_NATIVE_BUILD=0); the Python (scipy) clean-up will run",
                  file=sys.stderr)
            return
        try:
            reason = self._build_cmake(Path(self.get_ext_fullpath(ext.name)))
        except (OSError, subprocess.CalledProcessError) as e:
            reason = f"the CMake build failed ({e})"
        if reason:
            # pip shows a build's output only when it fails: a skipped build would go unnoticed.
            raise NativeBuildError(f"editrt: native ops not built: {reason}. Install cmake and a C++ compiler, "
                                   "or set EDITRT_NATIVE_BUILD=0 to install without them (scipy clean-up)")

    def _build_cmake(self, target: Path):
        cmake = shutil.which("cmake")
        if cmake is None:
            return "cmake not found"
        facts = _torch_facts()
        if facts is None:
            return "torch is not importable"
        prefix, abi, torch_version = facts
        configure = [cmake, "-S", str(ROOT), "-B", str(NATIVE_BUILD_DIR), f"-DCMAKE_PREFIX_PATH={prefix}",
                     "-DCMAKE_BUILD_TYPE=Release", f"-DEDITRT_CXX11_ABI={abi}",
                     f"-DEDITRT_CUDA={'OFF' if os.environ.get('EDITRT_CUDA', '1') == '0' else 'ON'}"]
        if os.environ.get("EDITRT_CUDA_ARCHITECTURES"):
            configure.append(f"-DEDITRT_CUDA_ARCHITECTURES={os.environ['EDITRT_CUDA_ARCHITECTURES']}")
        # A build tree configured against another torch (each isolated build environment has its own prefix)
        # is configured afresh rather than linked against a torch that is gone.
        cache = NATIVE_BUILD_DIR / "CMakeCache.txt"
        if cache.exists() and f"CMAKE_PREFIX_PATH:UNINITIALIZED={prefix}\n" not in cache.read_text():
            shutil.rmtree(NATIVE_BUILD_DIR)
        if shutil.which("ninja") and not cache.exists():
            configure += ["-G", "Ninja"]
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(NATIVE_BUILD_DIR), "--parallel", str(os.cpu_count() or 2)], check=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        _replace(NATIVE_BUILD_DIR / "libeditrt_native.so", target)
        # What the library was built against, read by editrt.kernels.cleanup before it loads the library.
        built = NATIVE_BUILD_DIR / "built_with.json"
        built.write_text(json.dumps({"torch": torch_version}) + "\n")
        _replace(built, _built_with_path(target))
        return None

    def copy_extensions_to_source(self):
        """In-place (editable) copies of the library and its record, renamed over the old ones."""
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            for built, inplace in ((Path(regular_file), Path(inplace_file)),
                                   (_built_with_path(Path(regular_file)), _built_with_path(Path(inplace_file)))):
                if built.exists():
                    _replace(built, inplace)
                else:  # nothing built this time (EDITRT_NATIVE_BUILD=0): no older library stays to be loaded
                    inplace.unlink(missing_ok=True)

    def get_outputs(self):
        """The library and its record (so wheels and editable installs carry both)."""
        outputs = super().get_outputs()
        return outputs + [str(_built_with_path(Path(o))) for o in outputs if "_editrt_native" in o]


def _built_with_path(library: Path) -> Path:
    return library.with_name(library.name.split(".")[0] + ".built_with.json")


def _replace(source: Path, target: Path):
    """Copy as a new file renamed over the old one: processes that have the old library mapped keep a valid copy."""
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)


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
TRAIN = [  # editrt train
    "accelerate>=1.0",  # devices, mixed precision, accumulation, multi-process, checkpoints
    "pycocotools>=2.0.7",  # COCO polygons and RLE (--coco)
    "peft>=0.13",  # editrt bench's training rows: diffusers' own LoRA step, the harmonizer's peer
]
SERVE = [  # editrt serve: FastAPI on uvicorn
    "fastapi>=0.110",
    "uvicorn>=0.29",
    "python-multipart>=0.0.9",  # multipart uploads
    "websockets>=12",  # uvicorn's WebSocket protocol
    "prometheus_client>=0.17",  # /metrics (multiprocess-safe under Ray Serve replicas)
    "fastapi-offline>=1.7",  # Swagger UI's assets, served by the server itself for /docs (no CDN)
]
EVAL = [  # editrt eval: the metrics from the well-kept libraries (SSIM/PSNR/MSE come from scikit-image)
    "scikit-image>=0.22",
    "lpips>=0.1.4",  # LPIPS (its linear layers ship in the wheel; the AlexNet backbone is a local file)
    "torchmetrics>=1.9",  # FID (feature_extractor_weights_path: a local Inception file)
    "torch-fidelity>=0.3,!=0.4.0",  # the Inception torchmetrics' FID runs (0.4.0 also installs a top-level `tests` package)
]
DEV = [  # tests, lint and the oracles the tests compare with (the dev extras add ONNX Runtime)
    *TRAIN,  # tests/train
    *EVAL,  # tests/eval
    "pytest>=8,<9.2",  # schemathesis 4.32 (tests/server/test_fuzz.py) reads Function._nodeid, gone in pytest 9.2
    "pytest-timeout>=2.3",  # bench/gpu_validate.sh: a per-test time limit on the lent GPU
    "setuptools>=70.1",  # tests/test_packaging.py builds a wheel against this environment's torch
    "ruff>=0.6",
    "peft>=0.13",  # oracle for LoRA fusion (diffusers' load_lora_weights needs it)
    "DeepCache==0.1.1",  # oracle for cached denoising features (tests/runtime/test_deep_cache.py)
    "scikit-image>=0.22",  # real photographs for tests
    "invisible-watermark>=0.2",
    *SERVE,
    *DEPLOY,
    "httpx>=0.27",  # tests/server, bench/serve_load.py, examples/client.py
    "playwright>=1.40",  # tests/server/test_browser.py drives Debian's /usr/bin/chromium
    "schemathesis>=4.0",  # tests/server/test_fuzz.py: no 5xx on any input the OpenAPI schema allows
    "hypothesis>=6.100",
    "psutil>=5.9",  # bench/serve_load.py: the server's RSS over time
]

setup(
    name="editrt",
    version="0.1.0",
    description="Low-latency inference runtime for diffusion-based spatial image editing",
    python_requires=">=3.11",  # asyncio Task.cancelling() and asyncio.timeout (the server)
    packages=[
        "editrt",
        "editrt.models",
        "editrt.kernels",
        "editrt.export",
        "editrt.runtime",
        "editrt.runtime.server",
        "editrt.runtime.server.routers",
        "editrt.bench",
        "editrt.train",
        "editrt.eval",
    ],
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
        "tqdm>=4.60",
        "matplotlib>=3.7",  # editrt bench --plot
    ],
    extras_require={
        "tensorrt": ["tensorrt>=10.0,<12"],  # export/tensorrt.py is written against the 10.x and 11.x API
        "serve": SERVE,
        "deploy": [*SERVE, *DEPLOY],
        "watermark": ["invisible-watermark>=0.2"],
        # ONNX Runtime (export checks, the onnxruntime backend) is an extra: `onnxruntime` (CPU) and
        # `onnxruntime-gpu` (CUDA) are one module in two distributions that break each other's CUDA
        # provider when both are installed, so an install takes exactly one of them
        "onnxruntime": ["onnxruntime>=1.18"],
        "train": TRAIN,
        "eval": EVAL,
        "gpu": ["onnxruntime-gpu>=1.18"],  # instead of [onnxruntime], never beside it
        "dev": ["onnxruntime>=1.18", *DEV],  # pip install -e ".[dev]" (CPU machines, CI)
        "dev-gpu": ["onnxruntime-gpu>=1.18", *DEV],  # the GPU machine
    },
    entry_points={"console_scripts": ["editrt=editrt.cli:main"]},
    ext_modules=[CMakeExtension("editrt.kernels._editrt_native")],
    cmdclass={"build_ext": BuildExt, "build_native": BuildNative},
)
