"""The training loop every `editrt train` job shares, on Hugging Face Accelerate.

One `Accelerator` owns the devices, mixed precision, gradient accumulation and checkpoints (the
diffusers training examples' pattern). What is specific to a job comes in as arguments: the trained
module, a per-sample loss, and two datasets that map an index to a sample (train/samples.py).

Global batch B = processes x micro batch x accumulation steps. At step s, process r's micro step m
computes samples s*B + m*(N*b) + r*b + [0, b): every sample of the step is computed exactly once,
whatever N is, and each is a pure function of (seed, index). The update is the mean of the B
per-sample losses' gradients (accelerate divides by the accumulation steps, DDP averages over
processes), so N processes and one give the same update up to the order of the float sums.

State on disk, under the job's checkpoint folder:
    step-000500/   accelerate's save_state (trained module, optimizer) + trainer.json (step, best
                   validation loss and step, the settings that fix the sample stream) + best.safetensors
Each is written to a temporary sibling and renamed, so a killed job leaves whole checkpoints only.
`--resume` (a checkpoint folder, or `latest`) restores all of it; the samples need no RNG state.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from editrt.errors import InputError

TRAINER_STATE = "trainer.json"
BEST_STATE = "best.safetensors"


@dataclass
class LoopSettings:
    steps: int = 9000  # App. A.2
    batch_size: int = 32  # global batch (App. A.2)
    micro_batch: int = 4  # per process and forward pass; the rest is gradient accumulation
    lr: float = 8e-5  # AdamW, App. A.2
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's (torch's default; EIE stage 1 uses (0.9, 0.95))
    warmup_steps: int = 0  # linear warm-up, then constant (the paper states no schedule)
    seed: int = 0
    save_every: int = 500
    val_every: int = 500
    val_samples: int = 64
    checkpoints: Path = Path("train-checkpoints")
    resume: str | None = None
    log: Path | None = None
    workers: int = 2
    mixed_precision: str | None = None  # no | fp16 | bf16 (None: accelerate's config / launch flag)
    cpu: bool = False
    quiet: bool = False

    def check(self) -> None:
        for name in ("steps", "batch_size", "micro_batch", "save_every", "val_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"--{name.replace('_', '-')} {value!r}: expected a positive integer")
        for name in ("val_samples", "warmup_steps", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"--{name.replace('_', '-')} {value!r}: expected an integer >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"--lr {self.lr}: expected a positive number")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InputError(f"--weight-decay {self.weight_decay}: expected a number >= 0")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise InputError(f"--mixed-precision {self.mixed_precision!r}: expected no, fp16 or bf16")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        return self.lr * min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else self.lr


def accumulation_steps(settings: LoopSettings, processes: int) -> int:
    per_pass = processes * settings.micro_batch
    if settings.batch_size % per_pass:
        raise InputError(f"--batch-size {settings.batch_size}: expected a multiple of processes x --micro-batch "
                         f"= {processes} x {settings.micro_batch} = {per_pass}")
    return settings.batch_size // per_pass


def start_job(loop: LoopSettings, weights, log: Callable, accelerator=None):
    """What every job does first, after checking its own settings and before any network loads: the loop's
    settings checked, the accelerator (one per process), a silent log on every process but the main one (one
    process speaks for all), the weights folder checked. Returns (accelerator, log, layout)."""
    from editrt.models.components import WeightsLayout

    loop.check()
    accelerator = accelerator or make_accelerator(loop)
    if not accelerator.is_main_process:
        log = lambda what: None  # noqa: E731
    layout = WeightsLayout(weights)
    layout.check_root()
    return accelerator, log, layout


def make_accelerator(settings: LoopSettings, processes_hint: int | None = None):
    """The Accelerator for these settings (accumulation = B / (processes x micro batch))."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import GradientAccumulationPlugin

    state = PartialState(cpu=settings.cpu)
    steps = accumulation_steps(settings, state.num_processes if processes_hint is None else processes_hint)
    plugin = GradientAccumulationPlugin(num_steps=steps, sync_with_dataloader=False)
    return Accelerator(cpu=settings.cpu, mixed_precision=settings.mixed_precision, gradient_accumulation_plugin=plugin)


