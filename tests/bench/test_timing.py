"""bench/timing.py and the case registry's --only semantics: no weights, no models."""
import pytest
import torch

from editrt.bench import timing
from editrt.bench.cases import Case, Selection, matches
from editrt.bench.timing import Timing, TimingError, check_not_zero, measure


def test_inputs_rotate_through_warmup_and_timed_runs():
    inputs = [torch.full((4,), float(i + 1)) for i in range(3)]
    seen = []
    result = measure(lambda x: seen.append(int(x[0])), inputs, "cpu", warmup=2, repeats=5)
    assert seen == [1, 2, 3, 1, 2, 3, 1]  # consecutive runs never reuse an input
    assert result.warmup == 2 and result.repeats == 5
    assert all(s > 0 for s in result.samples_ms)


def test_median_and_p90():
    t = Timing(samples_ms=[float(v) for v in range(1, 11)], warmup=0, peak_mb=None, memory=None)
    assert t.p50_ms == pytest.approx(5.5)
    assert t.p90_ms == pytest.approx(9.1)


def test_refuses_zero_inputs():
    with pytest.raises(TimingError, match="all-zero"):
        measure(lambda x: x + 1, [torch.randn(3), (torch.zeros(2, 2), 5)], "cpu", warmup=0, repeats=1)
    check_not_zero([torch.randn(3), None, 1.0, {"a": torch.ones(1)}])  # scalars and None are fine


def test_refuses_a_zero_time(monkeypatch):
    monkeypatch.setattr(timing.time, "perf_counter", lambda: 42.0)  # a clock that does not move
    with pytest.raises(TimingError, match="0.0 ms"):
        measure(lambda x: x * 2, [torch.randn(3)], "cpu", warmup=0, repeats=3)


def test_repeats_sized_from_the_warmup_within_bounds():
    slow = measure(lambda x: sum(range(200_000)), [torch.randn(2)], "cpu", warmup=1, budget_s=1e-6,
                   min_repeats=4, max_repeats=9)
    assert slow.repeats == 4
    fast = measure(lambda x: x, [torch.randn(2)], "cpu", warmup=1, budget_s=10.0, min_repeats=4, max_repeats=9)
    assert fast.repeats == 9


def test_cpu_peak_memory_is_reported():
    result = measure(lambda x: torch.empty(1 << 22).fill_(1.0), [torch.randn(2)], "cpu", warmup=1, repeats=2)
    assert result.peak_mb > 16 and result.memory in ("process peak RSS", "process lifetime peak RSS")


def test_only_matches_names_globs_and_dash_prefixes():
    assert matches("unet-inpaint-b1", "unet-inpaint-b1")
    assert matches("unet-inpaint-b1", "unet") and matches("unet-inpaint-cfg2", "unet-inpaint")
    assert matches("unet-harmonizer-b1", "unet-*-b1")
    assert not matches("unet-inpaint-b1", "unet-in")  # prefixes end at a '-'
    assert matches("sam-segment-1pt", "sam") and not matches("inpaint-pass", "sam")
    assert Selection([]).wants("anything")
    assert Selection(["dual"]).may_want_family("dual-attention")
    assert not Selection(["unet"]).may_want_family("dual-attention")


def test_a_case_checks_its_backends():
    with pytest.raises(ValueError, match="unknown backends"):
        Case("x", "1", {"torch-eager": None, "cuda-magic": None})
    with pytest.raises(ValueError, match="baseline"):
        Case("x", "1", {"torch-eager": None}, baseline="diffusers")
