"""Every bench row says what ran: `cuda_graph`, `compiled` and `kernels` are observed, not asked for, and a
row whose observations contradict its backend is failed or skipped with the reason (issue 10).

Toy cases (registered through suite.CASE_PROVIDERS) drive the suite's real observation and claim checks
with work whose launches are known; the real cases run on tiny weights."""
import json

import pytest
import torch
from bench_cli import FAST, run_cli

from editrt.bench import suite
from editrt.bench.cases import COMPILE_SKIPPED, GRAPHS_NEED_CUDA, Case, Run
from editrt.kernels import launches

CPU = not torch.cuda.is_available()


def run_toy(tiny_weights, tmp_path, monkeypatch, runners: dict, baseline: str, *extra) -> tuple[int, str, dict]:
    monkeypatch.setattr(suite, "CASE_PROVIDERS", [lambda ctx: [Case("toy", "8", runners, baseline=baseline)]])
    rc, err = run_cli(["--weights", tiny_weights, *FAST, *extra, "--json", tmp_path / "t.json"])
    rows = {r["backend"]: r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}
    return rc, err, rows


def work(launch: str | None = None, replay: bool = False):
    """A toy row: real tensor work, optionally recording a kernel launch or replaying a 'graph'."""
    def call(x):
        if launch:
            launches.record(launch)
        if replay:
            torch.cuda.graphs.CUDAGraph.replay(None)  # the replay counter's wrapper, then the test's stand-in
        return x * 2
    return lambda: Run(call, [torch.randn(8), torch.randn(8)], "fp32")


@pytest.fixture
def fake_graph_replay(monkeypatch):
    """CUDAGraph.replay without a GPU: the suite's counter wraps whatever replay is installed."""
    calls = []
    monkeypatch.setattr(torch.cuda.graphs.CUDAGraph, "replay", lambda self: calls.append(1))
    return calls


# ---------------------------------------------------------------------- kernels column
def test_kernels_column_lists_what_launched(tiny_weights, tmp_path, monkeypatch):
    rc, err, rows = run_toy(tiny_weights, tmp_path, monkeypatch,
                            {"reference": work(), "onnxruntime": work(launch="toy_kernel")}, "reference")
    assert rc == 0, err
    assert rows["reference"]["kernels"] == [] and rows["reference"]["p50_ms"] > 0
    assert rows["onnxruntime"]["kernels"] == ["toy_kernel"] and rows["onnxruntime"]["p50_ms"] > 0


def test_a_plain_row_that_launches_a_kernel_fails(tiny_weights, tmp_path, monkeypatch):
    rc, err, rows = run_toy(tiny_weights, tmp_path, monkeypatch,
                            {"torch-eager": work(), "torch+kvcache": work(launch="toy_kernel")}, "torch-eager")
    assert rc == 1 and "toy/torch+kvcache" in err
    assert rows["torch+kvcache"]["skipped"] == "failed: ClaimError: torch+kvcache row launched editrt kernels ['toy_kernel']"
    assert rows["torch+kvcache"]["p50_ms"] is None and rows["torch-eager"]["kernels"] == []


def test_plain_rows_run_with_the_kernels_switched_off(tiny_weights, tmp_path, monkeypatch):
    import os

    seen = {}

    def build(backend):
        def call(x):
            seen[backend] = os.environ.get("EDITRT_DISABLE_TRITON")
            return x + 1
        return lambda: Run(call, [torch.randn(4), torch.randn(4)], "fp32")

    rc, err, _ = run_toy(tiny_weights, tmp_path, monkeypatch,
                         {"torch-eager": build("torch-eager"), "onnxruntime": build("onnxruntime")}, "torch-eager")
    assert rc == 0, err
    assert seen == {"torch-eager": "1", "onnxruntime": os.environ.get("EDITRT_DISABLE_TRITON")}


def test_a_kernels_row_where_no_kernel_launched_is_skipped(tiny_weights, tmp_path, monkeypatch):
    rc, err, rows = run_toy(tiny_weights, tmp_path, monkeypatch,
                            {"torch-eager": work(), "torch+kernels": work()}, "torch-eager")
    assert rc == 0, err
    row = rows["torch+kernels"]
    assert row["skipped"] == suite.no_kernel_reason(torch.device("cpu" if CPU else "cuda"))
    assert row["p50_ms"] is None and row["ratio"] is None and row["kernels"] == []


