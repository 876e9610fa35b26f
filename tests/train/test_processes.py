"""Two CPU processes (gloo, `accelerate launch --multi_gpu --num_processes 2`) equal one process with the same
global batch and seed, for every job: prompts, harmonizer, elements stage 1 and stage 2. One launch runs all four
jobs (tests/train/launch_jobs.py); each test runs its job on one process and compares.

Why they can differ at all: every sample is computed identically (a pure function of seed and index), but the
gradient of a step is summed in another order (DDP's all-reduce of two halves vs one process's accumulation of
four micro batches). AdamW divides each entry's step by that entry's own gradient size, so an entry whose gradient
is a near-cancelling sum carries the summation-order error into its step: a handful of entries differ by up to a
fraction of one step (lr) while the rest agree to float precision. Measured on this machine (2 steps, max / 99.9th
percentile / mean |difference| of the written tensors): prompts (lr 1e-2) 2.5e-7 / 1.2e-7 / 1.6e-9; harmonizer
prompt 1.8e-6 / 1.2e-7 / 2.3e-9, LoRA 1.7e-5 / 9.3e-7 / 1.1e-8; stage 1 content encoder (lr 1e-3) 2.7e-5 / 2.4e-8 /
2.8e-9; stage 2 UNet (lr 1e-3) 1.4e-4 / 3.8e-7 / 1.3e-8, adapter 3.1e-6 / 3.6e-7 / 1.2e-8. Hence the tolerance
below (TOLERANCE); the per-step losses must agree to 1e-6 (relative), which any difference in the samples breaks.
"""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from editrt.cli import main
from editrt.models.components import WeightsLayout

# Every written tensor: 99.9 % of entries within 1e-5 and the mean |difference| under 5e-7, and the prompts (no
# near-cancelling sums: one [L, C] tensor) within 1e-5. The largest difference has only Adam's own bound: an
# entry's step is at most about lr per step (|m_hat / sqrt(v_hat)| <= 1 in the first steps), so a near-zero
# gradient whose sign the summation order flips moves it by up to 2 lr per step; over the 2 steps, 4 lr (stage 2's
# UNet measured 1.4e-4 in one run, 5.7e-4 in a CI run, lr 1e-3). The percentile and the mean carry the check: they
# depend on the BLAS threads' order (stage 2's UNet: 3.8e-7 and 1.6e-6 at the 99.9th percentile in two runs), and a
# sample given to the wrong process moves most entries by about lr (1e-3).
TOLERANCE = {"p999": 1e-5, "mean": 5e-7, "max_in_lr": 4.0}
PROMPT_TOLERANCE = 1e-5
RESOLUTION = 32
COMMON = ["--steps", "2", "--batch-size", "4", "--micro-batch", "1", "--val-samples", "2", "--val-every", "2",
          "--workers", "0", "--cpu", "--quiet"]


def _jobs(weights, plain, iharmony, out: Path) -> dict[str, list[str]]:
    """Each job's editrt arguments, writing under `out` (the weights folder is only read)."""
    w = ["--weights", str(weights)]
    return {
        "prompts": ["train", "prompts", *w, "--data", str(plain), "--task", "remove", "--resolution",
                    str(RESOLUTION), "--lr", "1e-2", "-o", str(out / "prompts.safetensors")],
        "harmonizer": ["train", "harmonizer", *w, "--data", str(iharmony), "--resolution", str(RESOLUTION),
                       "--lora-rank", "4", "--lora-targets", "to_q,to_k,to_v,to_out.0", "--lr", "1e-2",
                       "-o", str(out / "harmonize.safetensors"), "--lora-output", str(out / "lora.safetensors")],
        "stage1": ["train", "elements", *w, "--data", str(plain), "--resolution", str(RESOLUTION), "--grid", "4",
                   "--lr", "1e-3", "-o", str(out / "content_encoder")],
        "stage2": ["train", "elements", "--stage", "2", *w, "--data", str(plain), "--resolution", str(RESOLUTION),
                   "--grid", "4", "--lr", "1e-3", "-o", str(out / "decoder")],
    }


def _with_run_files(jobs: dict, out: Path) -> dict:
    return {name: [*args, *COMMON, "--checkpoints", str(out / f"{name}-ck"), "--log", str(out / f"{name}.jsonl")]
            for name, args in jobs.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tiny_weights, plain_dataset, iharmony_dataset, tmp_path_factory):
    """Every job once under a 2-process launch; returns its output folder."""
    out = tmp_path_factory.mktemp("two")
    jobs = _with_run_files(_jobs(tiny_weights, plain_dataset, iharmony_dataset, out), out)
    (out / "jobs.json").write_text(json.dumps(list(jobs.values())))
    # accelerate launch --cpu alone starts one process unless MPI is there; --multi_gpu starts torchrun, whose
    # workers find no CUDA and join a gloo group on the CPU (the jobs' --cpu)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_free_port()), str(Path(__file__).with_name("launch_jobs.py")), str(out / "jobs.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # its own process group, so the launcher's workers are killed with it if it overruns
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        _, stderr = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode == 0, stderr[-3000:]
    return out


