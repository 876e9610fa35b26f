#!/usr/bin/env bash
# One command on a GPU machine: the GPU tests, the full-size benchmark (with the torch.compile peers) and
# `editrt doctor`, with every log and result under OUTDIR.
#
#   bench/gpu_validate.sh OUTDIR            # from the repository root or anywhere; ~25 min on an H100
#
# Works where editrt is pip-installed (`pip install --no-deps -e .`) and where it is not: then the source
# tree is made importable through a package folder of links under OUTDIR (so `--save` still writes the
# repository's bench/results). Packages missing from the machine (diffusers, segment-anything, ...) may
# come from a local folder the caller puts on PYTHONPATH, e.g. PYTHONPATH=$PWD/.site (see bench/README).
#
# Every step runs even if an earlier one failed; OUTDIR/summary.txt has one line per step (exit code,
# seconds, log). Exit status: 0 when every step passed, else 1 (2: bad usage). A step whose command
# does not exist in this editrt (e.g. `doctor` in an older checkout) is logged as missing, not failed.
# Per-step time limits (seconds) can be changed with EDITRT_VALIDATE_TIMEOUT_<STEP> (STEP: GPU_TESTS,
# SLOW_GPU_TESTS, BENCH, DOCTOR); a step over its limit is killed and counts as failed (exit 124).
set -u

if [ "$#" -ne 1 ] || [ -z "$1" ]; then
    echo "usage: bench/gpu_validate.sh OUTDIR" >&2
    exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1" || { echo "gpu_validate: cannot create $1" >&2; exit 2; }
OUT="$(cd "$1" && pwd)"
PYTHON="${PYTHON:-python}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

log() { echo "gpu_validate: $*" | tee -a "$OUT/validate.log" >&2; }

# editrt importable? If not, a package folder of links to the source tree (editrt/ and its sub-packages,
# which live in top-level folders: setup.py's package_dir) goes first on PYTHONPATH.
if ! (cd "$OUT" && "$PYTHON" -c "import editrt.bench.suite" >/dev/null 2>&1); then
    PKG="$OUT/.editrt-src/editrt"
    rm -rf "$OUT/.editrt-src" && mkdir -p "$PKG"
    for entry in "$REPO"/editrt/*; do ln -s "$entry" "$PKG/$(basename "$entry")"; done
    for sub in models kernels export runtime bench; do ln -sfn "$REPO/$sub" "$PKG/$sub"; done
    export PYTHONPATH="$OUT/.editrt-src${PYTHONPATH:+:$PYTHONPATH}"
    log "editrt is not installed: importing it from $REPO through $OUT/.editrt-src"
fi
# Every step runs from OUTDIR: a source tree's editrt/ folder on sys.path (`python -m` puts the current
# folder first) would hide the sub-packages that live beside it.
cd "$OUT" || exit 2

# run STEP LIMIT LOG COMMAND...: one step, its output in LOG, its line in summary.txt
run() {
    local step="$1" limit="$2" logfile="$OUT/$3"
    shift 3
    local var="EDITRT_VALIDATE_TIMEOUT_$step"
    limit="${!var:-$limit}"
    log "$step: $* (limit ${limit}s, log $logfile)"
    local start rc
    start=$(date +%s)
    timeout --kill-after=30 "$limit" "$@" > "$logfile" 2>&1
    rc=$?
    local took=$(( $(date +%s) - start ))
    local verdict="ok"
    if [ "$rc" -eq 5 ] && [[ "$step" == *TESTS ]]; then
        verdict="no tests selected"  # pytest's exit 5: nothing to run is not a failure
    elif [ "$rc" -ne 0 ]; then
        verdict="FAILED"
        FAILED=1
    fi
    printf '%-15s rc=%-4s %5ss  %-18s %s\n' "$step" "$rc" "$took" "$verdict" "$logfile" >> "$SUMMARY"
    log "$step: rc=$rc ($verdict) in ${took}s"
}

# 0. What this machine is (always succeeds; for the record).
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    echo "repo: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
    echo "PYTHONPATH=${PYTHONPATH:-}"
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$PYTHON" - <<'EOF' 2>&1
import importlib.metadata as md
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for dist in ("triton", "diffusers", "transformers", "segment-anything", "safetensors", "onnx", "onnxruntime",
             "onnxruntime-gpu", "tensorrt", "importlib-metadata"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "absent")
import editrt
print("editrt", editrt.__version__, editrt.__file__)
EOF
} > "$OUT/env.txt"

# 1. The GPU tests, then the full-size GPU tests (conftest.py runs `slow` tests only when -m names them).
PYTEST=("$PYTHON" -m pytest "$REPO/tests" -c "$REPO/pytest.ini" --rootdir "$REPO" -q -rs -p no:cacheprovider)
run GPU_TESTS 900 pytest-gpu.log "${PYTEST[@]}" -m gpu --junitxml "$OUT/pytest-gpu.xml"
run SLOW_GPU_TESTS 900 pytest-gpu-slow.log "${PYTEST[@]}" -m "gpu and slow" --junitxml "$OUT/pytest-gpu-slow.xml"

# 2. The benchmark at full size, fp16, with every peer (diffusers and SamPredictor, eager and torch.compile'd);
#    --save commits it under bench/results/ and refreshes bench/results/README.md.
run BENCH 1500 bench.log "$PYTHON" -m editrt.cli bench --config full --save --json "$OUT/bench.json" \
    --markdown "$OUT/bench.md"
BENCH_RC=$(awk '$1 == "BENCH" {sub("rc=", "", $2); print $2}' "$SUMMARY")

# 3. editrt doctor (versions, GPU, kernels compiled ahead of time), where this editrt has it.
if "$PYTHON" -m editrt.cli doctor --help >/dev/null 2>&1; then
    run DOCTOR 600 doctor.log "$PYTHON" -m editrt.cli doctor --json "$OUT/doctor.json"
else
    printf '%-15s rc=%-4s %5ss  %-18s %s\n' DOCTOR - 0 "missing" "(no \`editrt doctor\` in this editrt)" >> "$SUMMARY"
    log "DOCTOR: this editrt has no doctor command; skipped"
fi

log "summary ($SUMMARY):"
cat "$SUMMARY" >&2
if [ "${BENCH_RC:-1}" != "0" ]; then
    log "the benchmark failed (rc=${BENCH_RC:-?}): see $OUT/bench.log"
fi
exit "$FAILED"
