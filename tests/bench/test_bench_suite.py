"""`editrt bench` end to end on tiny weights: the JSON schema, the peers really running, the outputs,
the kernel-case adapter, failed rows, and bad options (one line on stderr, exit 2, no file).

`bench_run` (tests/bench/conftest.py) is the one quick run over this file's rows and test_truthful_rows.py's."""
import contextlib
import importlib.machinery
import importlib.util
import io
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

import editrt.bench
from editrt.bench import report, suite
from editrt.bench.cases import BACKENDS, Case, Run
from editrt.bench.cli import add_bench_parser, cmd_bench, main

FAST = ["--repeats", "2", "--warmup", "1", "--steps", "2", "--quiet"]
TOP_FIELDS = {"schema", "created", "command", "device", "config", "dtype", "quick", "steps", "versions", "notes", "rows"}
TENSORRT_ABSENT = importlib.util.find_spec("tensorrt") is None


def run_cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def test_json_schema(bench_run):
    doc = bench_run["doc"]
    assert set(doc) == TOP_FIELDS and doc["schema"] == suite.SCHEMA
    assert doc["config"] == "tiny" and doc["dtype"] == "fp32" and doc["steps"] == 2 and doc["quick"] is True
    assert "--only" in doc["command"] and "--weights" in doc["command"] and "--quick" in doc["command"]
    assert set(doc["versions"]) == set(suite.VERSION_KEYS) and doc["versions"]["torch"] == torch.__version__
    for row in doc["rows"]:
        assert set(row) == set(suite.ROW_FIELDS), row["name"]
        for name, types_ in suite.ROW_FIELDS.items():
            assert type(row[name]) in types_, f"{row['name']}.{name} = {row[name]!r}"  # strict: no bool for int
        assert row["name"] == f"{row['component']}/{row['backend']}"
        assert row["backend"] in BACKENDS and row["peer"] == BACKENDS[row["backend"]].peer
        assert row["versions"] == doc["versions"] and row["device"] == doc["device"]
        assert row["config"] == "tiny" and row["quick"] is True
        assert type(row["cuda_graph"]) is bool and type(row["compiled"]) is bool and type(row["kernels"]) is list


def test_rows_present_and_measured(bench_run):
    rows = bench_run["rows"]
    measured = ["unet-inpaint-b1/torch-eager", "lora-switch/torch-eager", "sam-segment-1pt/segment-anything",
                "sam-segment-1pt/torch-eager", "inpaint-pass/diffusers", "inpaint-pass/torch-eager",
                "elements-unet-b1/torch-eager"]
    for name in measured:
        row = rows[name]
        assert row["skipped"] is None, row["skipped"]
        assert 0 < row["p50_ms"] <= row["p90_ms"]
        assert row["repeats"] == 2 and row["warmup"] == 1
        assert row["peak_mb"] > 0 and row["memory"]
    assert rows["unet-inpaint-b1/torch-eager"]["flops"] > 0 and rows["unet-inpaint-b1/torch-eager"]["tflop_s"] > 0
    assert rows["lora-switch/torch-eager"]["bytes"] > 0 and rows["lora-switch/torch-eager"]["gb_s"] > 0
    assert rows["inpaint-pass/torch-eager"]["steps"] == 2
    assert not any(r["component"].startswith("vae") for r in rows.values())  # --only kept to the subset


def test_ratios_point_at_the_baseline(bench_run):
    rows = bench_run["rows"]
    assert rows["inpaint-pass/torch-eager"]["baseline"] == "inpaint-pass/diffusers"
    assert rows["sam-segment-1pt/torch-eager"]["baseline"] == "sam-segment-1pt/segment-anything"
    for row in rows.values():
        if row["baseline"] is None:
            assert row["ratio"] is None
            continue
        base = rows[row["baseline"]]
        if row["p50_ms"] is None or base["p50_ms"] is None:
            assert row["ratio"] is None
        else:
            assert row["ratio"] == pytest.approx(base["p50_ms"] / row["p50_ms"], rel=1e-3)


def test_each_peer_really_ran(bench_run):
    # one checked run + 1 warm-up + 2 timed runs, each a real call into the peer library
    expected = 1 + 1 + 2
    assert bench_run["calls"] == {"diffusers": expected, "set_image": expected, "predict": expected}
    for name in ("inpaint-pass/diffusers", "sam-segment-1pt/segment-anything"):
        row = bench_run["rows"][name]
        assert row["peer"] and row["baseline"] is None and row["p50_ms"] > 0