def _one_process(name, tiny_weights, plain_dataset, iharmony_dataset, tmp_path) -> Path:
    jobs = _with_run_files(_jobs(tiny_weights, plain_dataset, iharmony_dataset, tmp_path), tmp_path)
    assert main(jobs[name]) == 0
    return tmp_path


def _log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _same_run(two: Path, one: Path, name: str) -> None:
    assert _log(two / f"{name}.jsonl")[0]["processes"] == 2 and _log(one / f"{name}.jsonl")[0]["processes"] == 1
    rows = lambda folder: [r for r in _log(folder / f"{name}.jsonl") if "loss" in r]  # noqa: E731
    r2, r1 = rows(two), rows(one)
    assert [r["step"] for r in r2] == [r["step"] for r in r1] == [1, 2]
    for a, b in zip(r2, r1, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert ("val_loss" in a) == ("val_loss" in b) and a.get("val_loss", 0) == pytest.approx(b.get("val_loss", 0),
                                                                                                rel=1e-5)


def _close(two: dict, one: dict, lr: float, start: dict | None = None) -> float:
    """Checks TOLERANCE over the tensors of two state dicts (same keys), returns the max |difference|; with
    `start`: something was trained."""
    assert two.keys() == one.keys()
    if start is not None:
        assert any(not torch.equal(one[k], start[k]) for k in one if k in start)
    d = torch.cat([(two[k].float() - one[k].float()).abs().flatten() for k in one]).sort().values
    p999, mean, worst = float(d[int(0.999 * (len(d) - 1))]), float(d.mean()), float(d[-1])
    assert p999 <= TOLERANCE["p999"] and mean <= TOLERANCE["mean"], (p999, mean)
    assert worst <= TOLERANCE["max_in_lr"] * lr, worst
    return worst


def test_prompts(two_processes, tiny_weights, plain_dataset, iharmony_dataset, tmp_path):
    one = _one_process("prompts", tiny_weights, plain_dataset, iharmony_dataset, tmp_path)
    _same_run(two_processes, one, "prompts")
    two, single = load_file(str(two_processes / "prompts.safetensors")), load_file(str(one / "prompts.safetensors"))
    start = load_file(str(WeightsLayout(tiny_weights).task_prompts))
    assert all(torch.equal(two[k], single[k]) for k in ("complete", "harmonize", "null"))
    assert _close(two, single, 1e-2, start) <= PROMPT_TOLERANCE


def test_harmonizer(two_processes, tiny_weights, plain_dataset, iharmony_dataset, tmp_path):
    one = _one_process("harmonizer", tiny_weights, plain_dataset, iharmony_dataset, tmp_path)
    _same_run(two_processes, one, "harmonizer")
    start = load_file(str(WeightsLayout(tiny_weights).task_prompts))
    prompts = [load_file(str(f / "harmonize.safetensors")) for f in (two_processes, one)]
    assert _close(*prompts, 1e-2, start) <= PROMPT_TOLERANCE
    loras = [load_file(str(f / "lora.safetensors")) for f in (two_processes, one)]
    assert any(v.abs().max() > 0 for k, v in loras[1].items() if "lora_B" in k)  # B starts at zero: it trained
    _close(*loras, 1e-2)


def test_elements_stage1(two_processes, tiny_weights, plain_dataset, iharmony_dataset, tmp_path):
    one = _one_process("stage1", tiny_weights, plain_dataset, iharmony_dataset, tmp_path)
    _same_run(two_processes, one, "stage1")
    start = load_file(str(WeightsLayout(tiny_weights).elements / "content_encoder" / "model.safetensors"))
    encoders = [load_file(str(f / "content_encoder" / "model.safetensors")) for f in (two_processes, one)]
    _close(*encoders, 1e-3, start)


def test_elements_stage2(two_processes, tiny_weights, plain_dataset, iharmony_dataset, tmp_path):
    one = _one_process("stage2", tiny_weights, plain_dataset, iharmony_dataset, tmp_path)
    _same_run(two_processes, one, "stage2")
    start = load_file(str(WeightsLayout(tiny_weights).elements / "unet" / "diffusion_pytorch_model.safetensors"))
    unets = [load_file(str(f / "decoder" / "unet" / "diffusion_pytorch_model.safetensors")) for f in (two_processes, one)]
    _close(*unets, 1e-3, start)
    adapters = [load_file(str(f / "decoder" / "element_adapter" / "model.safetensors")) for f in (two_processes, one)]
    _close(*adapters, 1e-3)
