#!/usr/bin/env bash
# bench/gpu_validate.sh OUTDIR [--device cuda|cpu] [--budget-s 540] [--plan-only] [--stages NAME,...]
#
# The first contact with a GPU in one call that fits a 15-minute lease (one command under 10 minutes): by its
# own budget (--budget-s, default 540 s) it runs, in order,
#   environment   versions, GPU, packages and tools (env.json; nvidia-smi inside)
#   doctor        `editrt doctor --json` (doctor.json)
#   weights       random full-size weights into the user cache, in the background while the next stages run
#   native-build  `python setup.py build_native` in this checkout (CUDA + CPU op), then its status (native.json)
#   pytest-gpu    `pytest -m gpu` under CI=true (a missing Ray/TensorRT/onnxruntime-gpu is reported as missing,
#                 never as ok), pytest-timeout per test, each result streamed (pytest-gpu.jsonl; junit at exit)
#   bench-tiny    `editrt bench --device cuda --config tiny --quick` on the rows that use graphs, kernels, the
#                 native op: proves the CUDA paths before full-size weights cost time
#   bench-<group> `editrt bench --device cuda --config full --only GROUP`, groups in priority order (UNet step,
#                 kernels, SAM, inpaint pass vs diffusers, reposition, elements, depth/matting, the rest) while
#                 the budget lasts; rows appended to bench-full.jsonl as each finishes (--stream). Compile rows
#                 run with inductor's GEMM/conv template autotuning off (TORCHINDUCTOR_MAX_AUTOTUNE_*_BACKENDS=ATEN:
#                 no minutes of benchmarking on a cold cache)
#   bench-max-autotune  unet-inpaint-b1 with the templates autotuned, only if >= 180 s are left
# Each stage gets what the budget has left (at most its own cap); a stage stopped at its limit keeps what it
# finished. OUTDIR/summary.json is rewritten atomically when each stage starts and ends: per stage its status
# (ok, failed, missing, timeout, skipped, stopped), seconds, limit, command, what it skipped and why, what is
# missing; `--plan-only` writes it with every command and runs nothing; `--stages bench-sam,bench-seele` runs only
# those (a second lease picks up where the first stopped). Nothing is written into the checkout:
# no --save, no .pytest_cache, no bytecode; weights, autotune and compile caches go to the user cache; the
# native build writes only the git-ignored build/native and kernels/_editrt_native*.so it loads from.
# Exit status: 0 no stage failed (summary.json's verdict says ok or incomplete), 1 a stage failed, 2 bad usage,
# 143 terminated. `--device cpu --budget-s 240` runs the same stages on a CPU with tiny weights (the test does).
#
# On a lent GPU. First, on the development machine (pure-Python wheels; .whl/ travels with the working tree):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl diffusers segment-anything importlib-metadata pytest-timeout
# Then the one command there (the run tool, timeout_s=600; it runs in the repository root, $OUT comes back):
#   pip install --no-index --no-deps --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site && EDITRT_NATIVE_BUILD=0 pip install --no-index --no-deps --no-build-isolation -e . && bench/gpu_validate.sh $OUT/gpu-validate
# (EDITRT_NATIVE_BUILD=0: the install does not build the native op; the native-build stage does, inside the budget.)
# What comes back, in $OUT/gpu-validate: summary.json, validate.log, env.json, doctor.json, native.json,
# pytest-gpu.jsonl (+ .xml if pytest finished), bench-tiny.jsonl/.json, bench-full.jsonl (every full-size row),
# bench-<group>.json per finished group (the `editrt bench --json` document), and each stage's log.
# To commit it: copy the folder to bench/results/<device>-<date>/ (e.g. bench/results/h100-2026-12-06/), read
# summary.json's verdict and each stage's `why`, and commit the folder with a message naming the GPU and verdict.
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-$(command -v python || command -v python3)}"
if [ -z "$PY" ]; then
    echo "gpu_validate: no python on PATH (set PYTHON)" >&2
    exit 2
fi
# The stages run under the same interpreter (PYTHON, else the python on PATH); the orchestration itself uses the
# standard library only, so it runs and reports even where torch or editrt do not import.
PYTHON="$PY" exec "$PY" "$HERE/gpu_validate.py" "$@"
