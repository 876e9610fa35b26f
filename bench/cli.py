"""`editrt bench`: the latency benchmark suite (components, whole passes, and peer libraries side by side).

    editrt bench --quick                                   # under a minute on a 2-core CPU (tiny weights)
    editrt bench --config full --save                      # on a GPU: the figures committed under bench/results/
    editrt bench --only unet,sam --json b.json --markdown b.md --plot b.png
    editrt bench --config full --only unet-inpaint --stream rows.jsonl   # each row appended as it finishes

`editrt/cli.py` loads this module only when `bench` is asked for (its lazy-command table: `configure_parser`
builds the options, `run` runs them); `main(argv)` runs it stand-alone (`python -m editrt.bench.cli --quick`). Bad options raise `InputError` (one line on
stderr, exit 2). Rows that fail (an error, a contradicted claim, work other than the baseline's) are
reported as failed in every output, --save then writes nothing, and the command exits 1.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from editrt.errors import InputError

if TYPE_CHECKING:  # torch is imported where a command runs: `editrt --help` does not load it
    import torch

CONFIGS = ("tiny", "full")


# ---------------------------------------------------------------------- option checks
def _count(text: str | None, name: str, minimum: int) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise InputError(f"{name} {text!r}: expected an integer >= {minimum}")
    return value


def _device(spec: str | None) -> torch.device:
    import torch

    if spec is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {spec!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec}: CUDA is not available on this machine")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)
    return device


def _weights_and_config(args, device: torch.device, log) -> tuple[Path, str]:
    from editrt.weights import WeightsLayout, resolve_weights

    if args.config is not None and args.config not in CONFIGS:
        raise InputError(f"--config {args.config!r}: expected one of {', '.join(CONFIGS)}")
    if args.weights is None:  # the cached random weights of the config (written once)
        config = args.config or ("full" if device.type == "cuda" else "tiny")
        return resolve_weights(config, log=log), config
    weights = resolve_weights(args.weights, log=log)
    written_as = WeightsLayout(weights).read_info().get("config")
    if args.config is not None and written_as is not None and args.config != written_as:
        raise InputError(f"--config {args.config}: the weights in {weights} are '{written_as}' (editrt.json); "
                         "drop --config or choose other weights")
    return weights, written_as or args.config or "custom"


def _output(path: str | None, name: str, suffix: str | None = None) -> Path | None:
    if path is None:
        return None
    out = Path(path)
    if suffix and out.suffix.lower() != suffix:
        raise InputError(f"{name} {path}: expected a {suffix} file name")
    if out.is_dir():
        raise InputError(f"{name} {path}: is a directory; expected a file name")
    return out


def _only(values: list[str] | None) -> list[str]:
    names = [n.strip() for value in values or [] for n in value.split(",")]
    if any(not n for n in names):
        raise InputError(f"--only {','.join(values)}: expected component names separated by commas")
    return names


def settings_from_args(args, log=lambda what: None):
    from editrt.bench.suite import Settings

    device = _device(args.device)
    from editrt.models.common import default_dtype, resolve_dtype

    dtype = resolve_dtype(args.dtype or default_dtype(device), name="--dtype")
    only = _only(args.only)
    repeats = _count(args.repeats, "--repeats", 1)
    warmup = _count(args.warmup, "--warmup", 0)
    steps = _count(args.steps, "--steps", 1) or 20
    weights, config = _weights_and_config(args, device, log)
    return Settings(weights=weights, device=device, dtype=dtype, config=config, quick=args.quick, steps=steps,
                    only=only, repeats=repeats, warmup=warmup)


def effective_command(settings, weights_given: bool) -> str:
    """The command with every setting spelled out, to repeat the run."""
    from editrt.bench.cases import dtype_name

    parts = ["editrt", "bench", "--device", str(settings.device), "--dtype", dtype_name(settings.dtype),
             "--steps", str(settings.steps)]
    parts += ["--weights", str(settings.weights)] if weights_given else ["--config", settings.config]
    parts += ["--quick"] if settings.quick else []
    parts += ["--only", ",".join(settings.only)] if settings.only else []
    parts += ["--repeats", str(settings.repeats)] if settings.repeats is not None else []
    parts += ["--warmup", str(settings.warmup)] if settings.warmup is not None else []
    return shlex.join(parts)


# ---------------------------------------------------------------------- the command
def cmd_bench(args) -> dict:
    from tqdm.auto import tqdm

    from editrt.bench import report
    from editrt.bench.suite import run_suite

    log = (lambda what: None) if args.quiet else (lambda what: tqdm.write(f"editrt: bench: {what}", file=sys.stderr))
    # 1. Check every option and output path before anything slow runs.
    json_path = _output(args.json, "--json")
    markdown_path = _output(args.markdown, "--markdown")
    plot_path = _output(args.plot, "--plot", ".png")
    stream_path = _output(args.stream, "--stream")
    if stream_path is not None and not stream_path.parent.is_dir():
        raise InputError(f"--stream {args.stream}: folder {stream_path.parent} does not exist")
    results_dir = report.RESULTS_DIR
    if args.save and not results_dir.is_dir():
        raise InputError(f"--save: {results_dir} does not exist; run from a source checkout (pip install -e .)")
    settings = settings_from_args(args, log)
    log(f"{settings.device} {settings.config} weights ({settings.weights}), "
        f"{'quick' if settings.quick else 'full run'}, {settings.steps} steps for whole passes")

    # 2. Run.
    on_row = (lambda row: report.append_jsonl(stream_path, row)) if stream_path else None
    doc = run_suite(settings, progress=not args.quiet and sys.stderr.isatty(), log=log, on_row=on_row)
    doc["command"] = effective_command(settings, weights_given=args.weights is not None)

    # 3. Report.
    sys.stdout.write(report.format_table(doc))
    sys.stdout.flush()
    if json_path:
        report.write_json(json_path, doc)
    if markdown_path:
        report.write_text(markdown_path, report.format_markdown(doc))
    if plot_path:
        report.write_plot(plot_path, doc)
    failed = [r["name"] for r in doc["rows"] if (r["skipped"] or "").startswith("failed:")]
    if failed:  # a run with failed rows never lands in bench/results/
        unsaved = f"; nothing saved to {results_dir}" if args.save else ""
        print(f"editrt: bench: {len(failed)} row(s) failed: {', '.join(failed)}{unsaved}", file=sys.stderr)
        raise SystemExit(1)
    if args.save:
        log(f"saved {report.save_result(doc, results_dir)} and refreshed {results_dir / 'README.md'}")
    return doc


HELP = "latency benchmark suite: components, passes, peers side by side"


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench` on a command's subparsers (stand-alone use; `editrt` loads this module only when
    `bench` runs, through configure_parser and run)."""
    p = subparsers.add_parser("bench", help=HELP)
    configure_parser(p)
    return p