def test_a_kernels_row_where_a_kernel_launched_is_timed(tiny_weights, tmp_path, monkeypatch):
    rc, err, rows = run_toy(tiny_weights, tmp_path, monkeypatch,
                            {"torch-eager": work(), "torch+kernels": work(launch="toy_kernel")}, "torch-eager")
    assert rc == 0, err
    row = rows["torch+kernels"]
    assert row["skipped"] is None and row["kernels"] == ["toy_kernel"] and row["ratio"] is not None


@pytest.mark.skipif(not CPU, reason="the interpreter runs CPU tensors only")
def test_triton_kernels_never_run_in_the_interpreter_in_a_row(tiny_weights, tmp_path, monkeypatch):
    """Tests switch Triton's CPU interpreter on; a bench row must not time it (the references run)."""
    from editrt.kernels._triton_utils import use_triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    seen = []

    def build():
        def call(x):
            seen.append(use_triton(x))
            return x + 1
        return Run(call, [torch.randn(4), torch.randn(4)], "fp32")

    rc, err, _ = run_toy(tiny_weights, tmp_path, monkeypatch, {"reference": build, "torch+kernels": build},
                         "reference")
    assert rc == 0, err
    assert seen and not any(seen) and use_triton(torch.randn(2))  # and switched back on after the rows


# ---------------------------------------------------------------------- cuda_graph column
def test_a_replayed_graph_is_observed(tiny_weights, tmp_path, monkeypatch, fake_graph_replay):
    rc, err, rows = run_toy(tiny_weights, tmp_path, monkeypatch,
                            {"reference": work(), "onnxruntime": work(replay=True)}, "reference")
    assert rc == 0, err
    assert rows["onnxruntime"]["cuda_graph"] is True and rows["reference"]["cuda_graph"] is False
    assert len(fake_graph_replay) == 1 + 1 + 2  # first run, warm-up, timed runs: each really replayed
    assert torch.cuda.graphs.CUDAGraph.replay is not None and torch.cuda.graphs.CUDAGraph.replay.__name__ == "<lambda>"


def test_an_eager_row_that_replays_a_graph_fails(tiny_weights, tmp_path, monkeypatch, fake_graph_replay):
    rc, err, rows = run_toy(tiny_weights, tmp_path, monkeypatch, {"torch-eager": work(replay=True)}, "torch-eager")
    assert rc == 1
    assert rows["torch-eager"]["skipped"] == "failed: ClaimError: torch-eager row replayed a CUDA graph"


# ---------------------------------------------------------------------- compiled column
def test_compile_rows_are_skipped_in_quick_cpu_runs(tiny_weights, tmp_path, monkeypatch):
    if not CPU:
        pytest.skip("on CUDA, --quick runs torch.compile rows")
    rc, err, rows = run_toy(tiny_weights, tmp_path, monkeypatch,
                            {"torch-eager": work(), "torch+compile": work()}, "torch-eager", "--quick")
    assert rc == 0, err
    assert rows["torch+compile"]["skipped"] == COMPILE_SKIPPED and rows["torch+compile"]["compiled"] is False


def test_a_compile_row_that_runs_nothing_compiled_fails(tiny_weights, tmp_path, monkeypatch):
    rc, err, rows = run_toy(tiny_weights, tmp_path, monkeypatch,
                            {"torch-eager": work(), "torch+compile": work()}, "torch-eager")
    assert rc == 1
    assert rows["torch+compile"]["skipped"] == "failed: ClaimError: torch+compile row ran no torch.compile'd module"


def test_a_compile_row_is_measured_outside_quick_cpu_runs(tiny_weights, tmp_path, monkeypatch):
    """torch.compile for real (inductor on this CPU, a 16x16 linear layer: seconds)."""
    layer = torch.nn.Linear(16, 16)
    compiled = torch.compile(layer)

    def build(module):
        return lambda: Run(lambda x: module(x), [torch.randn(4, 16), torch.randn(4, 16)], "fp32", parts=[module])

    rc, err, rows = run_toy(tiny_weights, tmp_path, monkeypatch,
                            {"torch-eager": build(layer), "torch+compile": build(compiled)}, "torch-eager")
    assert rc == 0, err
    assert rows["torch+compile"]["compiled"] is True and rows["torch+compile"]["p50_ms"] > 0
    assert rows["torch-eager"]["compiled"] is False