def test_peers_do_the_same_work_as_ours(bench_run):
    """The observed work of one timed run: the diffusers peer runs the UNet once per requested step (guidance 1)
    and the VAE once each way, SamPredictor the image encoder and the mask decoder once per call; each of our
    rows does exactly that too, and our segment computes its embedding every call (a cache miss, no hit)."""
    rows, steps = bench_run["rows"], bench_run["doc"]["steps"]
    measured = [r for r in rows.values() if r["skipped"] is None]
    assert all(type(r["observed"]) is dict for r in measured)
    assert all(r["observed"] is None for r in rows.values() if r["skipped"] is not None)
    diffusers = rows["inpaint-pass/diffusers"]["observed"]
    assert diffusers["networks"] == {"inpaint_unet": steps, "vae_encoder": 1, "vae_decoder": 1}
    assert diffusers["denoising_steps"] == steps
    sam = rows["sam-segment-1pt/segment-anything"]["observed"]
    assert sam["networks"] == {"sam_image_encoder": 1, "sam_mask_decoder": 1}
    for component, peer in (("inpaint-pass", diffusers), ("sam-segment-1pt", sam)):
        ours = [r for r in measured if r["component"] == component and not r["peer"]]
        assert ours, component
        for row in ours:
            assert row["observed"]["networks"] == peer["networks"], row["name"]
            assert row["observed"]["denoising_steps"] == peer["denoising_steps"], row["name"]
            assert row["work_differs"] is None, row["name"]
    assert rows["sam-segment-1pt/torch-eager"]["observed"]["caches"]["sam embeddings"] == {"hits": 0, "misses": 1}


def test_skipped_rows_carry_reasons(bench_run):
    skipped = [r for r in bench_run["rows"].values() if r["skipped"] is not None]
    assert skipped, "the TensorRT row of a network case is always listed"
    for row in skipped:
        assert row["p50_ms"] is None and row["p90_ms"] is None and row["ratio"] is None and row["skipped"].strip()
    trt = bench_run["rows"]["unet-inpaint-b1/tensorrt"]
    if TENSORRT_ABSENT:
        assert trt["skipped"] == "tensorrt not installed"
    assert "tensorrt" in bench_run["stdout"] and "skipped:" in bench_run["stdout"]


def test_table_markdown_plot_and_save(bench_run):
    out, doc = bench_run["out"], bench_run["doc"]
    assert "inpaint-pass" in bench_run["stdout"] and "x vs diffusers" in bench_run["stdout"]
    markdown = (out / "b.md").read_text()
    assert "| component | backend |" in markdown and "sam-segment-1pt" in markdown
    png = (out / "b.png").read_bytes()
    assert len(png) > 10_000 and png[:8] == b"\x89PNG\r\n\x1a\n"
    saved = bench_run["results"] / f"{report.slug(doc['device'])}-{doc['created'][:10]}.json"
    assert json.loads(saved.read_text())["rows"] == doc["rows"]
    readme = (bench_run["results"] / "README.md").read_text()
    assert f"### {doc['device']}" in readme and saved.name in readme and "No runs committed yet" not in readme
    assert readme.count(report.README_BEGIN) == 1 and "## JSON schema" in readme  # the hand-written part kept


def test_results_readme_shows_the_newest_run_per_device(bench_run, tmp_path):
    shutil.copy(bench_run["results"] / "README.md", tmp_path / "README.md")
    old = dict(bench_run["doc"], created="2000-01-01T00:00:00+00:00")
    new = dict(bench_run["doc"], created="2001-01-01T00:00:00+00:00")
    report.save_result(old, tmp_path)
    report.save_result(new, tmp_path)
    report.save_result(dict(bench_run["doc"], device="Other GPU"), tmp_path)
    readme = (tmp_path / "README.md").read_text()
    assert "2001-01-01" in readme and "2000-01-01" not in readme and "### Other GPU" in readme


def _fake_kernel_cases(calls: list):
    module = types.ModuleType("editrt.bench.kernel_cases")
    module.__spec__ = importlib.machinery.ModuleSpec("editrt.bench.kernel_cases", None)
    a, b = torch.randn(64, 64), torch.randn(64, 64)

    def dual_attention_cases(device, dtype, quick):
        calls.append(("dual", device, dtype, quick))
        return [dict(name="tiny 64", shape="64x64", kernel=lambda: a @ b, baseline=lambda: a @ b + a @ b,
                     flops=4 * 64**3)]

    def slic_assign_cases(device, quick):
        calls.append(("slic", device, quick))
        return []

    module.dual_attention_cases, module.slic_assign_cases = dual_attention_cases, slic_assign_cases
    return module