def run(args) -> dict:
    return cmd_bench(args)


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `bench` options on `p` (editrt/cli.py's lazy commands call this only when `bench` runs)."""
    p.description, p.formatter_class = __doc__.split("\n\n")[0], argparse.RawDescriptionHelpFormatter
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats (under a minute on a 2-core CPU with tiny weights); shapes and steps stay the same")
    p.add_argument("--config", metavar="tiny|full", help="random weights to use (default: full on CUDA, tiny on CPU)")
    p.add_argument("--weights", metavar="DIR", help="a weights directory instead (default: cached random weights of --config)")
    p.add_argument("--only", action="append", metavar="NAME[,NAME]",
                   help="components to run: a name, a glob (unet-*) or a prefix (sam); repeatable")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--dtype", metavar="DTYPE", help="fp32, fp16, bf16 (or float32, float16, bfloat16); "
                   "default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--steps", metavar="N", help="denoising steps of the whole-pass rows (default 20)")
    p.add_argument("--repeats", metavar="N", help="timed runs per row (default: sized to a time budget per row)")
    p.add_argument("--warmup", metavar="N", help="untimed runs per row first (default: 3 CPU / 10 CUDA, --quick 1 / 3; whole passes 1-2)")
    p.add_argument("--json", metavar="PATH", help="write the result document (schema: bench/results/README.md)")
    p.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    p.add_argument("--plot", metavar="PNG", help="write a bar chart of latencies and ratios")
    p.add_argument("--stream", metavar="JSONL", help="append each row to JSONL as soon as it is finished "
                   "(one JSON object per line, the --json row schema): a killed run keeps the rows it finished")
    p.add_argument("--save", action="store_true",
                   help="write bench/results/<device>-<date>.json and refresh bench/results/README.md "
                        "(only when no row failed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages (the table is still printed)")
    p.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    """`editrt bench ARGS`: the same entry point (one-line errors, exit 2 on bad input)."""
    from editrt.cli import main as editrt_main

    return editrt_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