# ---------------------------------------------------------------------- the real rows
@pytest.fixture(scope="module")
def quick_rows(bench_run):
    """The quick run over the real rows (tests/bench/conftest.py: shared with test_bench_suite.py)."""
    return bench_run["rc"], bench_run["stderr"], bench_run["rows"]


def test_quick_rows_carry_what_ran(quick_rows):
    rc, err, rows = quick_rows
    assert rc == 0, err
    for name, row in rows.items():
        assert type(row["cuda_graph"]) is bool and type(row["compiled"]) is bool, name
        assert type(row["kernels"]) is list and all(type(k) is str for k in row["kernels"]), name
        if row["backend"] in ("torch-eager", "torch+kvcache", "diffusers", "segment-anything"):
            if row["skipped"] is None:
                assert row["cuda_graph"] is False and row["kernels"] == [] and row["compiled"] is False, name
        if row["skipped"] is not None:
            assert row["cuda_graph"] is False and row["kernels"] == [] and row["compiled"] is False, name


def test_quick_rows_observe_their_work(quick_rows):
    """Every measured row has its observed work; rows that claim a new photo's segment or partition run the image
    encoder in every timed run, and each does the same work as its baseline."""
    _, _, rows = quick_rows
    measured = {name: row for name, row in rows.items() if row["skipped"] is None}
    assert all(type(row["observed"]) is dict and row["work_differs"] is None for row in measured.values())
    for name, row in measured.items():
        if row["component"] in ("sam-segment-1pt", "elements-partition"):
            assert row["observed"]["networks"]["sam_image_encoder"] == 1, name
            if not row["peer"]:  # SamPredictor has no embedding cache
                assert row["observed"]["caches"]["sam embeddings"] == {"hits": 0, "misses": 1}, name
        base = rows.get(row["baseline"]) if row["baseline"] else None
        if base is not None and base["skipped"] is None:
            assert row["observed"]["networks"] == base["observed"]["networks"], name
    render = measured["elements-render-e2e/torch-eager"]["observed"]
    assert render["denoising_steps"] == 2 and render["networks"]["element_unet"] == 2  # CFG batched: one call a step


def test_whole_passes_have_eager_and_cudagraph_rows(quick_rows):
    _, _, rows = quick_rows
    for component in ("inpaint-pass", "reposition-e2e", "elements-render-e2e"):
        eager, graph = rows[f"{component}/torch-eager"], rows[f"{component}/torch+cudagraph"]
        assert eager["skipped"] is None and eager["cuda_graph"] is False
        if CPU:
            assert graph["skipped"] == GRAPHS_NEED_CUDA and graph["p50_ms"] is None
        else:
            assert graph["skipped"] is None and graph["cuda_graph"] is True


def test_kernel_rows_on_a_cpu_are_skipped_unless_a_kernel_ran(quick_rows):
    _, _, rows = quick_rows
    if not CPU:
        pytest.skip("on CUDA the kernels launch")
    # no Triton kernel runs on a CPU: the decoder's and the render's kernel rows would repeat their baseline
    for name in ("elements-unet-b1/torch+kernels", "elements-render-e2e/torch+kernels"):
        assert rows[name]["skipped"] == suite.no_kernel_reason(torch.device("cpu")), name
        assert rows[name]["ratio"] is None and rows[name]["kernels"] == []
    # the partition's native clean-up runs on a CPU where it is built: then its row is timed and says so
    partition = rows["elements-partition/torch+kernels"]
    if partition["skipped"] is None:
        assert partition["kernels"] and partition["ratio"] is not None
    else:
        assert partition["skipped"] == suite.no_kernel_reason(torch.device("cpu")) and partition["kernels"] == []
    # the K/V-cached path is its own row, named for what it runs
    assert rows["elements-unet-b1/torch+kvcache"]["p50_ms"] > 0 and rows["elements-unet-b1/torch+kvcache"]["ratio"]
    assert not any(name.startswith(("inpaint-pass/torch+kernels", "reposition-e2e/torch+kernels")) for name in rows)


