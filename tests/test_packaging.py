"""Packaging: nothing in the checkout hides an installed distribution, and the install builds the native ops
into the package (editable: kernels/; wheel: inside the wheel) together with the torch version they need."""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from editrt.kernels import cleanup

ROOT = Path(__file__).resolve().parents[1]


def _run_from_checkout(code: str) -> str:
    """`python -c code` started in the checkout root: sys.path[0] is the checkout, as under `python -m pytest`."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_no_checkout_folder_shadows_an_installed_package():
    # Every import name an installed distribution provides that is also a name at the checkout's top level.
    top_level = {p.stem for p in ROOT.iterdir() if p.is_dir() or p.suffix == ".py"}
    installed = set(importlib.metadata.packages_distributions()) & top_level - {"editrt"}
    code = ("import importlib.util, json, sys\n"
            f"names = {sorted(installed)!r}\n"
            "print(json.dumps({n: importlib.util.find_spec(n).origin for n in names}))")
    origins = json.loads(_run_from_checkout(code))
    shadowed = {name: origin for name, origin in origins.items()
                if origin is None or Path(origin).resolve().is_relative_to(ROOT)}
    assert not shadowed, f"checkout folders hide installed packages when run from the checkout: {shadowed}"


def test_top_level_folders_are_no_regular_packages():
    # A regular package at the top level would hide any distribution of that name installed later (the one
    # above only sees what is installed now): `kernels` is the PyPI package transformers 5 imports.
    regular = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").exists() and p.name != "editrt")
    assert regular == [], f"top-level folders with __init__.py: {regular}"
    code = "import editrt.kernels.cleanup as c, editrt.runtime.server as s; print(c.__file__); print(s.__file__)"
    for path in _run_from_checkout(code).split():
        assert Path(path).resolve().is_relative_to(ROOT), path


def test_a_library_built_against_another_torch_is_refused(tmp_path, monkeypatch):
    # Loading a custom-op library built for another torch can crash the process: it is reported instead.
    library = tmp_path / "_editrt_native.cpython-311-x86_64-linux-gnu.so"
    library.write_bytes(b"not loaded")
    monkeypatch.setattr(cleanup, "library_path", lambda: library)
    monkeypatch.setattr(cleanup, "_loaded", {})
    status = cleanup.native_status()
    assert status["cpu"] is False and "no record of the torch it was built against" in status["error"]
    (tmp_path / "_editrt_native.built_with.json").write_text(json.dumps({"torch": "1.0.0"}))
    monkeypatch.setattr(cleanup, "_loaded", {})
    status = cleanup.native_status()
    assert status["cpu"] is False
    assert f"built against torch 1.0.0, this is torch {torch.__version__}" in status["error"]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed: no native build to package")
def test_the_wheel_carries_the_native_library(tmp_path):
    # A copy of the tracked files (links kept), built the way pip builds a wheel, CPU ops only to stay quick;
    # the environment's torch is the one the library must match (no build isolation).
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    source = tmp_path / "src"
    for name in filter(None, tracked.decode().split("\0")):
        path = ROOT / name
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            os.symlink(os.readlink(path), source / name)
        elif path.exists():
            shutil.copy2(path, source / name)
    env = {**os.environ, "EDITRT_CUDA": "0"}
    env.pop("EDITRT_NATIVE_BUILD", None)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, env=env,
                           timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("editrt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("editrt/kernels/_editrt_native") and n.endswith(".so") for n in names), names
    assert "editrt/kernels/_editrt_native.built_with.json" in names
    assert "editrt/runtime/server/static/index.html" in names or any(
        n.startswith("editrt/runtime/server/static/") for n in names)
    # Installed from the wheel alone (outside the checkout), the library loads and has its CPU kernel.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import editrt.kernels.cleanup as c; import json; "
            "print(json.dumps({'file': c.__file__, **c.native_status()}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(target)})
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert Path(status["file"]).resolve().is_relative_to(target.resolve()), status
    assert status["cpu"] is True, status
