"""Every bench row records the work it observed (`observed`: network calls, steps, cache hits and misses), a row
whose work differs from its baseline's fails, `compiled` is this row's own, `kernels` does not depend on the row
order, and --save writes only a run without failed rows (issue 20).

Toy cases (registered through suite.CASE_PROVIDERS) drive the suite's real counting with work whose calls are
known; the real rows run on tiny weights in tests/bench/test_bench_suite.py and test_truthful_rows.py."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from bench_cli import FAST, run_cli

from editrt.bench import report, suite, work
from editrt.bench.cases import Case, Run
from editrt.kernels import launches


def run_cases(tiny_weights, tmp_path, monkeypatch, cases: list[Case], *extra) -> tuple[int, str, dict]:
    monkeypatch.setattr(suite, "CASE_PROVIDERS", [lambda ctx: cases])
    rc, err = run_cli(["--weights", tiny_weights, *FAST, *extra, "--json", tmp_path / "t.json"])
    rows = {r["name"]: r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}
    return rc, err, rows


def network_row(calls: int, steps: int = 0):
    """A toy row calling a small network `calls` times per run (counted through Run.networks' forward hooks)."""
    layer = torch.nn.Linear(8, 8)

    def call(x):
        for _ in range(calls):
            x = layer(x)
        for _ in range(steps):
            work.count_step()
        return x
    return lambda: Run(call, [torch.randn(2, 8), torch.randn(2, 8)], "fp32", networks={"toy_net": layer})


# ---------------------------------------------------------------------- observed, and the work check
def test_observed_counts_each_timed_run(tiny_weights, tmp_path, monkeypatch):
    rc, err, rows = run_cases(tiny_weights, tmp_path, monkeypatch,
                              [Case("toy", "8", {"reference": network_row(3, steps=5), "onnxruntime": network_row(3, 5)},
                                    baseline="reference")])
    assert rc == 0, err
    for row in rows.values():  # per timed run, not the warm-up or the checked first run
        assert row["observed"] == {"networks": {"toy_net": 3}, "denoising_steps": 5, "caches": {},
                                   "compiled_graph_calls": 0}
        assert row["work_differs"] is None


def test_a_row_doing_other_work_than_its_baseline_fails(tiny_weights, tmp_path, monkeypatch):
    rc, err, rows = run_cases(tiny_weights, tmp_path, monkeypatch,
                              [Case("toy", "8", {"reference": network_row(2), "onnxruntime": network_row(4)},
                                    baseline="reference")])
    assert rc == 1 and "toy/onnxruntime" in err
    row = rows["toy/onnxruntime"]
    assert row["skipped"] == ("failed: WorkMismatch: did other work than toy/reference: networks {'toy_net': 4}, "
                              "0 steps per run vs networks {'toy_net': 2}, 0 steps")
    assert row["p50_ms"] is None and row["ratio"] is None and row["observed"] is None
    assert rows["toy/reference"]["skipped"] is None and rows["toy/reference"]["observed"]["networks"] == {"toy_net": 2}


def test_other_steps_than_the_baseline_fail(tiny_weights, tmp_path, monkeypatch):
    rc, _, rows = run_cases(tiny_weights, tmp_path, monkeypatch,
                            [Case("toy", "8", {"diffusers": network_row(2, steps=2), "torch-eager": network_row(2, 4)},
                                  baseline="diffusers")])
    assert rc == 1 and rows["toy/torch-eager"]["skipped"].startswith("failed: WorkMismatch: did other work than toy/diffusers")


def test_a_declared_difference_is_reported_and_checked(tiny_weights, tmp_path, monkeypatch):
    why = "skips the second call by design (toy)"
    rc, err, rows = run_cases(tiny_weights, tmp_path, monkeypatch,
                              [Case("toy", "8", {"reference": network_row(2), "onnxruntime": network_row(1)},
                                    baseline="reference", work_differs={"onnxruntime": why})])
    assert rc == 0, err
    assert rows["toy/onnxruntime"]["work_differs"] == why and rows["toy/onnxruntime"]["p50_ms"] > 0
    assert rows["toy/onnxruntime"]["observed"]["networks"] == {"toy_net": 1}
    # a declaration the observations do not bear out fails the row too
    rc, _, rows = run_cases(tiny_weights, tmp_path, monkeypatch,
                            [Case("toy", "8", {"reference": network_row(2), "onnxruntime": network_row(2)},
                                  baseline="reference", work_differs={"onnxruntime": why})])
    assert rc == 1 and rows["toy/onnxruntime"]["skipped"] == (
        f"failed: WorkMismatch: declares different work ({why}) but did the same work as toy/reference")


def test_cache_hits_and_misses_are_counted(tiny_weights, tmp_path, monkeypatch):
    from editrt.runtime.caches import ByteLRU

    cache = ByteLRU("toy cache", 1 << 20)
    cache.put("kept", torch.ones(2))

    def build():
        def call(x):
            cache.get("kept")  # a hit
            cache.get("absent")  # a miss
            return cache.get("absent2", x) * 2  # another miss
        return Run(call, [torch.randn(2), torch.randn(2)], "fp32")

    rc, err, rows = run_cases(tiny_weights, tmp_path, monkeypatch, [Case("toy", "2", {"torch-eager": build})])
    assert rc == 0, err
    assert rows["toy/torch-eager"]["observed"]["caches"] == {"toy cache": {"hits": 1, "misses": 2}}
    assert ByteLRU.get.__name__ == "get" and ByteLRU.get.__qualname__ == "ByteLRU.get"  # the wrapper is removed


def test_engine_calls_count_under_the_spec_name(reposition):
    """Our engines are counted by their spec name, without a row listing them, and only while observing."""
    engine = reposition.engines["vae_decoder"]
    z = torch.randn(1, 4, 8, 8)
    with work.observing(), work.tally() as seen:
        engine(latent=z)
        engine(latent=z)
    assert seen == {work.network("vae_decoder"): 2}
    with work.tally() as outside:  # no observing(): no wrapper, nothing counted
        engine(latent=z)
    assert not outside


# ---------------------------------------------------------------------- compiled: this row's own
def test_compiled_is_not_satisfied_by_an_earlier_rows_compilation(tiny_weights, tmp_path, monkeypatch):
    """torch.compile for real (inductor on this CPU, 16x16 linear layers: seconds). The first row compiles; the
    second names a compiled module but calls the plain one: it ran nothing compiled, whatever ran before it."""
    first, second = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
    first_compiled, second_compiled = torch.compile(first), torch.compile(second)
    inputs = [torch.randn(4, 16), torch.randn(4, 16)]
    cases = [Case("toy-a", "16", {"torch+compile": lambda: Run(first_compiled, inputs, "fp32", parts=[first_compiled])},
                  baseline="torch+compile"),
             Case("toy-b", "16", {"torch+compile": lambda: Run(second, inputs, "fp32", parts=[second_compiled])},
                  baseline="torch+compile")]
    rc, _, rows = run_cases(tiny_weights, tmp_path, monkeypatch, cases)
    assert rows["toy-a/torch+compile"]["compiled"] is True and rows["toy-a/torch+compile"]["p50_ms"] > 0
    assert rows["toy-a/torch+compile"]["observed"]["compiled_graph_calls"] >= 1
    assert rc == 1 and rows["toy-b/torch+compile"]["skipped"] == (
        "failed: ClaimError: torch+compile row claims torch.compile'd ['Linear'] but no compiled graph of them ran "
        "in its timed runs")


# ---------------------------------------------------------------------- kernels and work through CUDA graphs
class StandInGraph:
    """A CUDA graph without a GPU: the suite's wrappers wrap whatever capture/replay is installed."""


@pytest.fixture
def stand_in_graphs(monkeypatch):
    replays = []
    graphs = torch.cuda.graphs.CUDAGraph
    monkeypatch.setattr(graphs, "capture_begin", lambda self, *a, **k: None)
    monkeypatch.setattr(graphs, "capture_end", lambda self: None)
    monkeypatch.setattr(graphs, "replay", lambda self: replays.append(self))
    return replays


def graph_rows(shared: dict):
    """Two rows replaying one shared graph (as pipelines memoized across rows share their loops): whichever
    runs first captures it; a capture records a kernel launch and a network call."""
    layer = torch.nn.Linear(8, 8)
    graphs = torch.cuda.graphs.CUDAGraph

    def build():
        def call(x):
            if "graph" not in shared:
                shared["graph"] = StandInGraph()
                graphs.capture_begin(shared["graph"])
                launches.record("toy_kernel")
                layer(x)
                graphs.capture_end(shared["graph"])
            graphs.replay(shared["graph"])
            return x * 2
        return Run(call, [torch.randn(2, 8), torch.randn(2, 8)], "fp32", networks={"toy_net": layer})
    return build


@pytest.mark.parametrize("order", ["a-first", "b-first"])
def test_kernels_and_work_of_a_replayed_graph_do_not_depend_on_row_order(tiny_weights, tmp_path, monkeypatch,
                                                                         stand_in_graphs, order):
    shared = {}
    cases = [Case(name, "8", {"onnxruntime": graph_rows(shared)}, baseline="onnxruntime") for name in ("toy-a", "toy-b")]
    rc, err, rows = run_cases(tiny_weights, tmp_path, monkeypatch, cases if order == "a-first" else cases[::-1])
    assert rc == 0, err
    for name in ("toy-a/onnxruntime", "toy-b/onnxruntime"):
        row = rows[name]
        assert row["cuda_graph"] is True and row["kernels"] == ["toy_kernel"], name
        assert row["observed"]["networks"] == {"toy_net": 1}, name  # the captured call runs at each replay
    assert len(stand_in_graphs) == 2 * (1 + 1 + 2)  # two rows: first run, warm-up, timed runs


# ---------------------------------------------------------------------- --save
def test_save_writes_nothing_when_a_row_failed(tiny_weights, tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(Path(report.__file__).parent / "results" / "README.md", results / "README.md")
    readme = (results / "README.md").read_text()
    monkeypatch.setattr(report, "RESULTS_DIR", results)
    rc, err, rows = run_cases(tiny_weights, tmp_path, monkeypatch,
                              [Case("toy", "8", {"reference": network_row(2), "onnxruntime": network_row(3)},
                                    baseline="reference")], "--save")
    assert rc == 1 and f"nothing saved to {results}" in err
    assert sorted(p.name for p in results.iterdir()) == ["README.md"] and (results / "README.md").read_text() == readme
    assert rows["toy/onnxruntime"]["skipped"].startswith("failed: WorkMismatch")  # --json still reports the run