def weight_dtype(accelerator) -> torch.dtype:
    """What frozen parts are cast to: the mixed-precision dtype (the trained part stays fp32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(accelerator.mixed_precision), torch.float32)


class MicroBatches(torch.utils.data.Sampler):
    """This process's micro batches of sample indices, step `start` to `stop` (the class docstring's rule)."""

    def __init__(self, settings: LoopSettings, rank: int, processes: int, start: int, stop: int):
        self.b, self.rank, self.n = settings.micro_batch, rank, processes
        self.B, self.start, self.stop = settings.batch_size, start, stop
        self.accumulation = self.B // (self.n * self.b)

    def __iter__(self):
        for step in range(self.start, self.stop):
            for m in range(self.accumulation):
                first = step * self.B + m * self.n * self.b + self.rank * self.b
                yield list(range(first, first + self.b))

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accumulation


class JsonlLog:
    """One JSON object a line, appended and flushed per record (a resumed job continues the file)."""

    def __init__(self, path: Path | None):
        self.file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a")

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


@dataclass
class LoopResult:
    step: int
    last: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None  # None: no validation ran
    best_step: int | None = None
    best_val_loss: float | None = None
    history: list[dict] = field(default_factory=list)


def _checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def find_checkpoint(settings: LoopSettings) -> Path:
    """--resume PATH, or `latest`: the highest step under --checkpoints."""
    if settings.resume == "latest":
        found = sorted(settings.checkpoints.glob("step-[0-9][0-9][0-9][0-9][0-9][0-9]")) \
            if settings.checkpoints.is_dir() else []
        if not found:
            raise InputError(f"--resume latest: {settings.checkpoints} holds no step-NNNNNN checkpoint")
        return found[-1]
    path = Path(settings.resume)
    if not (path / TRAINER_STATE).is_file():
        raise InputError(f"--resume {path}: not a checkpoint (no {TRAINER_STATE}); expected a step-NNNNNN folder "
                         "or 'latest'")
    return path


def train_loop(accelerator, settings: LoopSettings, module: torch.nn.Module,
               per_sample_loss: Callable[[torch.nn.Module, dict], torch.Tensor],
               train_data, val_data, identity: dict, on_step: Callable[[int], None] | None = None,
               describe: str = "training") -> LoopResult:
    """Train `module`'s parameters (the only trainable ones) on `train_data`; see the module docstring."""
    settings.check()
    n, rank = accelerator.num_processes, accelerator.process_index
    accumulation = accumulation_steps(settings, n)
    main = accelerator.is_main_process
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, betas=settings.betas)
    module, optimizer = accelerator.prepare(module, optimizer)
    trained = accelerator.unwrap_model(module)

    # 1. Resume: module + optimizer from accelerate's state; step and best from trainer.json.
    start, best, best_step, best_val = 0, None, None, None
    if settings.resume:
        checkpoint = find_checkpoint(settings)
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        if state.get("identity") != identity:
            raise InputError(f"--resume {checkpoint}: written with {state.get('identity')}; this run has {identity} "
                             "(seed, batch, task and sizes must match to continue the same sample stream)")
        accelerator.load_state(str(checkpoint))
        start, best_step, best_val = state["step"], state.get("best_step"), state.get("best_val_loss")
        if (checkpoint / BEST_STATE).is_file():
            best = load_file(str(checkpoint / BEST_STATE))
    if start >= settings.steps:
        raise InputError(f"--steps {settings.steps}: the checkpoint is already at step {start}")

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().clone() for k, v in trained.state_dict().items()}

    def validate() -> float | None:
        if val_data is None or settings.val_samples == 0:
            return None
        total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (loss sum, count)
        mine = list(range(rank, settings.val_samples, n))
        with torch.no_grad():
            for i in range(0, len(mine), settings.micro_batch):
                batch = _collate([val_data[j] for j in mine[i:i + settings.micro_batch]], accelerator.device)
                losses = per_sample_loss(trained, batch)
                total += torch.stack([losses.double().sum(), torch.tensor(float(len(losses)), dtype=torch.float64,
                                                                             device=accelerator.device)])
        total = accelerator.reduce(total, "sum")
        return float(total[0] / total[1])

    def save(step: int) -> None:
        final = settings.checkpoints / _checkpoint_name(step)
        tmp = settings.checkpoints / f".{final.name}.tmp"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main:
            if best is not None:
                save_file(best, str(tmp / BEST_STATE))
            (tmp / TRAINER_STATE).write_text(json.dumps({
                "step": step, "best_step": best_step, "best_val_loss": best_val, "identity": identity,
                "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
            }, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        accelerator.wait_for_everyone()

    # 2. The loop: B samples a step, as `accumulation` micro batches on each of the n processes.
    log = JsonlLog(settings.log if main else None)
    if main:
        log.write({"event": "start", "job": describe, "step": start, "processes": n, "accumulation": accumulation,
                   "mixed_precision": str(accelerator.mixed_precision), "device": str(accelerator.device),
                   "identity": identity,
                   "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()}})
    loader = torch.utils.data.DataLoader(
        train_data, batch_sampler=MicroBatches(settings, rank, n, start, settings.steps),
        num_workers=settings.workers, collate_fn=_as_list)
    history = []
    bar = tqdm(total=settings.steps, initial=start, desc=describe, disable=not main or settings.quiet,
               dynamic_ncols=True)
    module.train()
    step, micro, loss_sum, t0 = start, 0, torch.zeros((), device=accelerator.device), time.perf_counter()
    try:
        for samples in loader:
            batch = _collate(samples, accelerator.device)
            for group in optimizer.param_groups:
                group["lr"] = settings.lr_at(step)
            with accelerator.accumulate(module):
                losses = per_sample_loss(module, batch)  # (b,)
                accelerator.backward(losses.mean())
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum = loss_sum + losses.detach().float().sum()
            micro += 1
            if micro < accumulation:
                continue
            assert accelerator.sync_gradients, "micro batches and accelerate's accumulation counter disagree"
            # one optimizer step is done: log, validate, checkpoint
            step, micro = step + 1, 0
            loss = float(accelerator.reduce(loss_sum, "sum")) / settings.batch_size
            loss_sum = torch.zeros((), device=accelerator.device)
            elapsed, t0 = time.perf_counter() - t0, time.perf_counter()
            record = {"step": step, "loss": loss, "lr": settings.lr_at(step - 1),
                      "samples_per_s": settings.batch_size / elapsed}
            if step % settings.val_every == 0 or step == settings.steps:
                val = validate()
                if val is not None:
                    record["val_loss"] = val
                    if best_val is None or val < best_val:
                        best, best_step, best_val = snapshot(), step, val
                t0 = time.perf_counter()  # validation time is not training throughput
            history.append(record)
            if main:
                log.write(record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
            if step % settings.save_every == 0 or step == settings.steps:
                save(step)
                t0 = time.perf_counter()
            if on_step is not None:
                on_step(step)
    finally:
        bar.close()
        log.close()
    return LoopResult(step, snapshot(), best, best_step, best_val, history)


def _as_list(samples: list[dict]) -> list[dict]:
    return samples


def _collate(samples: list[dict], device) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]).to(device) for k in samples[0]}
