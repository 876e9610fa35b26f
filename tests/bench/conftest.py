"""One quick `editrt bench` run on tiny weights that test_bench_suite.py and test_truthful_rows.py both read.

Each file used to run its own: the same settings (--quick, FAST), overlapping rows (inpaint-pass, sam-segment-1pt,
elements-unet-b1 ran twice). One run over the union of their rows now serves both; every check of either file
reads the rows it read before (more rows only give the loops over every row more to check)."""
import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from bench_cli import FAST

# test_bench_suite.py's subset (the schema, the peers really running, the outputs) ...
SUITE_ROWS = "unet-inpaint-b1,lora-switch,sam-segment-1pt,inpaint-pass,elements-unet-b1"
# ... and test_truthful_rows.py's real rows (what each row observed it ran)
TRUTHFUL_ROWS = "inpaint-pass,reposition-e2e,elements-partition,elements-unet-b1,elements-render-e2e,sam-segment-1pt"


def _counting(original, calls: dict, key: str):
    def wrapper(self, *args, **kwargs):
        calls[key] += 1
        return original(self, *args, **kwargs)
    return wrapper


@pytest.fixture(scope="session")
def bench_run(tiny_weights, tmp_path_factory):
    """One in-process run over both files' rows, with the peers' entry points wrapped to count their calls, and
    --save pointed at a scratch copy of bench/results."""
    from diffusers import StableDiffusionInpaintPipeline
    from segment_anything import SamPredictor

    from editrt.bench import report
    from editrt.bench.cli import main

    out = tmp_path_factory.mktemp("bench")
    results = out / "results"
    results.mkdir()
    shutil.copy(Path(report.__file__).parent / "results" / "README.md", results / "README.md")
    only = ",".join(dict.fromkeys(SUITE_ROWS.split(",") + TRUTHFUL_ROWS.split(",")))
    calls = {"diffusers": 0, "set_image": 0, "predict": 0}
    stdout, stderr = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StableDiffusionInpaintPipeline, "__call__",
                   _counting(StableDiffusionInpaintPipeline.__call__, calls, "diffusers"))
        mp.setattr(SamPredictor, "set_image", _counting(SamPredictor.set_image, calls, "set_image"))
        mp.setattr(SamPredictor, "predict", _counting(SamPredictor.predict, calls, "predict"))
        mp.setattr(report, "RESULTS_DIR", results)
        # tiny networks on a shared 2-core machine: single-threaded is faster (the rows' figures are not checked)
        torch.set_num_threads(1)
        # --quick: on a CPU the torch.compile rows are then skipped (test_truthful_rows.py compiles a toy for real)
        argv = ["--weights", tiny_weights, "--quick", "--only", only, *FAST, "--json", out / "b.json",
                "--markdown", out / "b.md", "--plot", out / "b.png", "--save"]
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                try:
                    rc = main([str(a) for a in argv])
                except SystemExit as e:
                    rc = e.code
        finally:
            torch.set_num_threads(threads)
    assert rc == 0, stderr.getvalue()[-3000:]
    doc = json.loads((out / "b.json").read_text())
    return dict(rc=rc, doc=doc, rows={r["name"]: r for r in doc["rows"]}, calls=calls, out=out, results=results,
                stdout=stdout.getvalue(), stderr=stderr.getvalue())