def test_kernel_cases_become_rows(tiny_weights, tmp_path, monkeypatch):
    calls = []
    fake = _fake_kernel_cases(calls)
    monkeypatch.setitem(sys.modules, "editrt.bench.kernel_cases", fake)
    monkeypatch.setattr(editrt.bench, "kernel_cases", fake, raising=False)
    rc, _, err = run_cli(["--weights", tiny_weights, "--only", "dual-attention", *FAST, "--json", tmp_path / "k.json"])
    assert rc == 0, err
    assert calls == [("dual", "cpu", torch.float32, False)]  # the SLIC family was not asked for, so not built
    rows = {r["name"]: r for r in json.loads((tmp_path / "k.json").read_text())["rows"]}
    assert set(rows) == {"dual-attention-tiny-64/sdpa", "dual-attention-tiny-64/torch+kernels"}
    peer = rows["dual-attention-tiny-64/sdpa"]
    assert peer["peer"] and peer["p50_ms"] > 0 and peer["tflop_s"] > 0
    kernel = rows["dual-attention-tiny-64/torch+kernels"]
    assert kernel["baseline"] == "dual-attention-tiny-64/sdpa"
    # the fake kernel launches no editrt kernel: its row is skipped with the reason, not timed as one
    assert kernel["skipped"] == suite.no_kernel_reason(torch.device("cpu" if not torch.cuda.is_available() else "cuda"))
    assert kernel["p50_ms"] is None and kernel["kernels"] == []


def test_weights_without_elements_leave_those_rows_out(tiny_weights, tmp_path):
    old = tmp_path / "old_weights"  # written before the elements editor existed
    shutil.copytree(tiny_weights, old, ignore=lambda folder, names: ["elements"] if Path(folder) == tiny_weights else [])
    rc, _, err = run_cli(["--weights", old, "--only", "elements", *FAST])
    assert rc == 2 and "elements rows absent" in err and "has no elements/ folder" in err


def test_a_failing_row_is_reported_and_the_command_exits_1(tiny_weights, tmp_path, monkeypatch):
    def broken() -> Run:
        raise RuntimeError("boom")

    fine = lambda: Run(lambda x: x * 2, [torch.randn(8), torch.randn(8)], "fp32")  # noqa: E731
    monkeypatch.setattr(suite, "CASE_PROVIDERS", [lambda ctx: [Case("toy", "8", {"torch-eager": fine,
                                                                                  "onnxruntime": broken})]])
    rc, _, err = run_cli(["--weights", tiny_weights, *FAST, "--json", tmp_path / "f.json"])
    assert rc == 1 and "1 row(s) failed: toy/onnxruntime" in err
    rows = {r["name"]: r for r in json.loads((tmp_path / "f.json").read_text())["rows"]}
    assert rows["toy/onnxruntime"]["skipped"] == "failed: RuntimeError: boom"
    assert rows["toy/torch-eager"]["p50_ms"] > 0


BAD = [
    (["--only", "nope"], "--only nope: matches no component; known: unet-inpaint-b1"),
    (["--only", "unet,"], "expected component names separated by commas"),
    (["--device", "tpu"], "--device 'tpu': expected cpu, cuda or cuda:N"),
    (["--dtype", "fp8"], "--dtype: expected one of fp32, fp16, bf16, float32"),
    (["--config", "huge"], "--config 'huge': expected one of tiny, full"),
    (["--config", "full"], "are 'tiny' (editrt.json)"),
    (["--repeats", "0"], "--repeats '0': expected an integer >= 1"),
    (["--warmup", "x"], "--warmup 'x': expected an integer >= 0"),
    (["--plot", "{tmp}/b.jpg"], "expected a .png file name"),
    (["--json", "{tmp}"], "is a directory"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_options(tiny_weights, tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    rc, out, err = run_cli(["--weights", tiny_weights, "--quiet", *args])
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("editrt: error: ") and message in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_bad_weights_and_missing_cuda(tmp_path):
    rc, _, err = run_cli(["--weights", tmp_path / "nowhere", "--quiet"])
    assert rc == 2 and "no such weights directory" in err and len(err.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        rc, _, err = run_cli(["--device", "cuda", "--quiet"])
        assert rc == 2 and "CUDA is not available" in err


def test_registers_on_the_editrt_command():
    import argparse

    parser = argparse.ArgumentParser(prog="editrt")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "--quick", "--only", "unet", "--only", "sam,vae"])
    assert args.func is cmd_bench and args.quick and args.only == ["unet", "sam,vae"]
