"""On a GPU: the rows CPU runs cannot show (graphs, kernels, torch.compile) say what ran (bench/gpu_validate.sh runs these)."""
import contextlib
import io
import json

import pytest

from editrt.bench.cli import main

ONLY = ("inpaint-pass,reposition-e2e,loop-inpaint-cfg2,session-first-edit,elements-render-e2e,elements-partition,"
        "sam-segment-1pt,dual-attention,slic-assign")


@pytest.mark.gpu
def test_gpu_rows_say_what_ran(tiny_weights, tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            rc = main(["--weights", str(tiny_weights), "--device", "cuda", "--quick", "--only", ONLY, "--repeats", "3",
                       "--warmup", "1", "--steps", "4", "--quiet", "--json", str(tmp_path / "g.json")])
        except SystemExit as e:
            rc = e.code
    assert rc == 0, err.getvalue()
    rows = {r["name"]: r for r in json.loads((tmp_path / "g.json").read_text())["rows"]}
    for row in rows.values():
        if row["backend"] in ("torch-eager", "torch+kvcache") and row["skipped"] is None:
            assert row["cuda_graph"] is False and row["kernels"] == [], row["name"]
    for component in ("inpaint-pass", "reposition-e2e", "loop-inpaint-cfg2", "session-first-edit",
                      "elements-render-e2e"):
        graph = rows[f"{component}/torch+cudagraph"]
        assert graph["skipped"] is None and graph["cuda_graph"] is True and graph["kernels"] == [], component
    for name in ("inpaint-pass/torch+compile", "inpaint-pass/diffusers+compile", "reposition-e2e/torch+compile",
                 "sam-segment-1pt/torch+compile", "sam-segment-1pt/segment-anything+compile",
                 "elements-render-e2e/torch+compile"):
        assert rows[name]["skipped"] is None and rows[name]["compiled"] is True, name  # required on CUDA
    kernel_rows = [r for r in rows.values() if r["backend"] == "torch+kernels"]
    assert kernel_rows and all(r["skipped"] is None and r["kernels"] for r in kernel_rows), \
        [(r["name"], r["skipped"]) for r in kernel_rows]
    assert any("dual_attention" in k for k in rows["elements-render-e2e/torch+kernels"]["kernels"])
    assert rows["elements-render-e2e/torch+kernels"]["cuda_graph"] is True  # the kernels inside the loop's graph