def test_compile_peers_are_present(quick_rows):
    _, _, rows = quick_rows
    for name in ("inpaint-pass/diffusers+compile", "sam-segment-1pt/segment-anything+compile",
                 "inpaint-pass/torch+compile", "reposition-e2e/torch+compile", "sam-segment-1pt/torch+compile"):
        row = rows[name]
        if CPU:  # --quick on a CPU: skipped with the reason
            assert row["skipped"] == COMPILE_SKIPPED, name
        else:
            assert row["skipped"] is None and row["compiled"] is True, name
    assert rows["inpaint-pass/diffusers+compile"]["peer"] and rows["inpaint-pass/diffusers+compile"]["baseline"] == \
        "inpaint-pass/diffusers"


def test_session_first_edit_uses_the_embedding_it_times(tiny_weights, tmp_path, monkeypatch):
    """The first edit times a new photo's SAM embedding: every run selects its subject with a click, which
    needs that embedding (a given mask would time an embedding nothing uses)."""
    from editrt.runtime.session import RepositionSession

    clicks = []
    select = RepositionSession.select

    def counting(self, points=None, labels=None, box=None, mask=None):
        clicks.append(points is not None and mask is None)
        return select(self, points=points, labels=labels, box=box, mask=mask)
    monkeypatch.setattr(RepositionSession, "select", counting)
    rc, err = run_cli(["--weights", tiny_weights, "--quick", "--only", "session-first-edit", *FAST,
                       "--json", tmp_path / "s.json"])
    assert rc == 0, err
    measured = [r for r in json.loads((tmp_path / "s.json").read_text())["rows"] if r["skipped"] is None]
    assert measured and all("1 click" in r["shape"] and "SAM embedding" in r["about"] for r in measured)
    assert len(clicks) == sum(1 + r["warmup"] + r["repeats"] for r in measured) and all(clicks)
    for row in measured:  # every timed run computed its photo's embedding: the encoder ran, the cache missed
        observed = row["observed"]
        assert observed["networks"]["sam_image_encoder"] == 1 and observed["networks"]["sam_mask_decoder"] == 1
        assert observed["caches"]["sam embeddings"]["misses"] == 1, row["name"]


# ---------------------------------------------------------------------- the dual-attention peer
class _OpTrace(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        self.ops.append((str(func.overloadpacket), shapes))
        return out


def test_dual_attention_peer_runs_the_same_stacked_gemm():
    """After the attention, the kernel path and the peer run the same ops: one GEMM on the stacked output
    weight [C, 2*H*D] (no two projections + add), so the ratio measures the attention, not the stacking."""
    from editrt.bench.kernel_cases import dual_attention_cases

    spec = dual_attention_cases("cpu", torch.float32, quick=True)[0]
    traces = {}
    for path in ("kernel", "baseline"):
        with _OpTrace() as trace:
            spec[path]()
        traces[path] = trace.ops
    kernel, peer = traces["kernel"], traces["baseline"]
    assert kernel[0][0] == "editrt.dual_cross_attention"  # the custom op: both attentions in one call
    after_cat = max(i for i, op in enumerate(peer) if op[0] == "aten.cat") + 1  # the peer's heads, concatenated
    assert peer[after_cat:] == kernel[1:]
    gemms = [op for op in peer if op[0] in ("aten.mm", "aten.addmm", "aten.bmm", "aten.linear", "aten.matmul")]
    assert len(gemms) == 1 and gemms[0][1][1] == (2 * 2 * 40, 2 * 40), gemms  # quick: H=2, D=40, C=H*D
    assert not any(op[0] == "aten.add" for op in peer)


def test_dual_attention_kernel_and_peer_agree():
    from editrt.bench.kernel_cases import dual_attention_cases

    spec = dual_attention_cases("cpu", torch.float32, quick=True)[0]
    # both callables rotate through the same three input sets in the same order
    for _ in range(3):
        torch.testing.assert_close(spec["kernel"](), spec["baseline"](), rtol=1e-4, atol=1e-5)  # fp32, K <= 333


def test_a_shared_cpu_is_noted():
    import os

    cores = os.cpu_count() or 1
    note = suite.shared_cpu_note(torch.device("cpu"), [cores + 8.0, 1.0])
    assert note and f"load average {cores + 8.0:.1f} / 1.0" in note and "inflated" in note
    assert suite.shared_cpu_note(torch.device("cpu"), [0.5, None]) is None
    assert suite.shared_cpu_note(torch.device("cuda"), [cores + 8.0]) is None
